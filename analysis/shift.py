"""How post-training moves the Bayesian law's parameters: joint vs free fits, intervals, reemergence.

The runs of one model and k are its conditions (pretrained baseline, SFT/DPO at several amounts).
The joint fit shares P (or gamma, beta) across conditions and gives each its own priors and K; the free
fit refits everything per condition, starting also from the joint fit's values, so it is never worse.
Both are weighted least squares with each point's sampling error sqrt(p(1-p)/count), i.e. maximum
likelihood under that Gaussian noise model, so their chi-square, AIC and BIC compare them; so does
NRMSE on held-out late shots.

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

import math
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch

from analysis.bootstrap import link_interval, resample_table, shots_interval
from analysis.conditions import Conditions, condition_fields, condition_key, condition_label, select_conditions  # noqa: F401 - the shift report reads the order from here
from analysis.curves import CONDITION_COLUMNS, CurveGroup
from analysis.fitting import TOL, predict, undetermined
from analysis.laws import BAYESIAN_NAMES
from analysis.progress import Progress
from analysis.shift_fits import (
    LawChoice,
    ModelFit,
    comparison_rows,
    fit_free,
    fit_shared,
    log_prob,
    named_per_condition,
    per_condition_thetas,
)
from user_errors import UserError

FITS = ("shared", "free")


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
    """Shots at which the law's p_i(n) first reaches threshold_i, per condition and task [..., C, M];
    inf beyond horizon.

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


def _knowledge(params: dict) -> dict[str, np.ndarray]:
    """Per-task knowledge parameters: gamma and beta (tied laws) or P's diagonal (original law)."""
    if "gamma" in params:
        return {"gamma": np.array(params["gamma"]), "beta": np.array(params["beta"])}
    return {"P_diag": np.diag(np.array(params["P"]))}


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
