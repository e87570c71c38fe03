"""What an ablation grid found, in its report.md and two plots beside it: read off the grid's shift,
fits, learner priors and reader gaps, never assumed.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.ticker
from matplotlib.figure import Figure
import numpy as np

from analysis.curves import CurveGroup
from analysis.fitting import FitResult
from analysis.output import markdown_table
from analysis.shift import ShiftConfig, ShiftResult, bic_comparison, condition_fields, condition_key
from analysis.shift_report import condition_rows, family_colour, interval_text
from evaluation.ginc_curves import LEARNER_NAMES, MEASURED_ON, PRIOR_NAMES
from evaluation.reports import one_thread

FACTOR = 2.0  # a reemergence prediction "agrees" within this factor of the measured shots
KL_FACTOR = 2.0  # a cell leaving more than this multiple of the base model's KL is not explained by a prior
SATURATED = 5e-4  # an interval end this close to 0 or 1 (shown as 0.000 or 1.000) counts as saturation
MARKERS = {("sft", "favor"): "o", ("sft", "disfavor"): "v", ("dpo", "favor"): "s", ("dpo", "disfavor"): "D"}


def _float(value: object) -> float:
    """A shift.csv or reader_prior.csv value as a number; NaN where empty."""
    return math.nan if value in ("", None) else float(value)


def _fields(row: Mapping) -> tuple[str, str, float]:
    return condition_fields(row["run"], row)


def _amounts(values: Iterable[float]) -> str:
    return ", ".join(f"{a:g}" for a in values)


# ---- reemergence ----

@dataclass
class Reemergence:
    """Suppressed (cell, k, task) rows of the joint fit: those measured to recover after at least one
    shot, and those predicted to recover beyond the largest measured shot (or never)."""

    suppressed: list[dict]
    compared: list[dict]
    beyond: list[dict]

    @property
    def within(self) -> int:
        return sum(within_factor(_float(r["shots_to_recover"]), _float(r["measured_shots_to_recover"])) for r in self.compared)

    @property
    def covered(self) -> int:
        return sum(_float(r["shots_to_recover_lo"]) <= _float(r["measured_shots_to_recover"]) <= _float(r["shots_to_recover_hi"])
                   for r in self.compared)


def within_factor(predicted: float, measured: float, factor: float = FACTOR) -> bool:
    """Whether predicted / measured lies in [1 / factor, factor]."""
    return math.isfinite(predicted) and measured > 0 and 1.0 / factor <= predicted / measured <= factor


def last_shots(shift: ShiftResult) -> dict[int, float]:
    """The largest measured shot count at each k."""
    return {c.k: float(c.shots[c.mask.any((0, 1))].max()) for c in shift.conditions}


def reemergence(rows: Iterable[Mapping], last: Mapping[int, float]) -> Reemergence:
    """Sort shift.csv rows (`last`: the largest measured shot at each k) into a Reemergence."""
    suppressed = sorted((dict(r) for r in rows if r["fit"] == "shared" and r["shots_to_recover"] != ""),
                        key=lambda r: (r["k"], condition_key(r["run"], r), r["task"]))
    compared = [r for r in suppressed if 1.0 <= _float(r["measured_shots_to_recover"]) < math.inf]
    beyond = [r for r in suppressed if _float(r["shots_to_recover"]) > last[r["k"]]]
    return Reemergence(suppressed, compared, beyond)


def grid_reemergence(shifts: Mapping[str, ShiftResult]) -> Reemergence:
    """Reemergence over every size's shift."""
    parts = [reemergence(shift.rows, last_shots(shift)) for shift in shifts.values()]
    return Reemergence(*(sum((getattr(p, key) for p in parts), []) for key in ("suppressed", "compared", "beyond")))


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({part / whole:.0%})" if whole else "0 of 0"


def reemergence_section(shifts: Mapping[str, ShiftResult], out: Path) -> list[str]:
    """The headline: predicted (joint fit) against measured shots to recover, and `out`/reemergence.png."""
    found = grid_reemergence(shifts)
    if not found.suppressed:
        _unlink(out / "reemergence.png")
        return ["No task fell below its baseline zero-shot probability: nothing to re-emerge.", ""]
    measured = [_float(r["measured_shots_to_recover"]) for r in found.suppressed]
    at_once = sum(m < 1.0 for m in measured)
    never = [r for r, m in zip(found.suppressed, measured) if not math.isfinite(m)]
    never_but_predicted = sum(r not in found.beyond for r in never)
    beyond_but_measured = sum(r in found.compared for r in found.beyond)
    n = len(found.compared)
    lines = [f"A task is suppressed in a cell when its zero-shot probability fell below the baseline's (the "
             f"threshold); it re-emerges at the shots where its probability returns to it. Of {len(found.suppressed)} "
             f"suppressed (cell, k, task), {n} were measured to re-emerge after at least one shot, {at_once} before one "
             f"shot, and {len(never)} not within the measured shots ({never_but_predicted} of them predicted to re-emerge "
             "within them).", ""]
    if n:
        lines += [f"**Predicted within a factor of {FACTOR:g} of the measured shots: {_share(found.within, n)}; measured "
                  f"inside the predicted 95% interval: {_share(found.covered, n)}.**", "",
                  markdown_table(["run", "k", "task", "predicted [95%]", "measured", "predicted / measured"],
                                 [[r["run"], r["k"], r["task"], interval_text(r, "shots_to_recover", ".3g"),
                                   f"{_float(r['measured_shots_to_recover']):.3g}",
                                   f"{_float(r['shots_to_recover']) / _float(r['measured_shots_to_recover']):.2f}"]
                                  for r in found.compared]), ""]
    lines += [f"Predicted beyond the measured shots (inf: not within 10x them, or beyond the largest measured shot): "
              f"{len(found.beyond)} of {len(found.suppressed)}; {beyond_but_measured} of them were measured to re-emerge "
              "within the shots (misses, also above), the rest are untested by these shots.", ""]
    if found.beyond:
        lines += [markdown_table(["run", "k", "task", "predicted [95%]", "measured"],
                                 [[r["run"], r["k"], r["task"], interval_text(r, "shots_to_recover", ".3g"),
                                   f"{_float(r['measured_shots_to_recover']):.3g}"] for r in found.beyond]), ""]
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
    measured = np.array([_float(r["measured_shots_to_recover"]) for r in rows])
    predicted, lo, hi = (np.array([_float(r[key]) for r in rows])
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
        method, direction, _ = _fields(r)
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

def trajectories(shift: ShiftResult, k: int, task: int) -> tuple[dict, dict[tuple[str, str], list[dict]]]:
    """The baseline's joint-fit row of `task` at k, and the post-trained cells' rows per (method,
    direction), both in condition_key's order (SFT favour, SFT disfavour, DPO favour, DPO disfavour)."""
    rows = [r for r in condition_rows(shift.rows, k, "shared") if r["task"] == task]
    base, cells = rows[0], {}
    for r in rows[1:]:
        cells.setdefault(_fields(r)[:2], []).append(r)
    return base, cells


def learner_kind(rows: Iterable[Mapping]) -> str:
    """Which learner's prior reader_prior.csv rows hold: its `learner` column ('exact' or 'reader'),
    the document reader where the column is absent; 'mixed' where they differ."""
    kinds = {r.get("learner") or "reader" for r in rows}
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "reader"


def trajectory_verdict(direction: str, amounts: Sequence[float], values: Sequence[float],
                       lo: Sequence[float] | None = None, hi: Sequence[float] | None = None, tol: float = 1e-3) -> str:
    """Whether `values` (the baseline's first) move monotonically with the amount, up for favour and
    down for disfavour; with intervals (`lo`, `hi`), how many steps the other way leave the intervals."""
    order = np.argsort(amounts, kind="stable")
    v = np.asarray(values, dtype=float)[order]
    sign = 1.0 if direction == "favor" else -1.0
    back = np.flatnonzero(sign * np.diff(v) < -tol)
    if not len(back):
        return "monotone"
    text = f"not monotone ({len(back)} of {len(v) - 1} steps go the other way"
    if lo is not None and hi is not None:
        low, high = np.asarray(lo, dtype=float)[order], np.asarray(hi, dtype=float)[order]
        # a step back is real only where the two intervals do not overlap
        real = sum((high[i + 1] < low[i]) if sign > 0 else (low[i + 1] > high[i]) for i in back)
        text += f", {real} beyond their intervals"
    return text + ")"


def graded_count(direction: str, base: float, values: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> int:
    """How many of the priors lie strictly between the baseline's and saturation (1 under favour, 0 under
    disfavour) with their intervals excluding both: amounts that moved the prior part of the way."""
    low, high = (base, 1.0 - SATURATED) if direction == "favor" else (SATURATED, base)
    return sum(low < a <= v <= b < high for v, a, b in zip(values, lo, hi))


def _learner_cells(row: Mapping | None, task: int, base_kl: float | None) -> list[str]:
    """The learner prior of `task`, the KL left and its multiple of the base model's; dashes where absent."""
    if not row:
        return ["-", "-", "-"]
    kl = _float(row["kl"])
    return [f"{_float(row[f'prior_{task}']):.3f}", f"{kl:.4f}", f"{kl / base_kl:.2f}" if base_kl else "-"]


def _row_lines(method: str, direction: str, base: Mapping, cells: list[dict], task: int,
               reader: Mapping[str, Mapping], learner: str) -> str:
    """One (method, direction) row's verdicts: monotone, graded amounts, the largest amount against the baseline."""
    series = [base, *cells]
    amounts = [0.0, *[_fields(r)[2] for r in cells]]
    law, lo, hi = ([_float(r[key]) for r in series] for key in ("prior", "prior_lo", "prior_hi"))
    outside = not lo[-1] <= law[0] <= hi[-1]
    graded = graded_count(direction, law[0], law[1:], lo[1:], hi[1:])
    text = (f"- {method} {direction}: law prior {trajectory_verdict(direction, amounts, law, lo, hi)} "
            f"({' -> '.join(f'{v:.3f}' for v in law)}); graded at {graded} of {len(cells)} amounts (strictly between "
            f"the baseline's {law[0]:.3f} and {1 if direction == 'favor' else 0}, the 95% interval excluding both); at "
            f"{amounts[-1]:g} the interval [{lo[-1]:.3f}, {hi[-1]:.3f}] {'excludes' if outside else 'includes'} the "
            f"baseline's {law[0]:.3f}")
    if all(r["run"] in reader for r in series):
        learned = [_float(reader[r["run"]][f"prior_{task}"]) for r in series]
        text += f"; {learner} {trajectory_verdict(direction, amounts, learned)} ({' -> '.join(f'{v:.3f}' for v in learned)})"
    return text


# ---- where the prior-only account fails ----

def amount_ranges(amounts: Iterable[float]) -> dict[str, list[float]]:
    """All amounts, the smaller half and the larger half (sharing the middle one of an odd count); the
    halves only from two amounts."""
    values = sorted(set(amounts))
    if len(values) < 2:
        return {"all amounts": values}
    return {"all amounts": values, "small half": values[:(len(values) + 1) // 2], "large half": values[len(values) // 2:]}


def range_comparisons(groups: list[CurveGroup], config: ShiftConfig, shift: ShiftResult) -> list[dict]:
    """Shared P vs free by BIC on each amount range (amount_ranges; each with the baseline) at every k:
    rows {k, range, amounts, shared, free (their BIC), preferred}. 'all amounts' is the shift analysis's own
    comparison; each half is fitted again on the baseline and its conditions, with `config`'s settings and
    the law the shift analysis used at each k (bic_comparison: BIC needs no resamples)."""
    amounts = {r["run"]: _fields(r)[2] for r in shift.rows if r["run"] != config.baseline}
    rows = []
    for name, chosen in amount_ranges(a for a in amounts.values() if math.isfinite(a)).items():
        if name == "all amounts":
            comparison = shift.comparison
        else:
            with one_thread():
                comparison = bic_comparison(groups, config, [run for run, a in amounts.items() if a in chosen],
                                            shift.chosen_laws())
        for k in sorted({c["k"] for c in comparison}):
            bic = {c["fit"]: c for c in comparison if c["k"] == k}
            rows.append({"k": k, "range": name, "amounts": chosen, "shared": bic["shared"]["bic"], "free": bic["free"]["bic"],
                         "preferred": "shared" if bic["shared"]["preferred"] else "free"})
    return rows


def _range_text(r: Mapping) -> str:
    return f"{r['range']} ({_amounts(r['amounts'])}): BIC {r['shared']:.1f} shared vs {r['free']:.1f} free"


def bic_failure(ranges: Mapping[str, Mapping]) -> tuple[float, str] | None:
    """The smallest amount from which the free fit wins on BIC, with the evidence; None where the shared
    P is preferred on every range. Free on all amounts but on neither half alone: the halves need different
    P, so it fails from the large half."""
    for name in ("small half", "large half", "all amounts"):
        r = ranges.get(name)
        if r and r["preferred"] == "free":
            start = ranges.get("large half", r)["amounts"][0] if name == "all amounts" else r["amounts"][0]
            return start, f"the free fit wins on {_range_text(r)}"
    return None


def kl_failure(cells: Sequence[tuple[float, str, float]], base_kl: float) -> tuple[float, str] | None:
    """The smallest amount at which a cell's KL left (`cells`: amount, run, KL) exceeds KL_FACTOR x the base
    model's, with the evidence; None where none does."""
    over = [(a, run, kl) for a, run, kl in cells if kl > KL_FACTOR * base_kl]
    if not over:
        return None
    first = min(a for a, _, _ in over)
    named = ", ".join(f"{run} {kl:.4f} = {kl / base_kl:.1f}x" for a, run, kl in over if a == first)
    return first, (f"the KL left exceeds {KL_FACTOR:g}x the base model's {base_kl:.4f} from amount {first:g} ({named}; "
                   f"{len(over)} of {len(cells)} cells above it)")


def prior_only_verdict(ranges: Mapping[str, Mapping], cells: Sequence[tuple[float, str, float]],
                       base_kl: float | None) -> str:
    """From which amount post-training is no longer a move of the prior alone: the free fit wins on BIC,
    or a cell leaves more than KL_FACTOR x the base model's KL (where learner priors were measured)."""
    failures = [f for f in (bic_failure(ranges), kl_failure(cells, base_kl) if base_kl else None) if f]
    if failures:
        return (f"- prior-only account fails from amount {min(a for a, _ in failures):g}: "
                + "; ".join(text for _, text in failures))
    kl_text = "no learner priors, so BIC alone"
    if base_kl and cells:
        amount, run, kl = max(cells, key=lambda c: c[2])
        kl_text = f"no cell's KL left exceeds {KL_FACTOR:g}x the base model's {base_kl:.4f} (largest: {run}, {kl / base_kl:.2f}x)"
    return f"- prior-only account holds throughout: the shared P is preferred on every amount range; {kl_text}"


def prior_section(shift: ShiftResult, task: int, reader: Mapping[str, Mapping], ranges: Sequence[Mapping] = ()) -> list[str]:
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
        base_kl = _float(reader[base["run"]]["kl"]) if base["run"] in reader else None
        table = [["baseline", 0, interval_text(base, "prior"), *_learner_cells(reader.get(base["run"]), task, base_kl)]]
        for (method, direction), cells in rows.items():
            table += [[f"{method}-{direction}", f"{_fields(r)[2]:g}", interval_text(r, "prior"),
                       *_learner_cells(reader.get(r["run"]), task, base_kl)] for r in cells]
        comparison = {c["fit"]: c for c in shift.comparison if c["k"] == k}
        by_range = {r["range"]: r for r in ranges if r["k"] == k} or {"all amounts": {
            "range": "all amounts", "amounts": sorted({_fields(r)[2] for cells in rows.values() for r in cells}),
            "shared": comparison["shared"]["bic"], "free": comparison["free"]["bic"],
            "preferred": "shared" if comparison["shared"]["preferred"] else "free"}}
        kl_cells = [(_fields(r)[2], r["run"], _float(reader[r["run"]]["kl"]))
                    for cells in rows.values() for r in cells if r["run"] in reader]
        lines += [f"### k = {k}: task {task}'s prior", "", markdown_table(
            ["cell", "amount", "law prior [95%] (joint fit)", learner, "KL left (nats)", "KL / base"], table), "",
            *[_row_lines(method, direction, base, cells, task, reader, learner) for (method, direction), cells in rows.items()],
            f"- shared P vs free: held-out NRMSE {comparison['shared']['heldout_nrmse']:.3f} vs "
            f"{comparison['free']['heldout_nrmse']:.3f} (all amounts); by BIC, "
            + "; ".join(f"{_range_text(r)}: {r['preferred']}" for r in by_range.values()),
            prior_only_verdict(by_range, kl_cells, base_kl), ""]
    if base_kl is not None:
        against = f"the {LEARNER_NAMES[kind]}" if kind in LEARNER_NAMES else "the learner of reader_prior.csv's `learner` column"
        where = MEASURED_ON.get(kind, "held-out prompts")
        lines += [f"KL left: the mean KL from the model to {against} at the prior that fits it best (nats per position, "
                  f"on {where}); the baseline's {base_kl:.4f} is what a model that learned its pretraining data "
                  "leaves, and KL / base is each cell's multiple of it. Above it is what no prior explains: "
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


def plot_favoured_prior(shifts: Mapping[str, ShiftResult], task: int, reader: Mapping[str, Mapping], path: Path) -> bool:
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
    ax.axhline(_float(base["prior"]), color="0.3", lw=1, label="baseline (joint fit)")
    if base["run"] in reader:
        ax.axhline(_float(reader[base["run"]][f"prior_{task}"]), color="0.3", lw=1, ls=":", label="baseline (learner)")
    for j, ((method, direction), cells) in enumerate(rows.items()):
        amount = np.array([_fields(r)[2] for r in cells])
        shift_x = 1.0 + 0.04 * (j - (len(rows) - 1) / 2)  # rows side by side on the log axis
        mid, lo, hi = (np.array([_float(r[key]) for r in cells]) for key in ("prior", "prior_lo", "prior_hi"))
        style = _row_style(method, direction)
        ax.errorbar(amount * shift_x, mid, yerr=[mid - lo, hi - mid], fmt=style["marker"], color=style["color"], ms=4,
                    capsize=2, label=f"{method} {direction}")
        learned = [(a, _float(reader[r["run"]][f"prior_{task}"])) for a, r in zip(amount, cells) if r["run"] in reader]
        if learned:
            a, v = np.array(learned).T
            ax.plot(a * shift_x * 1.08, v, "x", color=style["color"], ms=5, label=f"{method} {direction} (learner)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({_fields(r)[2] for cells in rows.values() for r in cells}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("amount")
    ax.set_ylabel(f"prior of task {task}")


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
                             f"{_float(g['model_rise']):.3f} / {_float(g['learner_rise']):.3f}",
                             f"{_float(g['model_shots_to_90']):.1f} / {_float(g['learner_shots_to_90']):.1f}"] for g in gaps]),
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
                points = sorted((int(r["shots"]), float(r["prob"])) for r in rows if int(r["k"]) == k and int(r["task"]) == task)
                ax.plot(*zip(*points), styles[name], color=f"C{task}", lw=1.2,
                        label=f"task {task}, {name}" if ax is axes[0] else None)
        ax.set(title=f"k = {k}", xlabel="shots")
    axes[0].set_ylabel("probability of the right label")
    fig.legend(loc="outside right center", fontsize="small")
    fig.suptitle(f"{model[0]['run']}: its curves beside the ideal learners on the same prompts")
    fig.savefig(path, dpi=90, bbox_inches="tight")