"""What an ablation grid found, read off its shift tables and learner priors, never assumed: which
suppressed tasks re-emerge and where the joint fit predicts it, the favoured task's prior along each
method and direction (monotone with the amount, how many amounts move it part of the way), shared P
against free fits on each range of amounts, and from which amount post-training stops being a move of
the prior alone. grid_report.py writes these into report.md.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.conditions import condition_fields, condition_key
from analysis.curves import CurveGroup
from analysis.shift import ShiftConfig, ShiftResult
from analysis.shift_fits import bic_comparison
from analysis.shift_report import condition_rows
from evaluation.reports import one_thread

FACTOR = 2.0  # a reemergence prediction "agrees" within this factor of the measured shots
KL_FACTOR = 2.0  # a cell leaving more than this multiple of the base model's KL is not explained by a prior
SATURATED = 5e-4  # an interval end this close to 0 or 1 (shown as 0.000 or 1.000) counts as saturation


def csv_float(value: object) -> float:
    """A shift.csv or reader_prior.csv value as a number; NaN where empty."""
    return math.nan if value in ("", None) else float(value)


def cell_fields(row: Mapping) -> tuple[str, str, float]:
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
        return sum(within_factor(csv_float(r["shots_to_recover"]), csv_float(r["measured_shots_to_recover"]))
                   for r in self.compared)

    @property
    def covered(self) -> int:
        return sum(csv_float(r["shots_to_recover_lo"]) <= csv_float(r["measured_shots_to_recover"])
                   <= csv_float(r["shots_to_recover_hi"])
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
    compared = [r for r in suppressed if 1.0 <= csv_float(r["measured_shots_to_recover"]) < math.inf]
    beyond = [r for r in suppressed if csv_float(r["shots_to_recover"]) > last[r["k"]]]
    return Reemergence(suppressed, compared, beyond)


def grid_reemergence(shifts: Mapping[str, ShiftResult]) -> Reemergence:
    """Reemergence over every size's shift."""
    parts = [reemergence(shift.rows, last_shots(shift)) for shift in shifts.values()]
    return Reemergence(*(sum((getattr(p, key) for p in parts), []) for key in ("suppressed", "compared", "beyond")))


# ---- the favoured task's prior ----

def trajectories(shift: ShiftResult, k: int, task: int) -> tuple[dict, dict[tuple[str, str], list[dict]]]:
    """The baseline's joint-fit row of `task` at k, and the post-trained cells' rows per (method,
    direction), both in condition_key's order (SFT favour, SFT disfavour, DPO favour, DPO disfavour)."""
    rows = [r for r in condition_rows(shift.rows, k, "shared") if r["task"] == task]
    base, cells = rows[0], {}
    for r in rows[1:]:
        cells.setdefault(cell_fields(r)[:2], []).append(r)
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


# ---- where the prior-only account fails ----

def amount_ranges(amounts: Iterable[float]) -> dict[str, list[float]]:
    """All amounts, the smaller half and the larger half (sharing the middle one of an odd count); the
    halves only from two amounts."""
    values = sorted(set(amounts))
    if len(values) < 2:
        return {"all amounts": values}
    return {"all amounts": values, "small half": values[:(len(values) + 1) // 2],
            "large half": values[len(values) // 2:]}


def range_comparisons(groups: list[CurveGroup], config: ShiftConfig, shift: ShiftResult) -> list[dict]:
    """Shared P vs free by BIC on each amount range (amount_ranges; each with the baseline) at every k:
    rows {k, range, amounts, shared, free (their BIC), preferred}. 'all amounts' is the shift analysis's own
    comparison; each half is fitted again on the baseline and its conditions, with `config`'s settings and
    the law the shift analysis used at each k (bic_comparison: BIC needs no resamples)."""
    amounts = {r["run"]: cell_fields(r)[2] for r in shift.rows if r["run"] != config.baseline}
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
            rows.append({"k": k, "range": name, "amounts": chosen, "shared": bic["shared"]["bic"],
                         "free": bic["free"]["bic"], "preferred": "shared" if bic["shared"]["preferred"] else "free"})
    return rows


def range_text(r: Mapping) -> str:
    return f"{r['range']} ({_amounts(r['amounts'])}): BIC {r['shared']:.1f} shared vs {r['free']:.1f} free"


def bic_failure(ranges: Mapping[str, Mapping]) -> tuple[float, str] | None:
    """The smallest amount from which the free fit wins on BIC, with the evidence; None where the shared
    P is preferred on every range. Free on all amounts but on neither half alone: the halves need different
    P, so it fails from the large half."""
    for name in ("small half", "large half", "all amounts"):
        r = ranges.get(name)
        if r and r["preferred"] == "free":
            start = ranges.get("large half", r)["amounts"][0] if name == "all amounts" else r["amounts"][0]
            return start, f"the free fit wins on {range_text(r)}"
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
        kl_text = (f"no cell's KL left exceeds {KL_FACTOR:g}x the base model's {base_kl:.4f} "
                   f"(largest: {run}, {kl / base_kl:.2f}x)")
    return f"- prior-only account holds throughout: the shared P is preferred on every amount range; {kl_text}"
