"""What the quickstart prints: each model's ICL curve beside both ideal learners, the favoured task's
fitted prior before and after post-training (the shift analysis, with intervals, and the law-free prior
of the model's ideal learner: the document reader, or the exact learner for a model trained with prompts
in its data), and when the suppressed tasks re-emerge, predicted against measured."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from analysis.shift import ShiftConfig, ShiftResult
from analysis.shift_report import interval_text
from contracts.curves_table import read_rows, write_curves
from datamodules.ginc_datamodule import GincDataModule
from evaluation.ginc_curves import LEARNER_NAMES, MEASURED_ON, PRIOR_NAMES, ideal_references, named_learners
from evaluation.reader_prior import reader_prior_rows
from evaluation.reports import shift_table
from safe_io.files import write_rows


def probability_table(curves: Mapping[str, list[dict]], k: int, favoured: Sequence[int], shots: Sequence[int]) -> str:
    """Mean target probability by shots at k, over the favoured tasks and over the others, for each named curve set."""
    width = max(map(len, curves)) + 2
    lines = [f"{'':{9 + width}}" + "".join(f"{s:>7}" for s in shots)]
    for group in ("favoured", "others"):
        for j, (name, rows) in enumerate(curves.items()):
            prob = [[float(r["prob"]) for r in rows if r["k"] == k and r["shots"] == s
                     and (r["task"] in favoured) == (group == "favoured")] for s in shots]
            lines.append(f"{group if j == 0 else '':9}{name:{width}}"
                         + "".join(f"{sum(p) / len(p):7.3f}" if p else f"{'-':>7}" for p in prob))
    return "\n".join(lines)


def curve_gap(rows: list[dict], reference: list[dict], k: int) -> float:
    """Mean absolute target-probability difference at k over the (task, shots) points both curves have."""
    ref = {(r["task"], r["shots"]): float(r["prob"]) for r in reference if r["k"] == k}
    diffs = [abs(float(r["prob"]) - ref[r["task"], r["shots"]])
             for r in rows if r["k"] == k and (r["task"], r["shots"]) in ref]
    return sum(diffs) / max(len(diffs), 1)


def _shots(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.1f}"


def prior_table(shift: ShiftResult, runs: Mapping[str, str], task: int, reader: Mapping[str, dict]) -> str:
    """The task's prior in each run: the shift analysis's shared fit with its interval, and its ideal
    learner's prior (`reader`: name -> row of `reader_prior_rows`)."""
    rows = {r["run"]: r for r in shift.rows if r["fit"] == "shared" and r["task"] == task}
    width = max(map(len, runs)) + 2
    lines = [f"{'':{width}}{'law-fitted prior [95%]':>40}{named_learners(reader.values(), PRIOR_NAMES):>21}"
             f"{'KL left (nats)':>16}"]
    for name, run in runs.items():
        lines.append(f"{name:{width}}{interval_text(rows[run], 'prior'):>40}{reader[name][f'prior_{task}']:21.3f}"
                     f"{reader[name]['kl']:16.4f}")
    return "\n".join(lines)


def prior_note(reader: Mapping[str, dict]) -> str:
    """What the law-free prior of the rows is, for each learner they used."""
    return "; ".join(f"{PRIOR_NAMES[learner]}: the prior with which the {LEARNER_NAMES[learner]} best predicts the "
                     f"model, by KL on {MEASURED_ON[learner]}"
                     for learner in sorted({r["learner"] for r in reader.values()}))


def reemergence_lines(shift: ShiftResult, runs: Mapping[str, str]) -> list[str]:
    """For each suppressed task of each post-trained run: shots to return to the baseline's zero-shot probability."""
    names = {run: name for name, run in runs.items()}
    lines = []
    for r in shift.rows:
        if r["fit"] == "shared" and r["run"] in names and r["shots_to_recover"] != "":
            lo, hi = _shots(r["shots_to_recover_lo"]), _shots(r["shots_to_recover_hi"])
            lines.append(f"  {names[r['run']]}, task {r['task']} (back to {r['threshold']:.3f}): predicted "
                         f"{_shots(r['shots_to_recover'])} [{lo}, {hi}], measured "
                         f"{_shots(r['measured_shots_to_recover'])}")
    return lines or ["  no task is suppressed below its baseline zero-shot probability"]


def quickstart_report(curves: Mapping[str, list[dict]], runs: Mapping[str, str], favoured: Sequence[int], k: int,
                      loss: Mapping[str, float], shift: ShiftResult, reader: Mapping[str, dict]) -> str:
    """The report from each model's final curve rows and the ideal learners' (`curves`: name -> rows, the
    models first, then "exact Bayesian" and "document reader"), the models' run labels (`runs`: name -> run),
    the pretrained model's validation `loss` (val/loss, val/excess_loss), the shift analysis at k and the
    ideal-learner prior rows (`reader`: name -> row of `reader_prior_rows`)."""
    n = max(r["shots"] for r in curves["document reader"] if r["k"] == k)
    shots = sorted({0, 1, 2, 4, 8, 16, 32, 64, n} & set(range(n + 1)))
    base = next(iter(runs))
    others = sorted({int(r["task"]) for r in curves[base]} - set(favoured))
    gap = {name: curve_gap(curves[base], curves[name], k) for name in ("exact Bayesian", "document reader")}
    comparison = {c["fit"]: c for c in shift.comparison if c["k"] == k}
    reading = ("post-training looks like a move of priors" if comparison["shared"]["preferred"]
               else "post-training changed more than the priors")
    return "\n".join([
        f"\nProbability of the right label by shots, k={k}: favoured = task(s) {list(favoured)}, others = mean of "
        f"tasks {others}",
        probability_table(curves, k, favoured, shots),
        f"The exact learner knows the prompt format; the document reader knows only documents (the best a model of "
        f"documents can do). The pretrained model ({loss['val/loss']:.3f} nats/token, {loss['val/excess_loss']:.3f} "
        f"above the documents' floor) is closer to the {min(gap, key=gap.get)}: mean |model - learner| over tasks and "
        f"shots {gap['document reader']:.3f} to the reader, {gap['exact Bayesian']:.3f} to the exact learner.",
        f"\nPrior of task {favoured[0]} (shift analysis, k={k}: P shared, priors and K per model; "
        f"{prior_note(reader)})",
        prior_table(shift, runs, favoured[0], reader),
        f"Shared P vs free: BIC {comparison['shared']['bic']:.1f} vs {comparison['free']['bic']:.1f}, so the "
        f"{'shared' if comparison['shared']['preferred'] else 'free'} fit is preferred "
        f"({reading}).",
        "\nRe-emergence of suppressed tasks with shots (predicted by the shared fit [95%], measured on the curve):",
        *reemergence_lines(shift, runs)])


def analyse_quickstart(run_dirs: Mapping[str, Path], data: GincDataModule, favoured: Sequence[int], k: int,
                       loss: Mapping[str, float], out: Path, resamples: int = 30) -> str:
    """The quickstart's analysis of its runs (`run_dirs`: name -> run directory, the pretrained one first):
    their final curves in one table (out/curves.csv), the shift analysis at k (out/shift/), the priors of
    their exports' ideal learners (out/reader_prior.csv; auto: the exact learner where the data held
    prompts), and the report."""
    finals = {name: read_rows(run_dir / "curves.csv") for name, run_dir in run_dirs.items()}
    runs = {name: rows[0]["run"] for name, rows in finals.items()}
    out.mkdir(parents=True, exist_ok=True)
    table = write_curves([r for rows in finals.values() for r in rows], out / "curves.csv")
    shift = shift_table(table, out / "shift", ShiftConfig(baseline=runs[next(iter(runs))], resamples=resamples),
                        k_values=[k])
    rows = reader_prior_rows([run_dir / "hf" for run_dir in run_dirs.values()], prompts=16)
    write_rows(rows, out / "reader_prior.csv")
    return quickstart_report({**finals, **ideal_references(data)}, runs, favoured, k, loss, shift,
                             dict(zip(run_dirs, rows)))
