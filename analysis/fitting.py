"""Batched, multi-start, float64 fits of the laws to curve groups, and their NRMSE.

All fits of one law (every group x split x fit fraction x start) of the same shape run as one batched
Levenberg-Marquardt problem; groups of other shapes run in their own batch, so no group is ever padded
for another and a group's fit is the same alone as in any batch. Starts are read off each group's own
curves. The best start of each fit is kept; `converged` means it reached the precision `tol` (TOL by
default): its Gauss-Newton step would lower chi-square by less than that, so it lies within sqrt(tol)
standard errors of the optimum of the (weakly regularised) least-squares objective (`analysis.lm`).
Standard errors come from J^T J at the optimum.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from analysis.curves import CurveGroup
from analysis.laws import LAW_NAMES, BayesianLaw, as_lists, get_law
from analysis.lm import LMResult, Stacked, levenberg_marquardt
from analysis.progress import Progress
from analysis.residuals import (
    RIDGE,  # noqa: F401 - the fit report quotes the prior's strength from here
    Batch,
    BatchFit,
    _best_starts,
    _residual_fn,
    ridge_of,
    theta_covariance,
)
from user_errors import UserError

SPLITS = ("interpolation", "extrapolation")
Space = Literal["prob", "nll"]  # squared error in probability or NLL space
SPACES = get_args(Space)
# Every fit stops once its objective would fall by less than this in chi-square (analysis.lm): the
# point is then within sqrt(TOL) = 0.1 standard errors of its optimum in any direction, so estimates
# move by a tenth of their standard errors at most, and intervals (+-1.96 standard errors) by 5% of
# their half-width; the resampled fits of an interval add (0.1)^2 = 1% to its variance.
TOL = 0.01


@dataclass
class FitConfig:
    """Which laws are fitted to which points, and how.

    Args:
        laws: laws to fit
        splits: interpolation (fit and score all points) and/or extrapolation (fit the first shots)
        fractions: extrapolation fits shots <= f x max shots; several values run several extrapolations
        space: squared error in probability (prob) or NLL (nll) space
        starts: optimiser starts per fit, read off the curves; the best is kept
        seed: seed of the random starts
        max_iter: Levenberg-Marquardt iteration limit
        device: where the fits run
        tol: precision: a fit stops once its chi-square would fall by less than this (within sqrt(tol)
            standard errors of its optimum; see TOL); smaller is tighter, 0 runs to rounding
    """

    laws: tuple[str, ...] = LAW_NAMES
    splits: tuple[str, ...] = SPLITS
    fractions: tuple[float, ...] = field(default=(0.1,), metadata={"flag": "fit-fraction"})
    space: Space = field(default="prob", metadata={"flag": "loss"})
    starts: int = 16
    seed: int = 0
    max_iter: int = 300
    device: str = "cpu"
    tol: float = TOL

    def __post_init__(self) -> None:  # checked where it is made (dataclasses.replace makes a new one)
        if not self.tol >= 0.0:
            raise UserError(f"tol {self.tol} must be 0 (to rounding) or more, in chi-square")
        for name in self.laws:
            get_law(name)
        for split in self.splits:
            if split not in SPLITS:
                raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if self.space not in SPACES:
            raise UserError(f"unknown loss space {self.space!r}; choose prob or nll")
        if any(not 0.0 < f < 1.0 for f in self.fractions):
            raise UserError(f"fit fractions {list(self.fractions)} must lie strictly between 0 and 1")
        if self.starts < 1 or self.max_iter < 1:
            raise UserError(f"starts ({self.starts}) and max_iter ({self.max_iter}) must be at least 1")


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
    stderr: dict  # same keys and shapes as params
    theta: torch.Tensor = field(repr=False)


def fit_batch(
    law_name: str,
    batch: Batch,
    space: str = FitConfig.space,
    starts: int = FitConfig.starts,
    seed: int = FitConfig.seed,
    max_iter: int = FitConfig.max_iter,
    extra_starts: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    tol: float = TOL,
) -> BatchFit:
    """Fit one law to every group of the batch at once from `starts` data-driven starts per group;
    extra_starts [G, E, D] are tried beside them (e.g. a known good point); tol: the precision in
    chi-square (see fit_batches)."""
    return fit_batches(law_name, [batch], space, starts, seed, max_iter, [extra_starts], progress, tol)[0]


def fit_batches(
    law_name: str,
    batches: list[Batch],
    space: str = FitConfig.space,
    starts: int = FitConfig.starts,
    seed: int = FitConfig.seed,
    max_iter: int = FitConfig.max_iter,
    extra_starts: list[torch.Tensor | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    tol: float = TOL,
) -> list[BatchFit]:
    """`fit_batch` of several batches (of other shapes, the same parameter count) in one optimisation
    loop: each keeps its own residuals, and the rows of all advance together, so the loop's fixed cost
    per iteration is paid once, not once per batch. Each batch's fit equals its fit alone.

    Each fit stops once the objective would fall by less than `tol` in chi-square (levenberg_marquardt).
    Where a batch has counts, its fits are unweighted and chi-square is the squared residuals over the
    smaller of the points' mean sampling variance (from the counts) and the residual variance at the
    point (per group for a Bayesian law, per curve for a baseline, whose curves are fitted apart); where
    it has none, the weights make the residuals units of their noise and chi-square is their squared sum."""
    law = get_law(law_name)
    extra_starts = extra_starts or [None] * len(batches)
    parts, inits, ridges, n_starts, dofs, noises = [], [], [], [], [], []
    for batch, extra in zip(batches, extra_starts):
        G, C, M = batch.dims
        gen = torch.Generator().manual_seed(seed)  # starts are drawn on the CPU, the same on any device
        dev = batch.prob.device
        if isinstance(law, BayesianLaw):
            init = law.starts(starts, batch.prob, batch.weight, batch.shots, gen)
            init = init if extra is None else torch.cat([init, extra.to(dev)], 1)
            R = init.shape[1]
            rows, per_row = init.reshape(G * R, -1), ridge_of(batch).repeat_interleave(R)
            if batch.count is not None:
                fitted = (batch.weight > 0).sum((1, 2, 3))
                dofs.append((fitted - law.n_params(M, C)).repeat_interleave(R))
                noises.append((batch.noise(space).sum((1, 2, 3)) / fitted.clamp_min(1)).repeat_interleave(R))
        else:
            P = law.per_curve
            init = law.starts(starts, _first_nll(batch).cpu(), gen).to(dev)  # [R, G*C*M, P]
            if extra is not None:
                extra = extra.reshape(G, -1, C * M, P).transpose(0, 1).reshape(-1, G * C * M, P)
                init = torch.cat([init, extra.to(dev)], 0)
            R = init.shape[0]
            rows = init.transpose(0, 1).reshape(-1, P)  # curve-major: row = curve * R + start
            per_row = ridge_of(batch).repeat_interleave(C * M * R)
            if batch.count is not None:
                fitted = (batch.weight > 0).sum(-1).reshape(-1)
                dofs.append((fitted - P).repeat_interleave(R))
                noises.append((batch.noise(space).sum(-1).reshape(-1) / fitted.clamp_min(1)).repeat_interleave(R))
        parts.append(_residual_fn(law, batch, space, lambda r, R=R: r // R))
        inits.append(rows)
        ridges.append(per_row)
        n_starts.append(R)
    if len(set(n_starts)) > 1:
        raise ValueError("batches fitted together need the same number of starts per fit")
    if 0 < len(noises) < len(batches):
        raise ValueError("batches fitted together must all have counts or all be whitened")
    sizes = [len(rows) for rows in inits]
    theta0 = torch.cat(inits)
    result = levenberg_marquardt(
        Stacked(parts, sizes) if len(parts) > 1 else parts[0], theta0, max_iter, ridge=torch.cat(ridges),
        progress=progress, starts_of=torch.arange(len(theta0), device=theta0.device) // n_starts[0],
        tol=tol, noise=torch.cat(noises).to(theta0.dtype) if noises else None,
        dof=torch.cat(dofs).to(theta0.dtype) if dofs else None,
    )
    fits, offset = [], 0
    for batch, size in zip(batches, sizes):
        rows = slice(offset, offset + size)
        offset += size
        part = LMResult(result.theta[rows], result.cost[rows], result.objective[rows], result.converged[rows],
                        result.iterations)
        fits.append(_best_starts(law, batch, part, n_starts[0]))
    return fits


def undetermined(value: object, stderr: object) -> np.ndarray:
    """Where the data do not determine a parameter: its standard error exceeds its value (or is not finite)."""
    return ~(np.asarray(stderr, dtype=float) <= np.abs(np.asarray(value, dtype=float)))


def flat_params(params: dict) -> dict[str, float]:
    """Named parameters (scalars and arrays) as one float per entry: K, priors[0], P[1,2], ..."""
    out = {}
    for key, value in params.items():
        array = np.asarray(value, dtype=float)
        if array.ndim == 0:
            out[key] = float(array)
        else:
            for index, entry in np.ndenumerate(array):
                out[f"{key}[{','.join(map(str, index))}]"] = float(entry)
    return out


def named_stderr(law_name: str, theta: torch.Tensor, cov: torch.Tensor, M: int, C: int = 1) -> dict:
    """Standard errors of the interpretable parameters (delta method), keyed and shaped like `named`."""
    return named_stderrs(law_name, theta[None], cov[None], M, C)[0]


def named_stderrs(law_name: str, theta: torch.Tensor, cov: torch.Tensor, M: int, C: int = 1) -> list[dict]:
    """`named_stderr` of many fits at once: theta [G, D], cov [G, D, D] -> G dicts."""
    law = get_law(law_name)
    named = law.named_tensors(theta[0], M, C)
    theta = theta.detach().requires_grad_(True)
    values = torch.stack([torch.cat([v.flatten() for v in law.named_tensors(t, M, C).values()]) for t in theta])
    # rows are independent, so one backward pass of an entry summed over the rows gives every row's
    # gradient of it (torch.func would do the same through a compiler stack that takes a second to import)
    jac = torch.stack([torch.autograd.grad(values[:, e].sum(), theta, retain_graph=True)[0]
                       for e in range(values.shape[1])], 1).detach()  # [G, entries, D]
    theta = theta.detach()
    sd = ((jac @ cov) * jac).sum(-1).clamp_min(0).sqrt()
    sizes = [v.numel() for v in named.values()]
    per_condition = ("priors", "K") if isinstance(law, BayesianLaw) else law.param_names
    return [as_lists({k: part.reshape(v.shape) for (k, v), part in zip(named.items(), row.split(sizes))},
                     C, per_condition)
            for row in sd]


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


def unfittable(group: CurveGroup, law_name: str, split: str, fraction: float | None, fit_mask: np.ndarray,
               eval_mask: np.ndarray) -> str | None:
    """Why this law cannot be fitted to this group on this split (too few points), or None."""
    law = get_law(law_name)
    where = f"{law_name} on run {group.run}, k {group.k}, {split}" + (f" (fit fraction {fraction})" if fraction else "")
    if isinstance(law, BayesianLaw):
        n, need = int(fit_mask.sum()), law.n_params(group.n_tasks)
        if n < need:
            return f"{where}: {need} parameters but only {n} points to fit"
    else:
        n = int(fit_mask.sum(1).min())
        if n < law.per_curve:
            return f"{where}: needs {law.per_curve} points per task curve, one has {n}"
    if split == "extrapolation" and not eval_mask.any():
        return f"{where}: no shots beyond the fit range to evaluate"
    return None


def stack_groups(groups: list[CurveGroup], fit_masks: list[np.ndarray]) -> Batch:
    """Groups of one shape (tasks x shots) as one batch, C = 1. Groups are never padded to another's
    shape: that would change the arithmetic of their fit, and a group must fit the same in any batch."""
    if len({g.prob.shape for g in groups}) > 1:
        raise ValueError("stack_groups needs groups with the same number of tasks and shots; batch each shape apart")
    t = lambda a: torch.as_tensor(np.stack(a), dtype=torch.float64)  # noqa: E731
    return Batch(t([g.shots for g in groups]), t([np.nan_to_num(g.prob)[None] for g in groups]),
                 t([np.nan_to_num(g.nll)[None] for g in groups]), t([fm[None].astype(np.float64) for fm in fit_masks]),
                 t([np.nan_to_num(g.count, nan=1.0)[None] for g in groups]))


@dataclass
class FitJob:
    group: CurveGroup
    split: str
    fraction: float | None
    fit_mask: np.ndarray
    eval_mask: np.ndarray


def plan_fits(groups: list[CurveGroup], config: FitConfig) -> list[FitJob]:
    """Every (group, split, fit fraction) that the config asks for."""
    return [FitJob(g, s, f, *split_masks(g, s, f)) for g in groups for s in config.splits
            for f in ([None] if s == "interpolation" else config.fractions)]


def skipped_fits(jobs: list[FitJob], config: FitConfig) -> list[str]:
    """One line for each (law, job) that cannot be fitted; fit_groups leaves these out."""
    reasons = (unfittable(j.group, law, j.split, j.fraction, j.fit_mask, j.eval_mask)
               for law in config.laws for j in jobs)
    return [r for r in reasons if r is not None]


def fit_groups(groups: list[CurveGroup], config: FitConfig, stream=None) -> list[FitResult]:
    """Fit every law to every group on every split: the groups of one (tasks, shots grid) shape form one
    batch, and a law's batches with the same parameter count run in one optimisation loop. Fits that
    `skipped_fits` names are left out. Progress goes to `stream` (default: stderr)."""
    jobs = plan_fits(groups, config)
    plan = []  # (law, loop key, buckets: jobs of one (M, S) shape the law can fit)
    for law_name in config.laws:
        law = get_law(law_name)
        todo = [j for j in jobs if unfittable(j.group, law_name, j.split, j.fraction, j.fit_mask, j.eval_mask) is None]
        shapes = sorted({(j.group.n_tasks, len(j.group.shots)) for j in todo})
        buckets = [[j for j in todo if (j.group.n_tasks, len(j.group.shots)) == shape] for shape in shapes]
        # a Bayesian law's parameter count depends on the tasks; a baseline's (per curve) does not
        keys = sorted({b[0].group.n_tasks if isinstance(law, BayesianLaw) else 0 for b in buckets})
        plan += [(law_name, [b for b in buckets if (b[0].group.n_tasks if isinstance(law, BayesianLaw) else 0) == key])
                 for key in keys]

    def work(law_name: str, bucket: list) -> float:
        """Jacobian entries of the bucket's fits, a proxy for their time: baselines' curves are independent."""
        law, M, S = get_law(law_name), bucket[0].group.n_tasks, len(bucket[0].group.shots)
        return len(bucket) * law.n_params(M) * S * (M if isinstance(law, BayesianLaw) else 1)

    progress = Progress(f"fit of {len(groups)} curve groups, {len(config.laws)} laws",
                        sum(work(law, b) for law, buckets in plan for b in buckets), stream)
    results: list[FitResult] = []
    for law_name, buckets in plan:
        law = get_law(law_name)
        batches = [stack_groups([j.group for j in b], [j.fit_mask for j in b]).to(config.device) for b in buckets]
        total = sum(len(b) * config.starts * (1 if isinstance(law, BayesianLaw) else b[0].group.n_tasks)
                    for b in buckets)
        fits = fit_batches(law_name, batches, config.space, config.starts, config.seed, config.max_iter,
                           tol=config.tol,
                           progress=lambda it, active, total=total: progress.update(
                               0, f"iteration {it}, {active}/{total} starts improving"))
        for bucket, batch, fit in zip(buckets, batches, fits):
            M = bucket[0].group.n_tasks
            log_p = predict(law_name, fit.theta, batch.shots, M)[:, 0].cpu().numpy()
            theta, loss, converged = fit.theta.cpu(), fit.loss.cpu(), fit.converged.cpu()
            cov = theta_covariance(law_name, batch.to("cpu"), theta, config.space)
            stderrs = named_stderrs(law_name, theta, cov, M)
            for row, j in enumerate(bucket):
                n_fit = max(int(j.fit_mask.sum()), 1)
                results.append(FitResult(
                    group=j.group, law=law_name, split=j.split, fraction=j.fraction,
                    nrmse=nrmse(np.exp(log_p[row]), j.group.prob, j.eval_mask),
                    nrmse_nll=nrmse(-log_p[row], j.group.nll, j.eval_mask),
                    n_params=law.n_params(M), loss=float(2 * loss[row]) / n_fit, converged=bool(converged[row]),
                    params=law.named(theta[row], M), stderr=stderrs[row],
                    theta=theta[row],
                ))
        shapes = ", ".join(f"{len(b)} of {b[0].group.n_tasks} tasks x {len(b[0].group.shots)} shots" for b in buckets)
        progress.done(sum(work(law_name, b) for b in buckets), f"{law_name} done ({shapes})")
    progress.close()
    return results
