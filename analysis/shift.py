"""How post-training moves the Bayesian law's parameters: joint vs free fits, intervals, reemergence.

The runs of one model and k are its conditions (pretrained baseline, SFT/DPO at several amounts).
The joint fit shares P (or gamma, beta) across conditions and gives each its own priors and K; the free
fit refits everything per condition, starting also from the joint fit's values, so it is never worse. Both are weighted least squares with each point's sampling error
sqrt(p(1-p)/count), i.e. maximum likelihood under that Gaussian noise model, so their chi-square,
AIC and BIC compare them; so does NRMSE on held-out late shots.

The law is chosen at each k by the evidence unless it is given: the joint fit of each of the three
Bayesian laws to all shots, and the law of the lowest BIC (chi-square + parameters x log points) is
used; every law's score and its estimates of the priors are kept beside it (`LawChoice`).

Every fit stops at the precision `tol` in chi-square (analysis.lm; the residuals here are in units of
their sampling error). Intervals are normal bootstrap intervals on a link scale (logit for
probabilities, log for K, log(1 + n) for shots): estimate +- z x the standard deviation of the
resampled estimates there, each resampled table fitted from the table's own fit (near its optimum) and
a few starts of its own. They always contain
the estimate and stay inside the parameter's range. Where the resampled fits agree more closely than
the curvature of the fit allows (all stopping at the same place in a direction the data leave open),
the curvature's standard deviation is used instead, and a parameter whose standard error exceeds its
value is marked as not determined by the data.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import re
import statistics
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch

from analysis.curves import CONDITION_COLUMNS, CurveGroup, standard_error
from analysis.fitting import TOL, Batch, BatchFit, fit_batch, named_stderr, named_stderrs, nrmse, predict, theta_covariance, undetermined
from analysis.laws import BAYESIAN_NAMES, BayesianLaw, get_law
from analysis.progress import Progress
from user_errors import UserError

FITS = ("shared", "free")
TIED_NAMES = tuple(name for name in BAYESIAN_NAMES if get_law(name).tying != "none")


@dataclass
class ShiftConfig:
    """The shift analysis of one curves table: its reference, its law, its fits and its intervals.

    Args:
        baseline: run label of the pretrained model (the reference condition)
        law: Bayesian law to fit: bayesian, bayesian_sampling or bayesian_scoring (default: at each k, the one
            whose joint fit has the lowest BIC; laws.csv has every law's score)
        holdout_fraction: held-out comparison fits shots <= f x max
        resamples: resampled tables for the intervals
        level: interval coverage
        threshold: reemergence threshold (default: the baseline's zero-shot probability of each task)
        starts: optimiser starts of the joint and free fits of the table
        resample_starts: starts per resampled table, beside the table's own fit
        seed: seed of the starts and the resampling
        max_iter: Levenberg-Marquardt iteration limit of every fit
        workers: processes fitting the k values at once (0: one per k and CPU when the table is large)
        tol: precision: every fit stops once its chi-square would fall by less than this (within sqrt(tol)
            standard errors of its optimum; analysis.fitting.TOL); smaller is tighter, 0 runs to rounding
    """

    baseline: str
    law: str | None = None
    holdout_fraction: float = 0.5
    resamples: int = 100
    level: float = 0.95
    threshold: float | None = None
    starts: int = 16
    resample_starts: int = 2
    seed: int = 0
    max_iter: int = 300
    workers: int = 0  # see workers_for
    tol: float = TOL

    def __post_init__(self) -> None:  # checked where it is made (dataclasses.replace makes a new one)
        if self.law is not None and self.law not in BAYESIAN_NAMES:
            raise UserError(f"shift needs a Bayesian law, not {self.law!r}; choose from {', '.join(BAYESIAN_NAMES)} "
                             "(or leave it out to choose by the evidence)")
        if not self.tol >= 0.0:
            raise UserError(f"tol {self.tol} must be 0 (to rounding) or more, in chi-square")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UserError(f"holdout_fraction {self.holdout_fraction} must lie strictly between 0 and 1")
        if not 0.0 < self.level < 1.0:
            raise UserError(f"level {self.level} must lie strictly between 0 and 1")
        if self.starts < 1:
            raise UserError(f"starts {self.starts} must be at least 1")
        if self.workers < 0:
            raise UserError(f"workers {self.workers} must be 0 (automatic) or more")
        if self.resample_starts < 0:
            raise UserError(f"resample_starts {self.resample_starts} must be 0 or more")
        if self.resamples < 2:
            raise UserError(f"resamples {self.resamples} must be at least 2 to give an interval")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise UserError(f"threshold {self.threshold} must be a probability in (0, 1)")


@dataclass
class Conditions:
    """The C runs of one model at one k on a common shots grid: arrays [C, M, S], NaN where unmeasured."""

    k: int
    groups: list[CurveGroup]
    shots: np.ndarray
    prob: np.ndarray
    count: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return ~np.isnan(self.prob)

    @property
    def sd(self) -> np.ndarray:
        return standard_error(np.nan_to_num(self.prob, nan=0.5), np.nan_to_num(self.count, nan=1.0))


@dataclass
class ModelFit:
    """One of the two models at one k: parameters per condition, with resampled parameters for intervals."""

    name: str
    law: str
    theta: torch.Tensor  # shared: [1, D]; free: [C, D]
    stderr: list[dict]  # per condition, keyed like named_per_condition
    n_params: int
    chi2: float
    heldout_nrmse: float
    converged: bool
    held_theta: torch.Tensor = field(repr=False)  # the fit to early shots, like theta
    resampled: torch.Tensor = field(repr=False)  # [R, ...] thetas of the resampled fits


def model_key(group: CurveGroup) -> str:
    """Which model a run belongs to: its `model` or `layers` column when present, else the run label
    before '/'; runs without a '/' all belong to one model."""
    return group.extra.get("model") or group.extra.get("layers") or (group.run.split("/")[0] if "/" in group.run else "")


def condition_label(group: CurveGroup) -> str:
    parts = dict.fromkeys(group.extra.get(c, "") for c in CONDITION_COLUMNS)  # e.g. stage and method both "sft"
    return "-".join(p for p in parts if p) or group.run


# The order of conditions in every table and plot: the baseline, then these methods and directions in
# turn (others after them, by name), each by amount ascending.
METHOD_ORDER = ("sft", "dpo")
DIRECTION_ORDER = ("favor", "disfavor")


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def condition_fields(run: str, columns: Mapping[str, object] | None = None) -> tuple[str, str, float]:
    """A condition's method, direction and amount (NaN: none): from the curves table's `method`,
    `direction` and `amount` columns where they are filled, else read off the run label's words after
    the model's '/' (e.g. gpt2-2l/sft-favor-128, posttrain-dpo-disfavor-32, or just 30)."""
    columns = columns or {}
    words = re.split(r"[-_]", run.split("/", 1)[-1])
    method = str(columns.get("method") or next((w for w in words if w in METHOD_ORDER), ""))
    direction = str(columns.get("direction") or next((w for w in words if w in DIRECTION_ORDER), ""))
    amount = _number(columns.get("amount"))
    if math.isnan(amount):
        amount = next((x for x in map(_number, reversed(words)) if not math.isnan(x)), math.nan)
    return method, direction, amount


def condition_key(run: str, columns: Mapping[str, object] | None = None) -> tuple:
    """Sort key of a condition (see condition_fields for what it reads): the baseline (no method,
    direction or amount other than 0) first; then SFT favour, SFT disfavour, DPO favour, DPO disfavour,
    other methods and directions by name; within each, amounts as numbers, ascending."""
    method, direction, amount = condition_fields(run, columns)
    baseline = not method and not direction and (math.isnan(amount) or amount == 0)

    def rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)

    return (not baseline, *rank(method, METHOD_ORDER), *rank(direction, DIRECTION_ORDER),
            math.isnan(amount), np.nan_to_num(amount), run)


def select_conditions(groups: list[CurveGroup], baseline: str) -> list[Conditions]:
    """The baseline's model at each k it was measured, baseline first, then in condition_key's order."""
    base = [g for g in groups if g.run == baseline]
    if not base:
        runs = ", ".join(dict.fromkeys(g.run for g in groups))
        raise UserError(f"baseline run {baseline!r} is not in the curves table; choose one of: {runs}")
    out = []
    for b in base:
        same = [g for g in groups if g.k == b.k and model_key(g) == model_key(b) and g is not b]
        same.sort(key=lambda g: condition_key(g.run, g.extra))
        if any(g.n_tasks != b.n_tasks for g in same):
            raise UserError(f"runs of model {model_key(b)} at k {b.k} differ in their number of tasks; "
                             "measure every condition on the same tasks")
        out.append(_common_grid(b.k, [b, *same]))
    return out


def _common_grid(k: int, groups: list[CurveGroup]) -> Conditions:
    shots = np.array(sorted(set().union(*[set(g.shots.tolist()) for g in groups])))
    prob = np.full((len(groups), groups[0].n_tasks, len(shots)), np.nan)
    count = prob.copy()
    for c, g in enumerate(groups):
        cols = np.searchsorted(shots, g.shots)
        prob[c][:, cols], count[c][:, cols] = g.prob, g.count
    return Conditions(k, groups, shots, prob, count)


def _batch(cond: Conditions, prob: np.ndarray, fit_mask: np.ndarray, shared: bool) -> Batch:
    """prob [R, C, M, S] (R resamples) -> a batch of R joint problems or R*C per-condition problems."""
    R, C, M, S = prob.shape
    weight = np.where(fit_mask, 1.0 / cond.sd, 0.0)[None].repeat(R, 0)
    shape = (R, C, M, S) if shared else (R * C, 1, M, S)
    t = lambda a: torch.as_tensor(np.nan_to_num(a), dtype=torch.float64).reshape(shape)  # noqa: E731
    shots = torch.as_tensor(cond.shots, dtype=torch.float64).expand(shape[0], S)
    nll = -np.log(np.clip(prob, 1e-12, None))
    return Batch(shots, t(prob), t(nll), t(weight))


def _fit(cond: Conditions, prob: np.ndarray, fit_mask: np.ndarray, shared: bool, config: ShiftConfig,
         starts: int, extra_starts: torch.Tensor | None = None, law: str | None = None) -> BatchFit:
    """Fits of `law` (default: config.law) to prob [R, C, M, S], each stopping at config.tol in chi-square."""
    return fit_batch(law or config.law, _batch(cond, prob, fit_mask, shared), starts=starts, seed=config.seed,
                     max_iter=config.max_iter, extra_starts=extra_starts, tol=config.tol)


def log_prob(law_name: str, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int, shared: bool) -> torch.Tensor:
    """log p [..., C, M, S] of shared thetas [..., D] or free thetas [..., C, D]."""
    lead = theta.shape[:-1] if shared else theta.shape[:-2]
    flat = theta.reshape(-1, theta.shape[-1])
    lp = predict(law_name, flat, shots, M, C if shared else 1)
    return lp.reshape(*lead, C, M, -1)


def per_condition_thetas(law_name: str, theta: torch.Tensor, M: int, C: int) -> torch.Tensor:
    """A joint theta [D] as C single-condition thetas [C, D']: the shared P part with each condition's own block."""
    p = get_law(law_name).p_size(M)
    return torch.cat([theta[:p].expand(C, p), theta[p:].reshape(C, M)], 1)


def _fit_to(mask: np.ndarray, cond: Conditions, config: ShiftConfig, joint_theta: torch.Tensor | None = None,
            law: str | None = None, tied: Mapping[str, BatchFit] | None = None) -> BatchFit:
    """The joint fit to the points in `mask`, or, given the joint fit's theta [D], the free fit, which
    starts also from each condition's part of it; of `law` (default: config.law). The original law's joint
    fit starts also from the tied laws' joint fits to the same points (`tied`, made here if not given):
    it contains them, so it never fits worse, and from its data-driven starts alone it often ended far
    from its optimum."""
    C, M, _ = cond.prob.shape
    law = law or config.law
    if joint_theta is not None:
        start = per_condition_thetas(law, joint_theta, M, C)[:, None]
    elif get_law(law).tying == "none":
        tied = tied or {name: _fit_to(mask, cond, config, law=name) for name in TIED_NAMES}
        start = torch.stack([_as_original(name, fit.theta[0], M) for name, fit in tied.items()])[None]
    else:
        start = None
    return _fit(cond, cond.prob[None], mask, joint_theta is None, config, config.starts, start, law)


def _n_params(law_name: str, M: int, C: int, shared: bool) -> int:
    law = get_law(law_name)
    return law.n_params(M, C) if shared else C * law.n_params(M)


def fit_model(cond: Conditions, config: ShiftConfig, resamples: np.ndarray, nested_in: ModelFit | None = None,
              full: BatchFit | None = None) -> ModelFit:
    """The joint fit, or, given the joint fit as `nested_in`, the free fit, which also starts from the
    joint fit's parameters of each condition: the free model contains the joint one, so its fit is never
    worse, and a condition whose curves the data-driven starts miss still gets its optimum. config.law
    must be set (see choose_law); `full`, the fit to all shots when it was made already.

    Fits on all shots (for the criterion and the parameters) and on early shots (for held-out NRMSE)
    use `starts` starts each; each resampled table (for the intervals) starts from the full fit, which
    lies near its optimum, and from `resample_starts` more read off that table."""
    shared = nested_in is None
    law = config.law
    C, M, S = cond.prob.shape
    cut = config.holdout_fraction * cond.shots[cond.mask.any((0, 1))].max()
    early = cond.mask & (cond.shots <= cut)
    full = full or _fit_to(cond.mask, cond, config, None if shared else nested_in.theta[0])
    held = _fit_to(early, cond, config, None if shared else nested_in.held_theta[0])
    shots = torch.as_tensor(cond.shots, dtype=torch.float64)
    theta_held = held.theta[0] if shared else held.theta
    pred = log_prob(law, theta_held, shots, M, C, shared).exp().numpy()
    heldout = nrmse(pred, np.nan_to_num(cond.prob), cond.mask & ~early)
    R = resamples.shape[0]
    start = full.theta[None].expand(R, -1, -1) if shared else full.theta[None, :, None].expand(R, C, 1, -1)
    boot = _fit(cond, resamples, cond.mask, shared, config, config.resample_starts,
                start.reshape(R * (1 if shared else C), 1, -1))
    n_params = _n_params(law, M, C, shared)
    resampled = boot.theta.reshape(R, -1) if shared else boot.theta.reshape(R, C, -1)
    cov = theta_covariance(law, _batch(cond, cond.prob[None], cond.mask, shared), full.theta, noise_known=True)
    if shared:
        named = named_stderr(law, full.theta[0], cov[0], M, C)
        stderr = [{**named, "priors": named["priors"][c], "K": named["K"][c]} for c in range(C)]
    else:
        stderr = named_stderrs(law, full.theta, cov, M)
    return ModelFit("shared" if shared else "free", law, full.theta, stderr, n_params, float(2 * full.loss.sum()),
                    heldout, bool(full.converged.all()), held.theta, resampled)


def bic(chi2: float, n_params: int, n_points: int) -> float:
    """Schwarz's criterion: chi-square (-2 log likelihood up to a constant) + parameters x log points."""
    return chi2 + n_params * math.log(n_points)


@dataclass
class LawScore:
    """One Bayesian law's joint fit (P shared, priors and K per condition) to all shots at one k."""

    law: str
    n_params: int
    chi2: float
    bic: float
    converged: bool
    priors: np.ndarray  # [C, M] joint-fit priors of each condition


@dataclass
class LawChoice:
    """The law used at one k: `law`, chosen by BIC among `scores` (every law's joint fit), or given."""

    k: int
    law: str
    chosen: bool  # False: the law was given (`law`), and scores holds it alone
    scores: list[LawScore]


def law_scores(cond: Conditions, config: ShiftConfig, laws: Collection[str]) -> tuple[list[LawScore], dict[str, BatchFit]]:
    """The joint fit of each law to all shots of one k, with its chi-square, BIC and priors. The tied
    laws are fitted first; the original law starts also from their fits (see _fit_to)."""
    C, M, _ = cond.prob.shape
    n_points = int(cond.mask.sum())
    scores, fits = [], {}
    for law in sorted(laws, key=lambda name: get_law(name).tying == "none"):  # the original law last
        fits[law] = _fit_to(cond.mask, cond, config, law=law,
                            tied={name: fits[name] for name in TIED_NAMES if name in fits} or None)
    for law in laws:
        fit = fits[law]
        chi2, n = float(2 * fit.loss.sum()), _n_params(law, M, C, True)
        priors = np.array([p["priors"] for p in named_per_condition(law, fit.theta, True, M, C)])
        scores.append(LawScore(law, n, chi2, bic(chi2, n, n_points), bool(fit.converged.all()), priors))
    return sorted(scores, key=lambda score: BAYESIAN_NAMES.index(score.law)), fits


def _as_original(law_name: str, theta: torch.Tensor, M: int) -> torch.Tensor:
    """A tied law's theta [D] as the original law's: P's M x M logits from its gamma and beta, the same
    priors and K."""
    law = get_law(law_name)
    log_P = law.log_P(theta[: law.p_size(M)], M)
    return torch.cat([(log_P - torch.log1p(-log_P.exp().clamp(max=1 - 1e-16))).flatten(), theta[law.p_size(M):]])


def fit_shared(cond: Conditions, config: ShiftConfig, resamples: np.ndarray) -> tuple[LawChoice, ModelFit]:
    """The law of one k (config.law, or the lowest BIC of the three Bayesian laws' joint fits) and its
    joint fit with intervals."""
    scores, fits = law_scores(cond, config, BAYESIAN_NAMES if config.law is None else (config.law,))
    best = min(scores, key=lambda score: score.bic)
    choice = LawChoice(cond.k, best.law, config.law is None, scores)
    return choice, fit_model(cond, dataclasses.replace(config, law=best.law), resamples, full=fits[best.law])


def fit_free(cond: Conditions, config: ShiftConfig, resamples: np.ndarray, shared: ModelFit) -> ModelFit:
    """The free fit of one k, of the law of its joint fit."""
    return fit_model(cond, dataclasses.replace(config, law=shared.law), resamples, shared)


def resample_table(cond: Conditions, R: int, rng: np.random.Generator,
                   prompt_probs: dict | None = None) -> np.ndarray:
    """R resampled tables [R, C, M, S]: a bootstrap over prompts where per-prompt probabilities are
    given ({(run, task): [prompts, S]}), otherwise each point redrawn from its count-based sampling error."""
    sample = np.clip(cond.prob[None] + rng.standard_normal((R, *cond.prob.shape)) * cond.sd[None], 1e-6, 1 - 1e-6)
    for c, g in enumerate(cond.groups):
        for i in range(cond.prob.shape[1]):
            table = (prompt_probs or {}).get((g.run, g.k, i))
            if table is not None:
                if table.shape[1] != len(g.shots):
                    raise UserError(f"per-prompt table of run {g.run}, k {g.k}, task {i} has {table.shape[1]} shot "
                                     f"counts, the curves table {len(g.shots)}; write both from the same measurement")
                pick = rng.integers(table.shape[0], size=(R, table.shape[0]))
                cols = np.searchsorted(cond.shots, g.shots)
                sample[:, c, i][:, cols] = table[pick].mean(1)
    return sample


def crossing(shots: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """First shot count where prob reaches the threshold, linearly interpolated; inf if never."""
    above = np.nonzero(prob >= threshold)[0]
    if len(above) == 0:
        return math.inf
    j = above[0]
    if j == 0:
        return float(shots[0])
    x0, x1, y0, y1 = shots[j - 1], shots[j], prob[j - 1], prob[j]
    return float(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0))


def predicted_crossings(law_name: str, theta: torch.Tensor, shared: bool, M: int, C: int, horizon: float,
                        thresholds: np.ndarray, refine: int = 10) -> np.ndarray:
    """Shots at which the law's p_i(n) first reaches threshold_i, per condition and task [..., C, M]; inf beyond horizon.

    The law is evaluated on every `refine`-th point of a fine grid (0.05 shots to 20, then 0.2% steps),
    and on the fine points only between the last coarse point below and the first at or above."""
    grid = np.concatenate([np.arange(0.0, 20.0, 0.05), np.geomspace(20.0, horizon, 2000)])
    lead = theta.shape[:-1] if shared else theta.shape[:-2]
    single = theta.reshape(-1, theta.shape[-1])
    if shared:
        single = torch.cat([per_condition_thetas(law_name, t, M, C) for t in single])
    coarse = np.arange(0, len(grid) + refine - 1, refine).clip(max=len(grid) - 1)
    p = predict(law_name, single, torch.as_tensor(grid[coarse]), M)[:, 0].exp().numpy()  # [N, M, coarse]
    reached = p >= thresholds[None, :, None]
    first = np.where(reached.any(-1), reached.argmax(-1), -1)  # [N, M]
    out = np.full(first.shape, math.inf)
    out[first == 0] = grid[0]
    rows, tasks = np.nonzero(first > 0)
    if len(rows):
        window = coarse[first[rows, tasks] - 1][:, None] + np.arange(refine + 1)  # fine points in between
        window = window.clip(max=len(grid) - 1)
        fine = predict(law_name, single[rows], torch.as_tensor(grid[window]), M).exp().numpy()
        fine = fine[np.arange(len(rows)), 0, tasks]  # [pairs, refine + 1]
        out[rows, tasks] = [crossing(grid[w], f, thresholds[i]) for w, f, i in zip(window, fine, tasks)]
    return out.reshape(*lead, C, M)


def named_per_condition(law_name: str, theta: torch.Tensor, shared: bool, M: int, C: int) -> list[dict]:
    """Interpretable parameters of each condition: priors [M], K, and P or gamma, beta."""
    law: BayesianLaw = get_law(law_name)
    if shared:
        named = law.named(theta.reshape(-1), M, C)
        return [{**named, "priors": named["priors"][c], "K": named["K"][c]} for c in range(C)]
    return [law.named(theta[c], M) for c in range(C)]


def _knowledge(params: dict) -> dict[str, np.ndarray]:
    """Per-task knowledge parameters: gamma and beta (tied laws) or P's diagonal (original law)."""
    if "gamma" in params:
        return {"gamma": np.array(params["gamma"]), "beta": np.array(params["beta"])}
    return {"P_diag": np.diag(np.array(params["P"]))}


# link scale of each reported quantity: (link, inverse, derivative of the link, range kept inside)
LINKS = {
    "logit": (lambda x: np.log(x) - np.log1p(-x), lambda t: 1.0 / (1.0 + np.exp(-t)),
              lambda x: 1.0 / (x * (1.0 - x)), (1e-15, 1.0 - 1e-15)),
    "log": (np.log, np.exp, lambda x: 1.0 / x, (1e-300, np.inf)),
    "log1p": (np.log1p, np.expm1, lambda x: 1.0 / (1.0 + x), (0.0, np.inf)),
}


def link_interval(point: float, boot: np.ndarray, stderr: float, link: str, level: float) -> tuple[float, float]:
    """Normal bootstrap interval on the link scale: link(point) +- z sd, where sd is the larger of the
    resampled estimates' standard deviation and the curvature's (stderr through the link). Contains
    the estimate by construction; a bound the data do not limit is the range's end."""
    f, inverse, slope, (low, high) = LINKS[link]
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    x = float(np.clip(point, low, high))
    t, tb = f(x), f(np.clip(boot[np.isfinite(boot)], low, high))
    sd_boot = float(np.std(tb, ddof=1)) if len(tb) >= 2 else math.inf
    sd = max(sd_boot, stderr * abs(slope(x)) if np.isfinite(stderr) else math.inf)
    if not np.isfinite(sd):
        return min(0.0, point), max(1.0 if link == "logit" else math.inf, point)
    # the inverse link of link(x) may round away from x: keep the estimate inside at any precision
    lo, hi = np.clip([inverse(t - z * sd), inverse(t + z * sd)], 0.0 if link == "log1p" else low, high)
    return min(float(lo), point), max(float(hi), point)


def shots_interval(point: float, boot: np.ndarray, level: float) -> tuple[float, float]:
    """Interval of a reemergence estimate (inf = not within the horizon), from resampled estimates:
    the normal interval on log(1 + n) of those that recover; its upper end is inf when more than
    (1 - level) / 2 of them never recover, and both ends come from the quantiles when the estimate is inf."""
    alpha = (1.0 - level) / 2.0
    never = ~np.isfinite(boot)
    if not np.isfinite(point):
        # an order statistic, not an interpolation: inf - inf would make it NaN
        return float(np.quantile(np.where(never, np.inf, boot), alpha, method="inverted_cdf")), math.inf
    lo, hi = link_interval(point, boot, math.inf if never.all() else 0.0, "log1p", level)
    return lo, (math.inf if never.mean() > alpha else hi)


# Below this many resampled points per k, starting worker processes (about 2 s each) costs more than it saves.
PARALLEL_MIN_POINTS = 1_000_000


def workers_for(conditions: list[Conditions], config: ShiftConfig) -> int:
    """Processes to fit the k values in: `config.workers`, or with 0, one per k up to the CPUs this
    process may use, when the tables are large enough to pay for starting them."""
    if config.workers:
        return min(config.workers, len(conditions))
    points = config.resamples * max(int(c.mask.sum()) for c in conditions)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, len(conditions)) if points >= PARALLEL_MIN_POINTS else 1


def _one_thread_worker() -> None:
    """Each worker fits on one thread, torch's and BLAS's: the processes are the parallelism."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)


def fit_all(conditions: list[Conditions], resamples: list[np.ndarray], config: ShiftConfig,
            stream: TextIO | None = None) -> tuple[dict[int, LawChoice], dict[int, dict[str, ModelFit]]]:
    """The law and joint fit, then the free fit of every k, the k values in parallel processes
    (`workers_for`); a fit does not depend on where it runs. Progress and the time left go to `stream`
    (default stderr)."""
    C, M, _ = conditions[0].prob.shape
    laws = "3 laws" if config.law is None else config.law
    progress = Progress(f"shift of {C} conditions x {M} tasks, {laws}, {config.resamples} resamples",
                        2 * len(conditions), stream)
    fits: dict[int, dict[str, ModelFit]] = {cond.k: {} for cond in conditions}
    choices: dict[int, LawChoice] = {}
    workers = workers_for(conditions, config)

    def record(k: int, result: ModelFit | tuple[LawChoice, ModelFit]) -> None:
        if isinstance(result, tuple):
            choices[k], result = result
        fits[k][result.name] = result
        progress.done(1, f"k={k} {result.name} fit done ({result.law})")

    if workers == 1:
        for cond, sample in zip(conditions, resamples):
            progress.update(0, f"k={cond.k}: fitting")
            record(cond.k, fit_shared(cond, config, sample))
            record(cond.k, fit_free(cond, config, sample, fits[cond.k]["shared"]))
    else:
        context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread_worker) as pool:
            pending = {pool.submit(fit_shared, cond, config, sample): (cond, sample)
                       for cond, sample in zip(conditions, resamples)}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    cond, sample = pending.pop(future)
                    record(cond.k, future.result())
                    if len(fits[cond.k]) == 1:
                        pending[pool.submit(fit_free, cond, config, sample, fits[cond.k]["shared"])] = (cond, sample)
    progress.close()
    return choices, fits


def comparison_rows(k: int, fits: Mapping[str, tuple[float, int, float, bool]], n_points: int,
                    law: str = "") -> list[dict]:
    """comparison.csv's rows of one k from each fit's (chi2, parameters, held-out NRMSE, converged), of
    `law`: the fit of the lowest BIC is preferred."""
    scores = {name: bic(chi2, n, n_points) for name, (chi2, n, _, _) in fits.items()}
    return [{"k": k, "fit": name, "n_params": n, "chi2": round(chi2, 3), "aic": round(chi2 + 2 * n, 3),
             "bic": round(scores[name], 3), "heldout_nrmse": round(heldout, 6), "converged": converged,
             "preferred": scores[name] == min(scores.values()), "law": law}
            for name, (chi2, n, heldout, converged) in fits.items()]


def bic_comparison(groups: list[CurveGroup], config: ShiftConfig, runs: Collection[str],
                   laws: Mapping[int, str] | None = None) -> list[dict]:
    """comparison.csv's rows for the baseline and the conditions `runs` only, at every k of the baseline.
    BIC needs only the two fits to all shots, the same fits as analyse_shift's: no resamples (they give
    intervals) and no fits to early shots (held-out NRMSE, left NaN here). The law at each k: `laws[k]`
    (e.g. the one analyse_shift chose on all conditions, ShiftResult.chosen_laws), else config.law, else
    the lowest BIC of the three laws' joint fits to these conditions."""
    rows = []
    for cond in select_conditions([g for g in groups if g.run == config.baseline or g.run in runs], config.baseline):
        C, M, _ = cond.prob.shape
        law = (laws or {}).get(cond.k) or config.law
        if law is None:
            scores, fits = law_scores(cond, config, BAYESIAN_NAMES)
            law = min(scores, key=lambda score: score.bic).law
            joint = fits[law]
        else:
            joint = _fit_to(cond.mask, cond, config, law=law)
        free = _fit_to(cond.mask, cond, config, joint.theta[0], law=law)
        rows += comparison_rows(cond.k, {name: (float(2 * fit.loss.sum()), _n_params(law, M, C, name == "shared"),
                                                math.nan, bool(fit.converged.all()))
                                         for name, fit in (("shared", joint), ("free", free))}, int(cond.mask.sum()), law)
    return rows


@dataclass
class ShiftResult:
    rows: list[dict]  # shift.csv
    comparison: list[dict]  # comparison.csv
    conditions: list[Conditions]
    fits: dict[int, dict[str, ModelFit]]  # k -> model name -> fit
    laws: dict[int, LawChoice] = field(default_factory=dict)  # k -> the law used and every law's score

    def chosen_laws(self) -> dict[int, str]:
        """The law used at each k."""
        return {k: choice.law for k, choice in self.laws.items()}


def analyse_shift(groups: list[CurveGroup], config: ShiftConfig, prompt_probs: dict | None = None,
                  stream: TextIO | None = None) -> ShiftResult:
    """Joint and free fits of every k of the baseline's model, with intervals; progress goes to `stream`
    (default: stderr)."""
    rng = np.random.default_rng(config.seed)
    rows, comparison = [], []
    conditions = select_conditions(groups, config.baseline)
    for cond in conditions:
        if len(cond.groups) < 2:
            raise UserError(f"only the baseline was measured at k {cond.k}; add post-trained runs of the same model")
    resamples = [resample_table(cond, config.resamples, rng, prompt_probs) for cond in conditions]
    choices, fits = fit_all(conditions, resamples, config, stream)
    for cond in conditions:
        C, M, S = cond.prob.shape
        base_p0 = cond.prob[0][:, 0]
        thresholds = np.full(M, config.threshold) if config.threshold is not None else base_p0
        horizon = 10.0 * cond.shots.max()
        law = choices[cond.k].law
        comparison += comparison_rows(cond.k, {name: (f.chi2, f.n_params, f.heldout_nrmse, f.converged)
                                               for name, f in fits[cond.k].items()}, int(cond.mask.sum()), law)
        for name, fit in fits[cond.k].items():
            shared = name == "shared"
            point = named_per_condition(law, fit.theta, shared, M, C)
            boot = [named_per_condition(law, t, shared, M, C) for t in fit.resampled]
            shots_fit = predicted_crossings(law, fit.theta[0] if shared else fit.theta, shared, M, C,
                                            horizon, thresholds)
            shots_boot = predicted_crossings(law, fit.resampled, shared, M, C, horizon, thresholds)
            p0 = log_prob(law, fit.theta[0] if shared else fit.theta, torch.zeros(1, dtype=torch.float64),
                          M, C, shared)[..., 0].exp().numpy()
            for c, g in enumerate(cond.groups):
                se = fit.stderr[c]
                # per task: estimate [M], resampled estimates [R, M], standard error [M], link scale
                quantities = {
                    "prior": (np.array(point[c]["priors"]), np.array([b[c]["priors"] for b in boot]),
                              np.array(se["priors"]), "logit"),
                    "K": (np.full(M, point[c]["K"]), np.array([[b[c]["K"]] * M for b in boot]),
                          np.full(M, se["K"]), "log"),
                    **{key: (value, np.array([_knowledge(b[c])[key] for b in boot]), _knowledge(se)[key], "logit")
                       for key, value in _knowledge(point[c]).items()},
                }
                for i in range(M):
                    row = {"run": g.run, "k": cond.k, "task": i, "fit": name, "condition": condition_label(g),
                           **{col: g.extra.get(col, "") for col in CONDITION_COLUMNS}, "law": law}
                    loose = []
                    for key, (value, vals, err, link) in quantities.items():
                        lo, hi = link_interval(value[i], vals[:, i], err[i], link, config.level)
                        row.update({key: value[i], f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_se": err[i]})
                        if undetermined(value[i], err[i]):
                            loose.append(key)
                    row["undetermined"] = ";".join(loose)
                    # a task counts as suppressed when both its measured and its fitted zero-shot
                    # probability are below the threshold, so noise around the baseline level is not flagged
                    suppressed = c > 0 and p0[c, i] < thresholds[i] and cond.prob[c, i, 0] < thresholds[i]
                    row["threshold"] = thresholds[i]
                    lo, hi = shots_interval(shots_fit[c, i], shots_boot[:, c, i], config.level)
                    measured_p = cond.prob[c, i][cond.mask[c, i]]
                    measured = crossing(cond.shots[cond.mask[c, i]], measured_p, thresholds[i])
                    row.update({"shots_to_recover": shots_fit[c, i], "shots_to_recover_lo": lo,
                                "shots_to_recover_hi": hi, "measured_shots_to_recover": measured} if suppressed else
                               dict.fromkeys(("shots_to_recover", "shots_to_recover_lo", "shots_to_recover_hi",
                                              "measured_shots_to_recover"), ""))
                    rows.append(row)
    return ShiftResult(rows, comparison, conditions, fits, choices)
