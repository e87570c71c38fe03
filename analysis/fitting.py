"""Batched, multi-start, float64 fits of the laws to curve groups, and their NRMSE.

All fits of one law (every group x split x fit fraction x start) run as one batched
Levenberg-Marquardt problem. The best finite start of each fit is kept; `converged` says whether
it stopped improving before the iteration limit.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from analysis.curves import CurveGroup
from analysis.laws import LAW_NAMES, BayesianLaw, CurveLaw, get_law
from analysis.lm import levenberg_marquardt

SPLITS = ("interpolation", "extrapolation")
SPACES = ("prob", "nll")


@dataclass
class FitConfig:
    laws: tuple[str, ...] = LAW_NAMES
    splits: tuple[str, ...] = SPLITS
    fractions: tuple[float, ...] = (0.1,)
    space: str = "prob"
    starts: int = 8
    seed: int = 0
    max_iter: int = 300
    device: str = "cpu"

    def validate(self) -> None:
        for name in self.laws:
            get_law(name)
        for split in self.splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if self.space not in SPACES:
            raise ValueError(f"unknown loss space {self.space!r}; choose prob or nll")
        if any(not 0.0 < f < 1.0 for f in self.fractions):
            raise ValueError(f"fit fractions {list(self.fractions)} must lie strictly between 0 and 1")
        if self.starts < 1 or self.max_iter < 1:
            raise ValueError("--starts and the iteration limit must be at least 1")


@dataclass
class Batch:
    """Fits of one law on padded tensors: shots [G, S]; prob, nll, weight [G, C, M, S] (weight 0 = not fitted)."""

    shots: torch.Tensor
    prob: torch.Tensor
    nll: torch.Tensor
    weight: torch.Tensor

    @property
    def dims(self) -> tuple[int, int, int]:
        G, C, M, _ = self.prob.shape
        return G, C, M

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.shots.to(device), self.prob.to(device), self.nll.to(device), self.weight.to(device))


@dataclass
class BatchFit:
    theta: torch.Tensor  # [G, D] best start, hypotheses in canonical order
    loss: torch.Tensor  # [G] half sum of squared weighted residuals (inf if no start was finite)
    converged: torch.Tensor  # [G] bool


@dataclass
class FitResult:
    group: CurveGroup
    law: str
    split: str
    fraction: float | None
    nrmse: float
    nrmse_nll: float
    n_params: int
    loss: float
    converged: bool
    params: dict
    theta: torch.Tensor = field(repr=False)


def _residual_fn(law, batch: Batch, space: str, owner: Callable[[torch.Tensor], torch.Tensor]):
    """Residuals/Jacobian of batch rows; owner maps rows to (group, curve) indices."""
    G, C, M = batch.dims
    if isinstance(law, BayesianLaw):

        def fn(theta, rows):
            g = owner(rows)
            log_p, jac = law.log_prob_and_jacobian(theta, batch.shots[g], M, C)
            w, y = batch.weight[g], (batch.prob[g] if space == "prob" else batch.nll[g])
            if space == "prob":
                p = log_p.exp()
                r, dr = w * (p - y), (w * p)[..., None] * jac
            else:
                r, dr = w * (-log_p - y), -w[..., None] * jac
            return r.reshape(len(rows), -1), dr.reshape(len(rows), -1, theta.shape[1])

        return fn

    flat = lambda t: t.reshape(G * C * M, -1)  # noqa: E731 - curves as rows

    def curve_fn(theta, rows):
        c = owner(rows)
        log_p, jac = law.curve_log_prob_and_jacobian(theta, batch.shots[c // (C * M)])
        w, y = flat(batch.weight)[c], flat(batch.prob if space == "prob" else batch.nll)[c]
        if space == "prob":
            p = log_p.exp()
            return w * (p - y), (w * p)[..., None] * jac
        return w * (-log_p - y), -w[..., None] * jac

    return curve_fn


def canonical_order(law: BayesianLaw, theta: torch.Tensor, M: int, C: int) -> torch.Tensor:
    """Relabel the hypotheses of the original law so that hypothesis i is the one matched to task i.

    The law is invariant under permuting P's columns together with the priors, so a fit may land on a
    relabelled copy; reporting the assignment that maximises sum_i log P[i, pi(i)] makes P's diagonal
    the task's own hypothesis and the priors comparable across fits. Tied laws fix the labels already.
    """
    if law.tying != "none":
        return theta
    log_P = law.log_P(theta[: M * M], M)
    _, perm = linear_sum_assignment(-log_P.detach().cpu().numpy())
    perm_t = torch.as_tensor(perm, device=theta.device)
    p_raw = theta[: M * M].reshape(M, M)[:, perm_t].flatten()
    per_cond = theta[M * M :].reshape(C, M + 1)
    per_cond = torch.cat([per_cond[:, :M][:, perm_t], per_cond[:, M:]], dim=1)
    return torch.cat([p_raw, per_cond.flatten()])


def fit_batch(
    law_name: str,
    batch: Batch,
    space: str = "prob",
    starts: int = 8,
    seed: int = 0,
    max_iter: int = 300,
    theta0: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchFit:
    """Fit one law to every group of the batch at once; theta0 [G, R, D] replaces the generated starts."""
    law = get_law(law_name)
    G, C, M = batch.dims
    gen = torch.Generator().manual_seed(seed)  # starts are drawn on the CPU, the same on any device
    dev = batch.prob.device
    if isinstance(law, BayesianLaw):
        init = theta0 if theta0 is not None else law.starts(starts, M, C, gen).to(dev).expand(G, -1, -1)
        R = init.shape[1]
        result = levenberg_marquardt(
            _residual_fn(law, batch, space, lambda rows: rows // R), init.reshape(G * R, -1), max_iter,
            progress=progress, starts_of=torch.arange(G * R, device=dev) // R,
        )
        cost = result.cost.reshape(G, R)
        conv = result.converged.reshape(G, R)
        theta = result.theta.reshape(G, R, -1)
    else:
        P = law.per_curve
        if theta0 is not None:
            init = theta0.reshape(G, -1, C * M, P).transpose(0, 1).reshape(theta0.shape[1], G * C * M, P)
        else:
            init = law.starts(starts, _first_nll(batch).cpu(), gen).to(dev)
        R = init.shape[0]
        rows = init.transpose(0, 1).reshape(-1, P)  # curve-major: row = curve * R + start
        result = levenberg_marquardt(
            _residual_fn(law, batch, space, lambda r: r // R), rows, max_iter,
            progress=progress, starts_of=torch.arange(rows.shape[0], device=dev) // R,
        )
        # starts are independent per curve, so the best start is chosen per curve
        cost_c = result.cost.reshape(G * C * M, R)
        best = cost_c.argmin(1)
        pick = torch.arange(G * C * M, device=dev)
        theta_c = result.theta.reshape(G * C * M, R, P)[pick, best]
        conv_c = result.converged.reshape(G * C * M, R)[pick, best]
        cost = cost_c[pick, best].reshape(G, C * M).sum(1, keepdim=True)
        conv = conv_c.reshape(G, C * M).all(1, keepdim=True)
        theta = theta_c.reshape(G, 1, C * M * P)
    best = cost.argmin(1)
    pick = torch.arange(G, device=dev)
    theta_best = theta[pick, best]
    if isinstance(law, BayesianLaw):
        theta_best = torch.stack([canonical_order(law, t, M, C) for t in theta_best])
    return BatchFit(theta_best, cost[pick, best], conv[pick, best] & torch.isfinite(cost[pick, best]))


def _first_nll(batch: Batch) -> torch.Tensor:
    """Each curve's measured NLL at its first fitted shot [G*C*M], to scale the baselines' starts."""
    G, C, M = batch.dims
    w = batch.weight.reshape(G * C * M, -1) > 0
    first = w.float().argmax(1)  # 0 for a curve with no fitted point
    return batch.nll.reshape(G * C * M, -1)[torch.arange(G * C * M, device=w.device), first]


def predict(law_name: str, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int = 1) -> torch.Tensor:
    """log p [G, C, M, S] of fitted thetas [G, D] on shots [G, S] (or [S], shared)."""
    if shots.dim() == 1:
        shots = shots.expand(theta.shape[0], -1)
    with torch.no_grad():
        return get_law(law_name).log_prob(theta, shots.to(theta.dtype), M, C)


def nrmse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """RMSE over the masked points divided by the mean target there (inf when the prediction is not finite)."""
    if not mask.any():
        return float("nan")
    err = np.sqrt(np.mean((pred[mask] - target[mask]) ** 2)) / np.mean(target[mask])
    return float(err) if np.isfinite(err) else float("inf")


def split_masks(group: CurveGroup, split: str, fraction: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask, evaluation mask) [M, S]: all points twice, or shots <= f * max shots vs the rest."""
    mask = group.mask
    if split == "interpolation":
        return mask, mask
    cut = fraction * group.shots[mask.any(0)].max()
    early = (group.shots <= cut)[None, :]
    return mask & early, mask & ~early


def check_points(group: CurveGroup, law_name: str, split: str, fraction: float | None, fit_mask: np.ndarray,
                 eval_mask: np.ndarray) -> None:
    """Refuse a fit that has fewer points than parameters (per curve for the baselines)."""
    law = get_law(law_name)
    where = f"run {group.run}, k {group.k}, {split}" + (f" (fit fraction {fraction})" if fraction else "")
    hint = "raise --fit-fraction, measure more shots, or leave the law out with --laws"
    if isinstance(law, BayesianLaw):
        n, need = int(fit_mask.sum()), law.n_params(group.n_tasks)
        if n < need:
            raise ValueError(f"{where}: {law_name} has {need} parameters but only {n} points to fit; {hint}")
    else:
        n = int(fit_mask.sum(1).min())
        if n < law.per_curve:
            raise ValueError(f"{where}: {law_name} needs {law.per_curve} points per task curve, one has {n}; {hint}")
    if split == "extrapolation" and not eval_mask.any():
        raise ValueError(f"{where}: no shots beyond the fit range to evaluate; lower --fit-fraction")


def stack_groups(groups: list[CurveGroup], fit_masks: list[np.ndarray]) -> Batch:
    """Pad groups (all with the same M) to a common number of shots; C = 1."""
    S = max(len(g.shots) for g in groups)
    M = groups[0].n_tasks
    shots = np.zeros((len(groups), S))
    arrays = np.zeros((3, len(groups), 1, M, S))
    for j, (g, fm) in enumerate(zip(groups, fit_masks)):
        s = len(g.shots)
        shots[j, :s], shots[j, s:] = g.shots, g.shots[-1]
        arrays[0, j, 0, :, :s] = np.nan_to_num(g.prob)
        arrays[1, j, 0, :, :s] = np.nan_to_num(g.nll)
        arrays[2, j, 0, :, :s] = fm
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return Batch(t(shots), t(arrays[0]), t(arrays[1]), t(arrays[2]))


def _progress(law_name: str, total: int, stream) -> Callable[[int, int], None]:
    last = [time.perf_counter()]

    def report(it: int, active: int) -> None:
        if time.perf_counter() - last[0] > 2.0:
            last[0] = time.perf_counter()
            print(f"  {law_name}: iteration {it}, {active}/{total} starts still improving", file=stream, flush=True)

    return report


def fit_groups(groups: list[CurveGroup], config: FitConfig, stream=None) -> list[FitResult]:
    """Fit every law to every group on every split; one batched optimisation per (law, number of tasks).
    Progress goes to `stream` (default: stderr)."""
    stream = stream or sys.stderr
    config.validate()
    jobs = [(g, s, f) for g in groups for s in config.splits for f in ([None] if s == "interpolation" else config.fractions)]
    masks = [split_masks(g, s, f) for g, s, f in jobs]
    for law_name in config.laws:
        for (g, s, f), (fm, em) in zip(jobs, masks):
            check_points(g, law_name, s, f, fm, em)
    results: list[FitResult] = []
    for li, law_name in enumerate(config.laws, start=1):
        law = get_law(law_name)
        t0 = time.perf_counter()
        for M in sorted({g.n_tasks for g, _, _ in jobs}):
            idx = [j for j, (g, _, _) in enumerate(jobs) if g.n_tasks == M]
            batch = stack_groups([jobs[j][0] for j in idx], [masks[j][0] for j in idx]).to(config.device)
            total = len(idx) * config.starts * (1 if isinstance(law, BayesianLaw) else M)
            fit = fit_batch(law_name, batch, config.space, config.starts, config.seed, config.max_iter,
                            progress=_progress(law_name, total, stream))
            log_p = predict(law_name, fit.theta, batch.shots, M)[:, 0].cpu().numpy()
            fit = BatchFit(fit.theta.cpu(), fit.loss.cpu(), fit.converged.cpu())
            for row, j in enumerate(idx):
                g, split, frac = jobs[j]
                S = len(g.shots)
                lp, em = log_p[row, :, :S], masks[j][1]
                n_fit = max(int(masks[j][0].sum()), 1)
                results.append(FitResult(
                    group=g, law=law_name, split=split, fraction=frac,
                    nrmse=nrmse(np.exp(lp), g.prob, em), nrmse_nll=nrmse(-lp, g.nll, em),
                    n_params=law.n_params(M), loss=float(2 * fit.loss[row]) / n_fit,
                    converged=bool(fit.converged[row]), params=law.named(fit.theta[row], M), theta=fit.theta[row],
                ))
        print(f"fitted {law_name} ({li}/{len(config.laws)}): {len(jobs)} fits x {config.starts} starts "
              f"in {time.perf_counter() - t0:.1f}s", file=stream, flush=True)
    return results
