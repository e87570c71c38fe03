"""`evaluate.py ladder`: a ground-truth ladder for the law fits and the shift report.

Ideal learners of one world whose prior over tasks is set to known conditions: the world's
own mixture (the baseline), then one task favoured or disfavoured at several strengths (its weight
multiplied or divided by each strength, the rest renormalised). Their curves go through `fit` and
`shift` like a model's, and the report says how well the analysis recovers what is known: the priors
and their moves (bias, interval coverage), whether it keeps P shared where P truly does not move, and
predicted against measured reemergence for the disfavoured conditions.

The learner is the exact Bayesian learner (it knows the prompt format) or the document reader (the
Bayes-optimal model of the documents alone, which is what a pretrained model imitates): the second
checks the analysis on the learner trained models are measured against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.fitting import FitConfig, FitResult, fit_groups
from analysis.output import atomic_dir, markdown_table
from analysis.report import summary_table, write_fit_outputs
from analysis.shift import ShiftConfig, ShiftResult, analyse_shift
from analysis.shift_report import write_shift_outputs
from datamodules.config_io import load_datamodule_config
from datamodules.world import check_weights
from evaluation.curves_table import read_curves, write_curves
from evaluation.ginc_curves import exact_curve_rows, reader_curve_rows
from evaluation.reports import one_thread
from lightning_modules.gpt import resolve_device
from user_errors import UserError

MODEL = "truth"
LEARNERS = {"exact": exact_curve_rows, "reader": reader_curve_rows}


def ladder_weights(base: np.ndarray, task: int, strengths: list[float]) -> dict[str, np.ndarray]:
    """Condition name -> prior: the base mixture, then `task` favoured / disfavoured by each strength."""
    out = {"pretrain": base}
    for direction, power in (("favor", 1.0), ("disfavor", -1.0)):
        for s in strengths:
            w = base.copy()
            w[task] *= s**power
            out[f"{direction}-{s:g}"] = w / w.sum()
    return out


@dataclass(frozen=True)
class LadderConfig:
    """data_config: YAML with the GINC world and ICL settings; task: the task favoured and disfavoured;
    strengths: factors its weight is multiplied (favour) or divided (disfavour) by; k_values, prompts:
    override the data config's; law, resamples, starts: of the shift report; device: of the learners;
    learner: exact (the exact Bayesian learner) or reader (the document reader)."""

    data_config: Path
    task: int = 0
    strengths: tuple[float, ...] = (2.0, 4.0, 16.0)
    k_values: tuple[int, ...] | None = None
    prompts: int | None = None
    law: str = "bayesian_scoring"
    resamples: int = 100
    starts: int = 16
    device: str = "auto"
    learner: str = "exact"


def run_ladder(config: LadderConfig, out: str | os.PathLike) -> tuple[list[FitResult], ShiftResult]:
    """Curves of the ladder's learners, all laws fitted to them, and the shift report with what it
    recovered of the truth: curves.csv, fits/, shift/ and report.md in `out`, written whole."""
    if config.learner not in LEARNERS:
        raise UserError(f"--learner {config.learner!r} is not a ladder learner; choose one of {', '.join(LEARNERS)}")
    data = load_datamodule_config(config.data_config, k_values=list(config.k_values) if config.k_values else None,
                                  prompts_per_task=config.prompts)
    device = resolve_device(config.device)
    M = data.world.n_tasks
    if not 0 <= config.task < M:
        raise UserError(f"--task {config.task} is out of range for a world of {M} tasks")
    if any(not s > 1.0 for s in config.strengths):
        raise UserError(f"--strengths {list(config.strengths)} must all be above 1 (1 is the baseline itself)")
    shift_config = ShiftConfig(baseline=f"{MODEL}/pretrain", law=config.law, resamples=config.resamples, starts=config.starts)
    conditions = ladder_weights(check_weights(data.world.weights, M), config.task, list(config.strengths))
    with atomic_dir(out, [config.data_config]) as tmp:
        rows = []
        for name, weights in conditions.items():
            direction, _, strength = name.partition("-")
            extra = {"stage": "pretrain"} if name == "pretrain" else {
                "stage": "prior", "method": "prior", "direction": direction, "amount": strength}
            rows += LEARNERS[config.learner](data, f"{MODEL}/{name}", weights.tolist(), device, **extra)
        write_curves(rows, tmp / "curves.csv")
        groups = read_curves(tmp / "curves.csv")
        with one_thread():
            fit_config = FitConfig(starts=config.starts)
            results = fit_groups(groups, fit_config)
            (tmp / "fits").mkdir()
            write_fit_outputs(results, fit_config, Path("curves.csv"), tmp / "fits", plots=True)
            shift = analyse_shift(groups, shift_config)
            (tmp / "shift").mkdir()
            write_shift_outputs(shift, shift_config, Path("curves.csv"), tmp / "shift",
                                conditions["pretrain"].tolist())
        (tmp / "report.md").write_text(ladder_report(conditions, shift, shift_config, config, results))
    return results, shift


def ladder_report(conditions: dict[str, np.ndarray], shift: ShiftResult, config: ShiftConfig,
                  ladder: LadderConfig, fits: list[FitResult]) -> str:
    """What the analysis recovered of the known truth."""
    learner = {"exact": "Exact Bayesian learners", "reader": "Document readers"}[ladder.learner]
    lines = ["# Ground-truth ladder", "",
             f"{learner} of `{ladder.data_config}` with their prior set to known conditions: the "
             f"world's mixture, then task {ladder.task} favoured or disfavoured by {', '.join(f'{s:g}' for s in ladder.strengths)} "
             f"(its weight multiplied or divided, the rest renormalised). Shift law: `{ladder.law}` (joint fit: P shared, "
             "priors and K per condition). The law is only an approximation of the learner (it predicts the "
             "zero-shot probability from the prior alone, while the learner already conditions on the query), so a "
             "bias here measures that gap, not noise.", "",
             "## Fits of all laws", "", summary_table(fits), ""]
    for k in sorted({r["k"] for r in shift.rows}):
        shared = [r for r in shift.rows if r["k"] == k and r["fit"] == "shared"]
        truth = np.array([conditions[r["run"].split("/", 1)[1]][r["task"]] for r in shared])
        est = np.array([r["prior"] for r in shared])
        lo, hi = np.array([r["prior_lo"] for r in shared]), np.array([r["prior_hi"] for r in shared])
        covered = (lo <= truth) & (truth <= hi)
        M = len(conditions["pretrain"])
        lines += [f"## k = {k}", "",
                  f"Priors (joint fit) against the truth: mean bias {np.mean(est - truth):+.3f}, mean absolute error "
                  f"{np.mean(np.abs(est - truth)):.3f}, largest {np.max(np.abs(est - truth)):.3f}; the {config.level:.0%} "
                  f"intervals cover the truth in {covered.sum()} of {len(covered)} cases.", "",
                  "Bias by task (fitted - true, averaged over conditions): "
                  + ", ".join(f"task {i}: {np.mean((est - truth)[i::M]):+.3f}" for i in range(M)), "",
                  markdown_table(["condition", f"true prior of task {ladder.task}", "fitted [lo, hi]", "covered"],
                                 [[r["run"].split("/", 1)[1], float(truth[j]),
                                   f"{r['prior']:.3f} [{r['prior_lo']:.3f}, {r['prior_hi']:.3f}]", bool(covered[j])]
                                  for j, r in enumerate(shared) if r["task"] == ladder.task]), ""]
        verdict = {c["fit"]: c for c in shift.comparison if c["k"] == k}
        lines += [f"Shared P vs free (P does not move here): BIC {verdict['shared']['bic']} vs {verdict['free']['bic']}, "
                  f"so the {'shared' if verdict['shared']['preferred'] else 'free'} fit is preferred.", ""]
        recover = [r for r in shared if r["shots_to_recover"] != "" and r["task"] == ladder.task]
        if recover:
            lines += ["Reemergence of the disfavoured task (shots to return to its baseline zero-shot probability):", "",
                      markdown_table(["condition", "predicted [lo, hi]", "measured"],
                                     [[r["run"].split("/", 1)[1],
                                       f"{r['shots_to_recover']:.3g} [{r['shots_to_recover_lo']:.3g}, "
                                       f"{r['shots_to_recover_hi']:.3g}]", f"{r['measured_shots_to_recover']:.3g}"]
                                      for r in recover]), ""]
    lines += ["Details: `fits/report.md` and `shift/report.md`.", ""]
    return "\n".join(lines)
