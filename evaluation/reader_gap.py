"""How closely a model's ICL curve follows an ideal learner's, with a standard error over prompts.

The ideal learner is the document reader (the Bayes-optimal model of documents alone) or the exact
learner (which knows the prompt format: the Bayes-optimal model of prompts, the target of a model
trained with prompts in its data); "auto" picks the exact learner when the run's data had demo_rate > 0.
Both score the same prompts as the model, so the comparison is paired: for each (k, task, shots) the mean
over prompts of (model - learner) target probability, then the mean of its absolute value over tasks and
shots. That mean of absolute values is biased upwards by the prompts' noise (|noise| > 0 even when the
curves agree), so the bootstrap over prompts gives both its standard error and the value the noise alone
would give (`noise`: the same statistic on the differences centred per point), to read the gap against.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from analysis.curves import rise
from contracts.run_artifacts import read_source
from datamodules.config_io import with_icl_overrides
from datamodules.document_reader import DocumentReader
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import GincWorld
from evaluation.ginc_curves import LEARNER_NAMES, exact_label_scores, ideal_learner, load_model, reader_label_scores
from evaluation.settings import ReaderGapConfig
from lightning_modules.icl_metric import label_scores
from models.gpt import resolve_device
from user_errors import UserError

# columns every reader-gap table of the project has (older ones lack `learner`): how an existing --out is
# recognised as one that may be replaced
TABLE_COLUMNS = ("run", "k", "gap", "gap_se", "noise", "signed", "prompts")
LabelScores = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ReaderGap:
    k: int
    learner: str  # the ideal learner compared with: "exact" or "reader"
    gap: float  # mean over tasks and shots of |mean over prompts of (model - learner)|
    gap_se: float  # its bootstrap standard error over prompts
    noise: float  # what the same statistic gives when the curves agree and only the prompts' noise is left
    signed: float  # mean over tasks and shots of (model - learner): < 0 where the model lags the learner
    prompts: int  # prompts per task
    model_rise: float  # the model's curve: its late level minus its zero-shot point (analysis.curves.rise)
    model_shots_to_90: float  # and the shots it takes to reach 90% of that rise
    learner_rise: float  # the same of the learner's curve
    learner_shots_to_90: float


def learner_scores(learner: str, data: GincDataModule, device: torch.device) -> LabelScores:
    """ICL batch -> the named ideal learner's (log-probability, top-1, defined) of each label, as
    `reader_label_scores` gives them, for `data`'s world and prompt format."""
    world = GincWorld.build(data.world).to(device)
    if learner == "exact":
        return partial(exact_label_scores, ExactLearner(world), demo_format=data.icl.demo_format, device=device)
    return partial(reader_label_scores, DocumentReader(world), device=device)


@torch.no_grad()
def paired_probabilities(model: GPT2LMHeadModel, data: GincDataModule, device: str | torch.device = "cpu",
                         learner: str = "auto") -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """k -> per task the (model, ideal learner) target probabilities [prompts, shots] on the same prompts
    (`ideal_learner(learner)`; NaN where the learner has no prediction)."""
    device = torch.device(device)
    model = model.to(device).eval()
    ideal = learner_scores(ideal_learner(learner, data.demo_rate), data, device)
    parts: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for batch in data.icl_dataloader():
        logp, _ = label_scores(model, batch["input_ids"].to(device), batch["label_pos"].to(device),
                               batch["labels"].to(device))
        ideal_logp, _, defined = ideal(batch)
        pair = logp.double().exp(), torch.where(defined, ideal_logp.exp(), torch.nan)
        parts.setdefault((batch["k"], batch["task"]), []).append(tuple(p.cpu().numpy() for p in pair))
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for (k, _), arrays in sorted(parts.items()):
        out.setdefault(k, []).append(tuple(np.concatenate(a) for a in zip(*arrays)))
    return out


def paired_differences(model: GPT2LMHeadModel, data: GincDataModule, device: str | torch.device = "cpu",
                       learner: str = "auto") -> dict[int, list[np.ndarray]]:
    """k -> one array per task [prompts, shots] of model minus ideal learner target probability (NaN where
    the learner has no prediction)."""
    return {k: [m - ref for m, ref in pairs] for k, pairs in paired_probabilities(model, data, device, learner).items()}


def gap_statistic(diffs: Sequence[np.ndarray], resamples: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """(gap, its bootstrap standard error, the noise level) from one k's per-task paired differences."""
    rng = np.random.default_rng(seed)
    gaps, noise = [], []
    for d in diffs:
        idx = rng.integers(0, d.shape[0], size=(resamples, d.shape[0]))
        # a resample may draw only prompts without a prediction at some shot: NaN there, skipped below
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            means = np.nanmean(d[idx], axis=1)  # [resamples, shots]
        gaps.append(np.abs(means))
        noise.append(np.abs(means - np.nanmean(d, axis=0)))
    point = float(np.mean([np.nanmean(np.abs(np.nanmean(d, axis=0))) for d in diffs]))
    boot = np.mean([np.nanmean(g, axis=1) for g in gaps], axis=0)
    return point, float(boot.std(ddof=1)), float(np.mean([np.nanmean(n) for n in noise]))


def reader_gaps(model: GPT2LMHeadModel, data: GincDataModule, device: str | torch.device = "cpu",
                learner: str = "auto") -> list[ReaderGap]:
    """The gap between the model's and the ideal learner's ICL curves at each of the data module's k values,
    and how much and how late each curve rises (`analysis.curves.rise` of each task's curve, mean over tasks)."""
    learner = ideal_learner(learner, data.demo_rate)
    rows = []
    for k, pairs in paired_probabilities(model, data, device, learner).items():
        diffs = [m - ref for m, ref in pairs]
        gap, se, noise = gap_statistic(diffs)
        signed = float(np.mean([np.nanmean(d) for d in diffs]))
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # no task rises: NaN shots
            model_rise, learner_rise = (np.nanmean([rise(np.nanmean(p[i], axis=0)) for p in pairs], axis=0)
                                        for i in (0, 1))
        rows.append(ReaderGap(k, learner, gap, se, noise, signed, min(d.shape[0] for d in diffs),
                              *map(float, (*model_rise, *learner_rise))))
    return rows


def reader_gap_rows(paths: Sequence[str | Path], prompts: int = ReaderGapConfig.prompts,
                    k_values: Sequence[int] | None = None, device: str = ReaderGapConfig.device,
                    learner: str = ReaderGapConfig.learner) -> list[dict]:
    """One row per (run, k) of runs' checkpoints or HF exports: the gap to the ideal learner (`learner`:
    exact, reader, or auto: exact for a run trained with prompts in its data) on `prompts` prompts per
    (k, task) of the run's own world and ICL settings."""
    if prompts < 2:
        raise UserError(f"prompts must be >= 2 (a standard error needs two prompts), got {prompts}")
    rows = []
    for path in paths:
        src = read_source(path)
        data = GincDataModule(**with_icl_overrides(src.data, list(k_values) if k_values else None, prompts))
        for g in reader_gaps(load_model(path), data, resolve_device(device), learner):
            print(f"{src.label} k={g.k}: |model - {LEARNER_NAMES[g.learner]}| {g.gap:.4f} +- {g.gap_se:.4f} "
                  f"(noise alone {g.noise:.4f}; signed {g.signed:+.4f}; {g.prompts} prompts per task); rise "
                  f"{g.model_rise:.3f}, 90% after {g.model_shots_to_90:.1f} shots (learner {g.learner_rise:.3f}, "
                  f"{g.learner_shots_to_90:.1f})",
                  file=sys.stderr, flush=True)
            rows.append({"run": src.label, **dataclasses.asdict(g), **src.columns()})
    return rows
