"""The report of an ablation grid: every trained model's curves measured on the same prompts, curves.csv,
the law fits, each size's shift report, the ideal learners' tables, and report.md with the cells' statuses
and what the grid found (evaluation/grid_findings.py, evaluation/grid_report.py).
"""
from __future__ import annotations

import dataclasses
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from training.grid.cells import CellStatus, cells_of, pretrained_of
from training.grid.checks import AblationConfigError
from training.grid.config import AblationConfig
from user_errors import UserError


def true_priors(model: Path) -> list[float] | None:
    """The pretraining mixture, to set beside the fitted priors in the shift report, when it is not uniform."""
    from contracts.run_artifacts import read_source

    weights = (read_source(model).data.get("world") or {}).get("weights")
    if not weights or max(weights) - min(weights) < 1e-9:
        return None
    return [float(w) for w in weights]


def has_prior(model: Path) -> bool:
    """Whether the KL to a model's ideal learner (auto) is finite for some prior: always for the exact
    learner, which scores the prompts' labels only; for the document reader, which reads whole prompts and
    documents, only where the world has property_smoothing > 0."""
    from contracts.run_artifacts import read_source
    from evaluation.ginc_curves import ideal_learner

    data = read_source(model).data
    return (ideal_learner("auto", float(data.get("demo_rate", 0.0))) == "exact"
            or float((data.get("world") or {}).get("property_smoothing", 0.0)) > 0)


def report_grid(cfg: AblationConfig, out: Path, status: dict[str, CellStatus], pool: ProcessPoolExecutor | None) -> int:
    """Measure the curves of every trained model, write curves.csv and the fits, shift reports, reader
    tables and report.md; the fits and reader tables run in the pool's workers while this process
    fits the shifts (which start processes of their own for large tables). Returns how many cells and
    analyses failed."""
    from analysis.report import summary_table
    from contracts.curves_table import read_curves, write_curves
    from contracts.run_artifacts import read_source
    from evaluation.ginc_curves import checkpoint_curve_rows
    from evaluation.grid_findings import range_comparisons
    from evaluation.reports import fit_table, shift_table

    models = {size: model for size in cfg.sizes if (model := pretrained_of(cfg, out, size)).exists()}
    cells = [cell for cell in cells_of(cfg) if cell.method != "pretrain"]
    finished = [out / c.name / "hf" for c in cells if status[c.name].finished]
    # every model on the cells' prompts: a given pretrained checkpoint keeps the ICL settings it was trained
    # with, which the grid's overrides may change for its cells
    icl = (read_source(finished[0]).data.get("icl") or {}) if finished else {}
    baselines = {size: checkpoint_curve_rows([model], k_values=icl.get("k_values"), prompts=icl.get("prompts_per_task"))
                 for size, model in models.items()}
    rows = [r for size_rows in baselines.values() for r in size_rows]
    rows += [r for model in finished for r in checkpoint_curve_rows([model])]
    failed = [name for name, s in status.items() if s.failed]
    for name in failed:
        print(f"[ablate] FAILED {name}: {status[name]}", flush=True)
    if not rows:
        raise AblationConfigError(f"no model of {cfg.name} finished, so there are no curves; see {out}/*/*/train.log")
    curves = write_curves(rows, out / "curves.csv")
    fit_config, shift_settings = cfg.analysis_configs()
    elsewhere = {"fits": (fit_table, curves, out / "fits", fit_config),
                 "reader tables": (reader_tables, cfg, out, list(models.values()), [*models.values(), *finished],
                                   list(baselines.values()))}
    started = {name: pool.submit(*call) for name, call in elsewhere.items()} if pool is not None else {}
    settings = {size: dataclasses.replace(shift_settings, baseline=base_rows[0]["run"])
                for size, base_rows in baselines.items()}
    shifts = {size: _report(f"shift of {size}", shift_table, curves, out / "shift" / size, settings[size],
                            true_priors=true_priors(models[size])) for size in baselines}
    groups = read_curves(curves)
    ranges = {size: _report(f"amount ranges of {size}", range_comparisons, groups, settings[size], shift) or []
              for size, shift in shifts.items() if shift is not None}
    fits, readers = (_report(name, started[name].result) if name in started else _report(name, *call)
                     for name, call in elsewhere.items())
    unmade = sum(result is None for result in (*shifts.values(), fits, readers))  # analyses that could not be made
    results, _ = fits or ([], [])
    reader, gaps = readers or ([], [])
    if results:
        print(summary_table(results), flush=True)
    shifts = {size: shift for size, shift in shifts.items() if shift is not None}
    write_report(cfg, out, status, shifts, results, {r["run"]: r for r in reader}, gaps, ranges)
    return len(failed) + unmade


def _report(name: str, call: typing.Callable, *args: object, **kwargs: object) -> object:
    """An analysis's result, or None when its settings or input are bad (said in one line; the grid goes on)."""
    try:
        return call(*args, **kwargs)
    except UserError as exc:
        print(f"[ablate] {name} failed: {exc}", flush=True)
        return None


def reader_tables(cfg: AblationConfig, out: Path, pretrained: list[Path], trained: list[Path],
                  baselines: list[list[dict]]) -> tuple[list, list]:
    """reader_prior.csv (every trained model that has a prior) and reader_gap.csv (the pretrained models),
    each against the model's own ideal learner (auto: the exact learner where the data held prompts), and
    learner_curves.png (the first pretrained model's curves, `baselines`, beside both learners'); returns
    the rows."""
    from contracts.run_artifacts import read_source
    from datamodules.ginc_datamodule import GincDataModule
    from evaluation.ginc_curves import ideal_references
    from evaluation.grid_report import learner_curves_figure
    from evaluation.reader_gap import reader_gap_rows
    from evaluation.reader_prior import reader_prior_rows
    from safe_io.files import write_rows

    if pretrained:
        ideal = ideal_references(GincDataModule(**read_source(pretrained[0]).data))
        learner_curves_figure(baselines[0], ideal, out / "learner_curves.png")

    print("[ablate] ideal-learner priors of every model, and the pretrained models' gap to their ideal learner",
          flush=True)
    reader = reader_prior_rows([m for m in trained if has_prior(m)], cfg.reader_prompts)
    if reader:
        write_rows(reader, out / "reader_prior.csv")
    gaps = reader_gap_rows(pretrained, cfg.gap_prompts)
    write_rows(gaps, out / "reader_gap.csv")
    return reader, gaps


def write_report(cfg: AblationConfig, out: Path, status: dict[str, CellStatus], shifts: dict, results: list,
                 reader: dict[str, dict], gaps: list[dict], ranges: dict[str, list[dict]]) -> None:
    """report.md, reemergence.png and favoured_prior.png: each cell's status, then what the grid found
    (evaluation/grid_report.py); `ranges`: each size's shared-P vs free verdicts by amount range."""
    from evaluation.ginc_curves import LEARNER_NAMES, PRIOR_NAMES, named_learners
    from evaluation.grid_report import (
        extrapolation_section,
        favoured_prior_section,
        gap_section,
        prior_section,
        reemergence_section,
    )

    lines = [f"# Ablation {cfg.name}", "",
             f"Sizes {', '.join(cfg.sizes)}; methods {', '.join(cfg.methods)}; directions {', '.join(cfg.directions)}; "
             f"tasks {cfg.tasks}; amounts {cfg.amounts} (x{cfg.epochs} epochs, batch {cfg.batch_size}).", "",
             "| cell | status |", "| --- | --- |", *[f"| {n} | {s} |" for n, s in status.items()], "",
             "- combined curves: `curves.csv`", "- law fits: `fits/report.md`",
             *[f"- shift of {size}: `shift/{size}/report.md`" for size in shifts],
             (f"- {named_learners(list(reader.values()), PRIOR_NAMES)} of every model (law-free): `reader_prior.csv`"
              if reader else
              "- reader priors (law-free): none: the world has no property_smoothing, so no prior makes the KL to the "
              "reader finite"),
             f"- gaps to the {named_learners(gaps, LEARNER_NAMES) or 'ideal learner'}: `reader_gap.csv`", "",
             "## What the grid shows", "", "### Reemergence", "", *reemergence_section(shifts, out),
             *gap_section(gaps, out), *favoured_prior_section(shifts, cfg.tasks[0], reader, out)]
    for size, shift in shifts.items():
        lines += [f"## {size}", "", *prior_section(shift, cfg.tasks[0], reader, ranges.get(size, []))]
    lines += ["## Laws in extrapolation", "",
              f"Fit on shots <= {cfg.fit_fraction:g} x the largest, scored on the rest, "
              "over every cell's curves:", "", *extrapolation_section(results)]
    (out / "report.md").write_text("\n".join(lines))
