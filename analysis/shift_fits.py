"""The shift analysis's fits at one k: the joint fit (P shared across conditions) and the free fit
(everything per condition) of a Bayesian law, with their resampled fits and standard errors; the law
chosen by BIC among the three Bayesian laws' joint fits (`LawChoice`); and comparison.csv's rows."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from analysis.conditions import Conditions, select_conditions
from analysis.curves import CurveGroup
from analysis.fitting import fit_batch, named_stderr, named_stderrs, nrmse, predict
from analysis.laws import BAYESIAN_NAMES, BayesianLaw, get_law
from analysis.residuals import Batch, BatchFit, theta_covariance

if TYPE_CHECKING:
    from analysis.shift import ShiftConfig

TIED_NAMES = tuple(name for name in BAYESIAN_NAMES if get_law(name).tying != "none")


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


def law_scores(cond: Conditions, config: ShiftConfig,
               laws: Collection[str]) -> tuple[list[LawScore], dict[str, BatchFit]]:
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


def named_per_condition(law_name: str, theta: torch.Tensor, shared: bool, M: int, C: int) -> list[dict]:
    """Interpretable parameters of each condition: priors [M], K, and P or gamma, beta."""
    law: BayesianLaw = get_law(law_name)
    if shared:
        named = law.named(theta.reshape(-1), M, C)
        return [{**named, "priors": named["priors"][c], "K": named["K"][c]} for c in range(C)]
    return [law.named(theta[c], M) for c in range(C)]


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
                                         for name, fit in (("shared", joint), ("free", free))},
                                    int(cond.mask.sum()), law)
    return rows
