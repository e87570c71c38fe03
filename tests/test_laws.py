"""The laws against direct formulas, their Jacobians against autograd, and their numerical range."""
import math

import numpy as np
import pytest
import torch

from analysis.laws import BAYESIAN_NAMES, LAW_NAMES, get_law

M = 4


def random_bayesian(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"priors": rng.dirichlet(np.ones(M)).tolist(), "K": float(rng.uniform(0.2, 3.0)),
            "P": rng.uniform(0.05, 0.95, (M, M)).tolist()}


def slow_bayesian(params: dict, n: int) -> list[float]:
    """p_i(n) = sum_m rho_m P_im^(Kn+1) / sum_m rho_m P_im^(Kn), term by term."""
    rho, P, K = params["priors"], params["P"], params["K"]
    out = []
    for i in range(M):
        num = sum(rho[m] * P[i][m] ** (K * n + 1) for m in range(M))
        den = sum(rho[m] * P[i][m] ** (K * n) for m in range(M))
        out.append(num / den)
    return out


def evaluate(name: str, params: dict, shots: list[int]) -> np.ndarray:
    law = get_law(name)
    theta = law.theta_from(params)[None]
    return law.log_prob(theta, torch.tensor(shots, dtype=torch.float64)[None], M, 1)[0, 0].exp().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_original_law_matches_direct_formula(seed):
    params = random_bayesian(seed)
    shots = [0, 1, 2, 5, 17, 40]
    got = evaluate("bayesian", params, shots)
    want = np.array([slow_bayesian(params, n) for n in shots]).T
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("name", ["bayesian_sampling", "bayesian_scoring"])
def test_tied_laws_equal_original_with_tied_P(name):
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.5, 0.95, M)
    beta = gamma * rng.uniform(0.1, 0.9, M)
    P = np.empty((M, M))
    for i in range(M):
        for m in range(M):
            P[i, m] = gamma[i] if i == m else (beta[m] if name == "bayesian_sampling" else beta[i])
    base = {"priors": rng.dirichlet(np.ones(M)).tolist(), "K": 1.3}
    shots = list(range(0, 60, 7))
    tied = evaluate(name, {**base, "gamma": gamma.tolist(), "beta": beta.tolist()}, shots)
    np.testing.assert_allclose(tied, evaluate("bayesian", {**base, "P": P.tolist()}, shots), rtol=1e-12)
    assert get_law(name).n_params(M) == 3 * M  # gamma, beta, K and M - 1 free priors


def test_baselines_match_their_formulas():
    shots = np.array([0.0, 1.0, 4.0, 30.0, 200.0])
    x = shots + 1
    C, alpha, c0, n_c, x0, kappa = 2.0, 0.6, 0.3, 5.0, 8.0, 1.7
    want = {
        "power": C * x ** -alpha + c0,
        "bounded_power": C * (1 + x / n_c) ** -alpha + c0,
        "logistic": C / (1 + (x / x0) ** kappa) + c0,
    }
    values = {"power": (C, alpha, c0), "bounded_power": (C, n_c, alpha, c0), "logistic": (C, x0, kappa, c0)}
    for name, nll in want.items():
        law = get_law(name)
        params = {p: [v] * M for p, v in zip(law.param_names, values[name])}
        got = evaluate(name, params, shots.tolist())
        np.testing.assert_allclose(-np.log(got), np.tile(nll, (M, 1)), rtol=1e-12)


@pytest.mark.parametrize("name", BAYESIAN_NAMES)
@pytest.mark.parametrize("C", [1, 3])
def test_bayesian_jacobian_matches_autograd(name, C):
    law = get_law(name)
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(2, law.n_params(M, C), generator=gen, dtype=torch.float64)
    shots = torch.tensor([[0.0, 1.0, 3.0, 10.0, 50.0]] * 2, dtype=torch.float64)
    _, jac = law.log_prob_and_jacobian(theta, shots, M, C)
    for b in range(2):
        auto = torch.autograd.functional.jacobian(lambda t, b=b: law.log_prob(t[None], shots[b : b + 1], M, C)[0],
                                                  theta[b])
        torch.testing.assert_close(jac[b], auto, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["power", "bounded_power", "logistic"])
def test_baseline_jacobian_matches_autograd(name):
    law = get_law(name)
    theta = torch.tensor([[0.3, 1.2, -0.4, -1.0][: law.per_curve]], dtype=torch.float64)
    shots = torch.arange(20, dtype=torch.float64)[None]
    _, jac = law.curve_log_prob_and_jacobian(theta, shots)
    auto = torch.autograd.functional.jacobian(lambda t: -law.nll(t[None], shots)[0], theta[0])
    torch.testing.assert_close(jac[0], auto)


@pytest.mark.parametrize("name", LAW_NAMES)
def test_laws_finite_for_many_shots_and_extreme_parameters(name):
    law = get_law(name)
    D = law.n_params(M)
    theta = torch.cat([torch.full((1, D), v, dtype=torch.float64) for v in (-40.0, 0.0, 25.0)])
    theta = torch.cat([theta, 30.0 * torch.randn(4, D, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)])
    shots = torch.arange(1001, dtype=torch.float64).expand(theta.shape[0], -1)
    log_p = law.log_prob(theta, shots, M, 1)
    assert not torch.isnan(log_p).any()
    assert (log_p <= 1e-12).all(), "a probability above 1"
    if name in BAYESIAN_NAMES:
        assert torch.isfinite(log_p).all()
        _, jac = law.log_prob_and_jacobian(theta, shots, M, 1)
        assert torch.isfinite(jac).all()


def test_named_parameters_round_trip():
    params = random_bayesian(7)
    law = get_law("bayesian")
    named = law.named(law.theta_from(params), M)
    np.testing.assert_allclose(named["priors"], params["priors"], rtol=1e-12)
    np.testing.assert_allclose(named["P"], params["P"], rtol=1e-12)
    assert math.isclose(named["K"], params["K"], rel_tol=1e-12)


def test_unknown_law_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown law 'powerlaw'; choose from bayesian"):
        get_law("powerlaw")
