"""A fit's arithmetic does not depend on the batch around it: the residuals, Jacobians and normal
equations of a row are bitwise the same alone and at any place in batches of any size, and so is a
whole fit. (Vectorised CPU kernels may round a tensor's tail differently from its body, and batched
BLAS may pick kernels by batch size; either would let one group's fit depend on the others.)"""
import numpy as np
import pytest
import torch

from analysis.fitting import fit_batch, stack_groups
from analysis.laws import LAW_NAMES, BayesianLaw, get_law
from analysis.lm import normal_equations, solve_spd
from analysis.residuals import Batch, _residual_fn
from analysis.synthetic import synthetic_group
from tests.conftest import TRUE_LAW

M, S = 3, 23  # odd sizes, so rows never line up with vector widths


def batch(G: int, C: int = 1, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    prob = rng.uniform(0.2, 0.9, (G, C, M, S))
    weight = (rng.uniform(size=(G, C, M, S)) > 0.2).astype(float)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return Batch(t(np.tile(np.arange(S, dtype=float), (G, 1))), t(prob), t(-np.log(prob)), t(weight))


def rows_of(law, G: int, C: int, seed: int = 1) -> torch.Tensor:
    per_row = law.n_params(M, C) if isinstance(law, BayesianLaw) else law.per_curve
    n = G if isinstance(law, BayesianLaw) else G * C * M
    return torch.randn(n, per_row, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("law_name", LAW_NAMES)
@pytest.mark.parametrize("space", ["prob", "nll"])
@pytest.mark.parametrize("C", [1, 3])
def test_residuals_jacobian_and_normal_equations_of_a_row_do_not_depend_on_the_batch(law_name, space, C):
    law = get_law(law_name)
    b = batch(7, C)
    theta = rows_of(law, 7, C)
    fn = _residual_fn(law, b, space, lambda rows: rows if isinstance(law, BayesianLaw) else rows)
    everything = normal_equations(*fn(theta, torch.arange(len(theta))))
    for start, stop in [(0, 1), (3, 4), (len(theta) - 1, len(theta)), (2, 5), (1, len(theta) - 2)]:
        part = normal_equations(*fn(theta[start:stop], torch.arange(start, stop)))
        for whole, piece in zip(everything, part):
            assert torch.equal(whole[start:stop], piece), (law_name, start, stop)


def test_solves_of_a_row_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(9, 40, 13, generator=gen, dtype=torch.float64)
    H = J.transpose(1, 2) @ J + torch.eye(13, dtype=torch.float64)
    b = torch.randn(9, 13, generator=gen, dtype=torch.float64)
    x, ok = solve_spd(H, b)
    assert ok.all()
    for j in range(9):
        assert torch.equal(solve_spd(H[j : j + 1], b[j : j + 1])[0][0], x[j])
    assert torch.equal(solve_spd(H[2:7], b[2:7])[0], x[2:7])


@pytest.mark.parametrize("law_name", ["bayesian", "bayesian_sampling", "logistic"])
def test_a_group_fits_exactly_the_same_alone_as_in_any_batch(law_name):
    rng = np.random.default_rng(2)
    groups = [synthetic_group(f"r{j}", 3, "bayesian_scoring", TRUE_LAW, np.arange(37.0), M, 300, rng)[0]
              for j in range(5)]
    fit = lambda gs: fit_batch(law_name, stack_groups(gs, [g.mask for g in gs]), starts=4, seed=3, max_iter=120)  # noqa: E731
    alone = fit(groups[2:3])
    for members in (groups, groups[1:4], groups[2:][::-1]):
        together, row = fit(members), members.index(groups[2])
        assert torch.equal(together.theta[row], alone.theta[0]), law_name
        assert torch.equal(together.loss[row], alone.loss[0]) and together.converged[row] == alone.converged[0]


@pytest.mark.parametrize("law_name", ["bayesian", "power"])
def test_batches_of_other_shapes_in_one_loop_fit_as_each_alone(law_name):
    from analysis.fitting import fit_batches

    rng = np.random.default_rng(4)
    shapes = [np.arange(19.0), np.arange(41.0)]
    batches = []
    for shots in shapes:
        groups = [synthetic_group(f"r{j}", 3, "bayesian_scoring", TRUE_LAW, shots, M, 300, rng)[0] for j in range(3)]
        batches.append(stack_groups(groups, [g.mask for g in groups]))
    together = fit_batches(law_name, batches, starts=4, seed=3, max_iter=120)
    for batch, fit in zip(batches, together):
        alone = fit_batch(law_name, batch, starts=4, seed=3, max_iter=120)
        assert torch.equal(fit.theta, alone.theta) and torch.equal(fit.loss, alone.loss)
        assert torch.equal(fit.converged, alone.converged)
