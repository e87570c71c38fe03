"""report.md's sections of what an ablation grid found (grid_findings.py), and the plots beside it.

First the headline, reemergence: for each suppressed task that the measurement saw recover, the shots
the joint fit predicts against the shots measured (how many within a factor of 2, how many inside the
interval), and apart from them the predictions beyond the measured shots (`reemergence.png`). Then, for
each size and k: the favoured task's prior in every cell (the shift analysis's joint fit with its
interval, and the learner prior with the KL it leaves, also as a multiple of the base model's), per
method and direction whether it moves monotonically with the amount and at how many amounts it lies
strictly between the baseline and saturation (`favoured_prior.png`); the shared-P vs free verdict on
all amounts and on each half of them; and from which amount, if any, post-training stops being a move
of the prior. Last, the laws' extrapolation error on these curves.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from analysis.fitting import FitResult
from analysis.output import markdown_table
from analysis.shift import ShiftResult
from analysis.shift_report import family_colour, interval_text
from evaluation.ginc_curves import LEARNER_NAMES, MEASURED_ON, PRIOR_NAMES
from evaluation.grid_findings import (
    FACTOR,
    cell_fields,
    csv_float,
    graded_count,
    grid_reemergence,
    learner_kind,
    prior_only_verdict,
    range_text,
    trajectories,
    trajectory_verdict,
)

MARKERS = {("sft", "favor"): "o", ("sft", "disfavor"): "v", ("dpo", "favor"): "s", ("dpo", "disfavor"): "D"}


# ---- reemergence ----

def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({part / whole:.0%})" if whole else "0 of 0"


def reemergence_section(shifts: Mapping[str, ShiftResult], out: Path) -> list[str]:
    """The headline: predicted (joint fit) against measured shots to recover, and `out`/reemergence.png."""
    found = grid_reemergence(shifts)
    if not found.suppressed:
        _unlink(out / "reemergence.png")
        return ["No task fell below its baseline zero-shot probability: nothing to re-emerge.", ""]
    measured = [csv_float(r["measured_shots_to_recover"]) for r in found.suppressed]
    at_once = sum(m < 1.0 for m in measured)
    never = [r for r, m in zip(found.suppressed, measured) if not math.isfinite(m)]
    never_but_predicted = sum(r not in found.beyond for r in never)
    beyond_but_measured = sum(r in found.compared for r in found.beyond)
    n = len(found.compared)
    lines = [f"A task is suppressed in a cell when its zero-shot probability fell below the baseline's (the "
             f"threshold); it re-emerges at the shots where its probability returns to it. Of {len(found.suppressed)} "
             f"suppressed (cell, k, task), {n} were measured to re-emerge after at least one shot, {at_once} before "
             f"one shot, and {len(never)} not within the measured shots ({never_but_predicted} of them predicted to "
             "re-emerge within them).", ""]
    if n:
        lines += [f"**Predicted within a factor of {FACTOR:g} of the measured shots: {_share(found.within, n)}; "
                  f"measured inside the predicted 95% interval: {_share(found.covered, n)}.**", "",
                  markdown_table(
                      ["run", "k", "task", "predicted [95%]", "measured", "predicted / measured"],
                      [[r["run"], r["k"], r["task"], interval_text(r, "shots_to_recover", ".3g"),
                        f"{csv_float(r['measured_shots_to_recover']):.3g}",
                        f"{csv_float(r['shots_to_recover']) / csv_float(r['measured_shots_to_recover']):.2f}"]
                       for r in found.compared]), ""]
    lines += [f"Predicted beyond the measured shots (inf: not within 10x them, or beyond the largest measured shot): "
              f"{len(found.beyond)} of {len(found.suppressed)}; {beyond_but_measured} of them were measured to "
              "re-emerge within the shots (misses, also above), the rest are untested by these shots.", ""]
    if found.beyond:
        lines += [markdown_table(["run", "k", "task", "predicted [95%]", "measured"],
                                 [[r["run"], r["k"], r["task"], interval_text(r, "shots_to_recover", ".3g"),
                                   f"{csv_float(r['measured_shots_to_recover']):.3g}"] for r in found.beyond]), ""]
    if plot_reemergence(found.compared, out / "reemergence.png"):
        lines += ["![reemergence](reemergence.png)", ""]
    return lines


def _unlink(path: Path) -> None:
    """A plot of an earlier report that this one does not make would otherwise be read as this one's."""
    path.unlink(missing_ok=True)


def _row_style(method: str, direction: str) -> dict:
    return {"marker": MARKERS.get((method, direction), "x"), "color": family_colour(method, direction)}


def plot_reemergence(rows: Sequence[Mapping], path: Path) -> bool:
    """Predicted shots to recover (with 95% interval bars) against measured, log-log, with the identity
    line and the factor-2 band; a marker per method and direction, hollow where the prediction is off
    the scale (inf, or 0) and drawn at its edge. False (no file) without rows."""
    if not rows:
        _unlink(path)
        return False
    measured = np.array([csv_float(r["measured_shots_to_recover"]) for r in rows])
    predicted, lo, hi = (np.array([csv_float(r[key]) for r in rows])
                         for key in ("shots_to_recover", "shots_to_recover_lo", "shots_to_recover_hi"))
    shown = np.concatenate([measured, predicted[np.isfinite(predicted) & (predicted > 0)]])
    low, high = shown.min() / 2 / FACTOR, shown.max() * 2 * FACTOR
    fig = Figure(figsize=(6.5, 4.8))
    ax = fig.subplots()
    x = np.geomspace(low, high, 50)
    ax.fill_between(x, x / FACTOR, x * FACTOR, color="0.9", label=f"within a factor of {FACTOR:g}")
    ax.plot(x, x, "k--", lw=0.8, label="predicted = measured")
    labelled = set()
    for r, m, p, a, b in zip(rows, measured, predicted, lo, hi):
        method, direction, _ = cell_fields(r)
        y, a, b = np.clip([p, a, b], low, high)
        style = _row_style(method, direction)
        name = f"{method} {direction}".strip() or "other"
        ax.errorbar(m, y, yerr=[[y - a], [b - y]], fmt=style["marker"], color=style["color"], capsize=2, ms=5,
                    mfc="none" if y != p else style["color"], label=None if name in labelled else name)
        labelled.add(name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("measured shots to recover")
    ax.set_ylabel("predicted (joint fit), 95% interval")
    ax.set_title("Reemergence: hollow = off the scale (inf or 0), drawn at the edge", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return True


# ---- the favoured task's prior ----

def _learner_cells(row: Mapping | None, task: int, base_kl: float | None) -> list[str]:
    """The learner prior of `task`, the KL left and its multiple of the base model's; dashes where absent."""
    if not row:
        return ["-", "-", "-"]
    kl = csv_float(row["kl"])
    return [f"{csv_float(row[f'prior_{task}']):.3f}", f"{kl:.4f}", f"{kl / base_kl:.2f}" if base_kl else "-"]


def _row_lines(method: str, direction: str, base: Mapping, cells: list[dict], task: int,
               reader: Mapping[str, Mapping], learner: str) -> str:
    """One (method, direction) row's verdicts: monotone, graded amounts, the largest amount against the baseline."""
    series = [base, *cells]
    amounts = [0.0, *[cell_fields(r)[2] for r in cells]]
    law, lo, hi = ([csv_float(r[key]) for r in series] for key in ("prior", "prior_lo", "prior_hi"))
    outside = not lo[-1] <= law[0] <= hi[-1]
    graded = graded_count(direction, law[0], law[1:], lo[1:], hi[1:])
    text = (f"- {method} {direction}: law prior {trajectory_verdict(direction, amounts, law, lo, hi)} "
            f"({' -> '.join(f'{v:.3f}' for v in law)}); graded at {graded} of {len(cells)} amounts (strictly between "
            f"the baseline's {law[0]:.3f} and {1 if direction == 'favor' else 0}, the 95% interval excluding both); at "
            f"{amounts[-1]:g} the interval [{lo[-1]:.3f}, {hi[-1]:.3f}] {'excludes' if outside else 'includes'} the "
            f"baseline's {law[0]:.3f}")
    if all(r["run"] in reader for r in series):
        learned = [csv_float(reader[r["run"]][f"prior_{task}"]) for r in series]
        text += (f"; {learner} {trajectory_verdict(direction, amounts, learned)} "
                 f"({' -> '.join(f'{v:.3f}' for v in learned)})")
    return text


def prior_section(shift: ShiftResult, task: int, reader: Mapping[str, Mapping],
                  ranges: Sequence[Mapping] = ()) -> list[str]:
    """Per k: the task's prior in each cell with the learner prior and the KL it leaves, the verdicts per
    method and direction, shared P vs free on each amount range (`ranges`: range_comparisons' rows; the
    shift's own comparison where none), and where the prior-only account fails."""
    lines: list[str] = []
    base_kl = None
    for k in sorted({r["k"] for r in shift.rows}):
        base, rows = trajectories(shift, k, task)
        runs = [base["run"], *[r["run"] for cells in rows.values() for r in cells]]
        kind = learner_kind(reader[run] for run in runs if run in reader)
        learner = PRIOR_NAMES.get(kind, "learner prior")
        base_kl = csv_float(reader[base["run"]]["kl"]) if base["run"] in reader else None
        table = [["baseline", 0, interval_text(base, "prior"), *_learner_cells(reader.get(base["run"]), task, base_kl)]]
        for (method, direction), cells in rows.items():
            table += [[f"{method}-{direction}", f"{cell_fields(r)[2]:g}", interval_text(r, "prior"),
                       *_learner_cells(reader.get(r["run"]), task, base_kl)] for r in cells]
        comparison = {c["fit"]: c for c in shift.comparison if c["k"] == k}
        by_range = {r["range"]: r for r in ranges if r["k"] == k} or {"all amounts": {
            "range": "all amounts", "amounts": sorted({cell_fields(r)[2] for cells in rows.values() for r in cells}),
            "shared": comparison["shared"]["bic"], "free": comparison["free"]["bic"],
            "preferred": "shared" if comparison["shared"]["preferred"] else "free"}}
        kl_cells = [(cell_fields(r)[2], r["run"], csv_float(reader[r["run"]]["kl"]))
                    for cells in rows.values() for r in cells if r["run"] in reader]
        lines += [f"### k = {k}: task {task}'s prior", "", markdown_table(
            ["cell", "amount", "law prior [95%] (joint fit)", learner, "KL left (nats)", "KL / base"], table), "",
            *[_row_lines(method, direction, base, cells, task, reader, learner)
              for (method, direction), cells in rows.items()],
            f"- shared P vs free: held-out NRMSE {comparison['shared']['heldout_nrmse']:.3f} vs "
            f"{comparison['free']['heldout_nrmse']:.3f} (all amounts); by BIC, "
            + "; ".join(f"{range_text(r)}: {r['preferred']}" for r in by_range.values()),
            prior_only_verdict(by_range, kl_cells, base_kl), ""]
    if base_kl is not None:
        against = (f"the {LEARNER_NAMES[kind]}" if kind in LEARNER_NAMES
                   else "the learner of reader_prior.csv's `learner` column")
        where = MEASURED_ON.get(kind, "held-out prompts")
        lines += [f"KL left: the mean KL from the model to {against} at the prior that fits it best (nats per "
                  f"position, on {where}); the baseline's {base_kl:.4f} is what a model that learned its pretraining "
                  "data leaves, and KL / base is each cell's multiple of it. Above it is what no prior explains: "
                  "changed task knowledge.", ""]
    return lines


def favoured_prior_section(shifts: Mapping[str, ShiftResult], task: int, reader: Mapping[str, Mapping],
                           out: Path) -> list[str]:
    """`out`/favoured_prior.png and the line that shows it."""
    if not plot_favoured_prior(shifts, task, reader, out / "favoured_prior.png"):
        return []
    return [f"Task {task}'s prior against the amount, per size and k: the joint fit's with its 95% interval (filled "
            "markers), the learner prior beside it (crosses), the baseline's as horizontal lines (solid: joint fit, "
            "dotted: learner).", "", "![favoured prior](favoured_prior.png)", ""]


def plot_favoured_prior(shifts: Mapping[str, ShiftResult], task: int, reader: Mapping[str, Mapping],
                        path: Path) -> bool:
    """The favoured task's prior against the amount (log x) per method and direction, one panel per size
    and k; False (no file) without post-trained cells."""
    panels = [(size, shift, k) for size, shift in shifts.items() for k in sorted({r["k"] for r in shift.rows})]
    if not panels:
        _unlink(path)
        return False
    columns = max(sum(s == size for s, _, _ in panels) for size in shifts)
    fig = Figure(figsize=(4.2 * columns, 3.4 * len(shifts)))
    axes = fig.subplots(len(shifts), columns, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for row, size in enumerate(shifts):
        for col, (_, shift, k) in enumerate(p for p in panels if p[0] == size):
            _favoured_panel(axes[row, col], shift, k, task, reader)
            axes[row, col].set_title(f"{size}, k = {k}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"task {task}'s prior against the amount")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return True


def _favoured_panel(ax, shift: ShiftResult, k: int, task: int, reader: Mapping[str, Mapping]) -> None:
    base, rows = trajectories(shift, k, task)
    ax.axhline(csv_float(base["prior"]), color="0.3", lw=1, label="baseline (joint fit)")
    if base["run"] in reader:
        ax.axhline(csv_float(reader[base["run"]][f"prior_{task}"]), color="0.3", lw=1, ls=":",
                   label="baseline (learner)")
    for j, ((method, direction), cells) in enumerate(rows.items()):
        amount = np.array([cell_fields(r)[2] for r in cells])
        shift_x = 1.0 + 0.04 * (j - (len(rows) - 1) / 2)  # rows side by side on the log axis
        mid, lo, hi = (np.array([csv_float(r[key]) for r in cells]) for key in ("prior", "prior_lo", "prior_hi"))
        style = _row_style(method, direction)
        ax.errorbar(amount * shift_x, mid, yerr=[mid - lo, hi - mid], fmt=style["marker"], color=style["color"], ms=4,
                    capsize=2, label=f"{method} {direction}")
        learned = [(a, csv_float(reader[r["run"]][f"prior_{task}"]))
                   for a, r in zip(amount, cells) if r["run"] in reader]
        if learned:
            a, v = np.array(learned).T
            ax.plot(a * shift_x * 1.08, v, "x", color=style["color"], ms=5, label=f"{method} {direction} (learner)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({cell_fields(r)[2] for cells in rows.values() for r in cells}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("amount")
    ax.set_ylabel(f"prior of task {task}")


# ---- the laws and the ideal learners ----

def extrapolation_section(results: Sequence[FitResult]) -> list[str]:
    """Each law's mean NRMSE in extrapolation (fit the first shots, score the rest) over the grid's curves."""
    laws: dict[str, list[float]] = {}
    for r in results:
        if r.split != "interpolation" and math.isfinite(r.nrmse):
            laws.setdefault(r.law, []).append(r.nrmse)
    if not laws:
        return ["No extrapolation fits.", ""]
    best = min(laws, key=lambda law: np.mean(laws[law]))
    return [markdown_table(["law", "mean extrapolation NRMSE", "curves"],
                           [[law, float(np.mean(v)), len(v)] for law, v in laws.items()]), "",
            f"Best in extrapolation: {best}.", ""]


def gap_section(gaps: Sequence[Mapping], out: Path | None = None) -> list[str]:
    """The pretrained models' ICL curves against their ideal learner's, with standard errors, how much and
    how late each rises, and the picture of both (learner_curves.png, where `out` holds it)."""
    if not gaps:
        return []
    kind = learner_kind(gaps)
    against = LEARNER_NAMES.get(kind, "ideal learner of each row")
    short = "reader" if kind == "reader" else "learner"
    picture = ["![pretrained curves beside the ideal learners](learner_curves.png)", ""] \
        if out is not None and (out / "learner_curves.png").is_file() else []
    return [f"Pretrained models against the {against} (mean over tasks and shots of |model - {short}| target "
            "probability on the same prompts; noise: what agreeing curves would give with these prompts; rise: the "
            "late level minus the zero-shot point, and the shots to 90% of it, mean over tasks):", "",
            markdown_table(["run", "k", "gap", "se", "noise", "signed", "prompts per task", "rise (model / learner)",
                            "90% after (model / learner)"],
                           [[g["run"], g["k"], g["gap"], g["gap_se"], g["noise"], g["signed"], g["prompts"],
                             f"{csv_float(g['model_rise']):.3f} / {csv_float(g['learner_rise']):.3f}",
                             f"{csv_float(g['model_shots_to_90']):.1f} / {csv_float(g['learner_shots_to_90']):.1f}"]
                            for g in gaps]),
            "", *picture]


def learner_curves_figure(model: Sequence[Mapping], ideal: Mapping[str, Sequence[Mapping]], path: Path) -> None:
    """A pretrained model's curve per task at each k (solid) beside the ideal learners' on the same prompts
    (`ideal`: name -> curve rows; dashed, dotted), one panel per k."""
    ks = sorted({int(r["k"]) for r in model})
    fig = Figure(figsize=(4.2 * len(ks) + 2.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    styles = dict(zip(["model", *ideal], ["-", "--", ":"]))
    for ax, k in zip(axes, ks):
        for name, rows in {"model": model, **ideal}.items():
            for task in sorted({int(r["task"]) for r in model}):
                points = sorted((int(r["shots"]), float(r["prob"]))
                                for r in rows if int(r["k"]) == k and int(r["task"]) == task)
                ax.plot(*zip(*points), styles[name], color=f"C{task}", lw=1.2,
                        label=f"task {task}, {name}" if ax is axes[0] else None)
        ax.set(title=f"k = {k}", xlabel="shots")
    axes[0].set_ylabel("probability of the right label")
    fig.legend(loc="outside right center", fontsize="small")
    fig.suptitle(f"{model[0]['run']}: its curves beside the ideal learners on the same prompts")
    fig.savefig(path, dpi=90, bbox_inches="tight")
