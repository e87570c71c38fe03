"""What an ablation grid found, in its report.md: read off the grid's shift, fits, reader priors and
reader gaps, never assumed.

For each size and k: the favoured task's prior in every cell (the shift analysis's joint fit with its
interval, and the law-free reader prior with the KL it leaves), whether it moves monotonically with the
amount (up under favour, down under disfavour) and whether the largest amount's interval leaves the
baseline's estimate; the shared-P vs free verdict; predicted against measured reemergence; and the laws'
extrapolation error on these curves.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from analysis.fitting import FitResult
from analysis.output import markdown_table
from analysis.shift import ShiftResult
from analysis.shift_report import interval_text


def _amount(row: Mapping) -> float:
    try:
        return float(row.get("amount", "") or 0)
    except ValueError:
        return 0.0


def _reader_cells(fit: Mapping, task: int) -> list[str]:
    """The reader prior of `task` and the KL left, or dashes where the model has no reader prior."""
    return [f"{fit[f'prior_{task}']:.3f}", f"{fit['kl']:.4f}"] if fit else ["-", "-"]


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


def prior_section(shift: ShiftResult, task: int, reader: Mapping[str, Mapping]) -> list[str]:
    """Per k: the task's prior in each cell, the monotonicity verdict per method and direction, shared P vs free."""
    lines: list[str] = []
    base_kl = None
    for k in sorted({r["k"] for r in shift.rows}):
        rows = [r for r in shift.rows if r["k"] == k and r["fit"] == "shared" and r["task"] == task]
        base = next(r for r in rows if not r.get("direction"))
        base_kl = reader.get(base["run"], {}).get("kl")
        table, verdicts = [], []
        for method in dict.fromkeys(r.get("method", "") for r in rows if r.get("direction")):
            for direction in ("favor", "disfavor"):
                cells = sorted((r for r in rows if r.get("method") == method and r.get("direction") == direction), key=_amount)
                if not cells:
                    continue
                series = [base, *cells]
                amounts = [0.0, *[_amount(r) for r in cells]]
                law = [float(r["prior"]) for r in series]
                last = cells[-1]
                outside = not float(last["prior_lo"]) <= float(base["prior"]) <= float(last["prior_hi"])
                bounds = [[float(r[key]) for r in series] for key in ("prior_lo", "prior_hi")]
                verdict = (f"- {method} {direction}: law prior {trajectory_verdict(direction, amounts, law, *bounds)} "
                           f"({' -> '.join(f'{v:.3f}' for v in law)}); at {last['amount']} the interval "
                           f"[{last['prior_lo']:.3f}, {last['prior_hi']:.3f}] "
                           f"{'excludes' if outside else 'includes'} the baseline's {base['prior']:.3f}")
                if all(r["run"] in reader for r in series):
                    kl_prior = [float(reader[r["run"]][f"prior_{task}"]) for r in series]
                    verdict += (f"; reader prior {trajectory_verdict(direction, amounts, kl_prior)} "
                                f"({' -> '.join(f'{v:.3f}' for v in kl_prior)})")
                verdicts.append(verdict)
                table += [[f"{method}-{direction}", r["amount"], interval_text(r, "prior"),
                           *_reader_cells(reader.get(r["run"], {}), task)] for r in cells]
        table.insert(0, ["baseline", 0, interval_text(base, "prior"), *_reader_cells(reader.get(base["run"], {}), task)])
        comparison = {c["fit"]: c for c in shift.comparison if c["k"] == k}
        shared, free = comparison["shared"], comparison["free"]
        lines += [f"### k = {k}: task {task}'s prior", "", markdown_table(
            ["cell", "amount", "law prior [95%] (joint fit)", "reader prior (KL)", "KL left (nats)"], table), "",
            *verdicts,
            f"- shared P vs free: BIC {shared['bic']:.1f} vs {free['bic']:.1f}, held-out NRMSE "
            f"{shared['heldout_nrmse']:.3f} vs {free['heldout_nrmse']:.3f}: the "
            f"{'shared' if shared['preferred'] else 'free'} fit is preferred "
            f"({'post-training moved the priors and left P' if shared['preferred'] else 'post-training changed more than the priors'})", ""]
    if base_kl is not None:
        lines += [f"KL left: the mean KL from the model to the document reader at the reader prior that fits it best "
                  f"(nats per position, held-out prompts and documents); the baseline's {base_kl:.4f} is what a model "
                  "that learned the documents leaves. Above it is what no prior explains: changed task knowledge.", ""]
    return lines


def reemergence_section(shift: ShiftResult) -> list[str]:
    """Predicted (joint fit) against measured shots to recover, and how often the measurement falls inside."""
    rows = [r for r in shift.rows if r["fit"] == "shared" and r["shots_to_recover"] != ""]
    if not rows:
        return ["No task fell below its baseline zero-shot probability: nothing to re-emerge.", ""]
    inside = sum(float(r["shots_to_recover_lo"]) <= float(r["measured_shots_to_recover"]) <= float(r["shots_to_recover_hi"])
                 for r in rows)
    table = [[r["k"], r["condition"], r["task"], interval_text(r, "shots_to_recover", ".3g"), r["measured_shots_to_recover"]]
             for r in rows]
    return [f"Measured shots inside the predicted 95% interval: {inside} of {len(rows)} (inf: not within 10x the "
            "measured shots, or, measured, not within them).", "",
            markdown_table(["k", "cell", "task", "predicted [95%]", "measured"], table), ""]


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


def gap_section(gaps: Sequence[Mapping]) -> list[str]:
    """The pretrained models' ICL curves against the document reader's, with standard errors."""
    if not gaps:
        return []
    return ["Pretrained models against the document reader (mean over tasks and shots of |model - reader| target "
            "probability on the same prompts; noise: what agreeing curves would give with these prompts):", "",
            markdown_table(["run", "k", "gap", "se", "noise", "signed", "prompts per task"],
                           [[g["run"], g["k"], g["gap"], g["gap_se"], g["noise"], g["signed"], g["prompts"]] for g in gaps]), ""]
