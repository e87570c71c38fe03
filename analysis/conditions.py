"""The conditions of the shift analysis: which runs are one model's conditions at one k, the order they
come in every table and plot, and their curves on a common shots grid (`Conditions`)."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from analysis.curves import CONDITION_COLUMNS, CurveGroup, standard_error
from user_errors import UserError


@dataclass
class Conditions:
    """The C runs of one model at one k on a common shots grid: arrays [C, M, S], NaN where unmeasured."""

    k: int
    groups: list[CurveGroup]
    shots: np.ndarray
    prob: np.ndarray
    count: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return ~np.isnan(self.prob)

    @property
    def sd(self) -> np.ndarray:
        return standard_error(np.nan_to_num(self.prob, nan=0.5), np.nan_to_num(self.count, nan=1.0))


def model_key(group: CurveGroup) -> str:
    """Which model a run belongs to: its `model` or `layers` column when present, else the run label
    before '/'; runs without a '/' all belong to one model."""
    return (group.extra.get("model") or group.extra.get("layers")
            or (group.run.split("/")[0] if "/" in group.run else ""))


def condition_label(group: CurveGroup) -> str:
    parts = dict.fromkeys(group.extra.get(c, "") for c in CONDITION_COLUMNS)  # e.g. stage and method both "sft"
    return "-".join(p for p in parts if p) or group.run


# The order of conditions in every table and plot: the baseline, then these methods and directions in
# turn (others after them, by name), each by amount ascending.
METHOD_ORDER = ("sft", "dpo")
DIRECTION_ORDER = ("favor", "disfavor")


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def condition_fields(run: str, columns: Mapping[str, object] | None = None) -> tuple[str, str, float]:
    """A condition's method, direction and amount (NaN: none): from the curves table's `method`,
    `direction` and `amount` columns where they are filled, else read off the run label's words after
    the model's '/' (e.g. gpt2-2l/sft-favor-128, posttrain-dpo-disfavor-32, or just 30)."""
    columns = columns or {}
    words = re.split(r"[-_]", run.split("/", 1)[-1])
    method = str(columns.get("method") or next((w for w in words if w in METHOD_ORDER), ""))
    direction = str(columns.get("direction") or next((w for w in words if w in DIRECTION_ORDER), ""))
    amount = _number(columns.get("amount"))
    if math.isnan(amount):
        amount = next((x for x in map(_number, reversed(words)) if not math.isnan(x)), math.nan)
    return method, direction, amount


def condition_key(run: str, columns: Mapping[str, object] | None = None) -> tuple:
    """Sort key of a condition (see condition_fields for what it reads): the baseline (no method,
    direction or amount other than 0) first; then SFT favour, SFT disfavour, DPO favour, DPO disfavour,
    other methods and directions by name; within each, amounts as numbers, ascending."""
    method, direction, amount = condition_fields(run, columns)
    baseline = not method and not direction and (math.isnan(amount) or amount == 0)

    def rank(value: str, order: tuple[str, ...]) -> tuple[int, str]:
        return (order.index(value), "") if value in order else (len(order), value)

    return (not baseline, *rank(method, METHOD_ORDER), *rank(direction, DIRECTION_ORDER),
            math.isnan(amount), np.nan_to_num(amount), run)


def select_conditions(groups: list[CurveGroup], baseline: str) -> list[Conditions]:
    """The baseline's model at each k it was measured, baseline first, then in condition_key's order."""
    base = [g for g in groups if g.run == baseline]
    if not base:
        runs = ", ".join(dict.fromkeys(g.run for g in groups))
        raise UserError(f"baseline run {baseline!r} is not in the curves table; choose one of: {runs}")
    out = []
    for b in base:
        same = [g for g in groups if g.k == b.k and model_key(g) == model_key(b) and g is not b]
        same.sort(key=lambda g: condition_key(g.run, g.extra))
        if any(g.n_tasks != b.n_tasks for g in same):
            raise UserError(f"runs of model {model_key(b)} at k {b.k} differ in their number of tasks; "
                             "measure every condition on the same tasks")
        out.append(_common_grid(b.k, [b, *same]))
    return out


def _common_grid(k: int, groups: list[CurveGroup]) -> Conditions:
    shots = np.array(sorted(set().union(*[set(g.shots.tolist()) for g in groups])))
    prob = np.full((len(groups), groups[0].n_tasks, len(shots)), np.nan)
    count = prob.copy()
    for c, g in enumerate(groups):
        cols = np.searchsorted(shots, g.shots)
        prob[c][:, cols], count[c][:, cols] = g.prob, g.count
    return Conditions(k, groups, shots, prob, count)
