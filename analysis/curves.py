"""Read and validate a curves table (docs/design.md) into curve groups, one per (run, k)."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("run", "k", "task", "shots", "prob", "nll", "count")
CONDITION_COLUMNS = ("stage", "method", "direction", "amount")


@dataclass
class CurveGroup:
    """The M task curves of one (run, k); arrays are [M, S] over the sorted shots, NaN where unmeasured."""

    run: str
    k: int
    shots: np.ndarray
    prob: np.ndarray
    nll: np.ndarray
    count: np.ndarray
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return self.prob.shape[0]

    @property
    def mask(self) -> np.ndarray:
        return ~np.isnan(self.prob)

    @property
    def label(self) -> str:
        return f"{self.run} (k={self.k})"


def _number(path: Path, line: int, column: str, text: str, integer: bool) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{path} line {line}: column {column} is {text!r}, not a number; fix or drop that row") from None
    if math.isnan(value):
        raise ValueError(f"{path} line {line}: {column} is NaN; drop the row or measure it again")
    if integer and (not math.isfinite(value) or value < 0 or value != int(value)):
        raise ValueError(f"{path} line {line}: {column} = {text} must be a non-negative integer")
    return value


def _check_row(path: Path, line: int, row: dict[str, str]) -> tuple:
    k, task, shots = (int(_number(path, line, c, row[c], True)) for c in ("k", "task", "shots"))
    prob, nll, count = (_number(path, line, c, row[c], False) for c in ("prob", "nll", "count"))
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{path} line {line}: prob = {row['prob']} is outside [0, 1]; it must be a mean probability")
    if not (math.isfinite(nll) and nll >= 0.0):
        raise ValueError(f"{path} line {line}: nll = {row['nll']} must be finite and >= 0; drop or re-measure the row")
    if not math.isfinite(count) or count < 1 or count != int(count):
        raise ValueError(f"{path} line {line}: count = {row['count']} must be a positive integer (prompts averaged)")
    return row["run"], k, task, shots, prob, nll, count


def read_curves(path: str | os.PathLike, step: int | None = None) -> list[CurveGroup]:
    """All (run, k) groups of a curves CSV, in first-seen order. Raises one-line errors on bad input.

    A run's own table holds one block per evaluation, told apart by its `step` column: each run's
    last step is read, or `step` where given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"curves file {path} not found; pass a CSV written by `evaluate.py curves`")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; a curves table needs {', '.join(REQUIRED_COLUMNS)}"
            )
        extra_cols = [c for c in reader.fieldnames if c not in REQUIRED_COLUMNS]
        points: dict[tuple[str, int, int], dict[tuple[int, int], tuple[float, float, float]]] = {}
        extras: dict[tuple[str, int, int], dict[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            if None in row or any(row[c] is None for c in REQUIRED_COLUMNS):
                raise ValueError(f"{path} line {line}: {len(reader.fieldnames)} columns expected; fix or drop that row")
            run, k, task, shots, prob, nll, count = _check_row(path, line, row)
            at = int(_number(path, line, "step", row["step"], True)) if row.get("step") else -1
            group = points.setdefault((run, k, at), {})
            if (task, shots) in group:
                raise ValueError(f"{path} line {line}: duplicate row for run {run}, k {k}, task {task}, shots {shots}"
                                 + (f", step {at}" if at >= 0 else ""))
            group[(task, shots)] = (prob, nll, count)
            extras.setdefault((run, k, at), {c: row[c] for c in extra_cols})
    if not points:
        raise ValueError(f"{path}: the curves table has no rows")
    chosen = _pick_steps(path, list(points), step)
    return [_build_group(path, key[:2], points[key], extras[key]) for key in points if key in chosen]


def _pick_steps(path: Path, keys: list[tuple[str, int, int]], step: int | None) -> set[tuple[str, int, int]]:
    """Each run's last evaluation step, or the requested one."""
    steps: dict[str, set[int]] = {}
    for run, _, at in keys:
        steps.setdefault(run, set()).add(at)
    if step is None:
        return {key for key in keys if key[2] == max(steps[key[0]])}
    lacking = [run for run, s in steps.items() if step not in s]
    if lacking:
        have = sorted(steps[lacking[0]] - {-1})
        raise ValueError(f"{path}: run {lacking[0]} has no rows at step {step}"
                         + (f"; its steps are {', '.join(map(str, have))}" if have else "; the table has no step column"))
    return {key for key in keys if key[2] == step}


def _build_group(path: Path, key: tuple[str, int], pts: dict, extra: dict[str, str]) -> CurveGroup:
    run, k = key
    tasks = sorted({t for t, _ in pts})
    if tasks != list(range(len(tasks))):
        raise ValueError(f"{path}: run {run}, k {k} has tasks {tasks}; tasks must be numbered 0..M-1 without gaps")
    shots = np.array(sorted({s for _, s in pts}), dtype=np.float64)
    col = {s: j for j, s in enumerate(shots.astype(int))}
    arrays = np.full((3, len(tasks), len(shots)), np.nan)
    for (t, s), values in pts.items():
        arrays[:, t, col[s]] = values
    return CurveGroup(run, k, shots, arrays[0], arrays[1], arrays[2], extra)
