"""The curves table (docs/design.md): one row per (run, k, task, shots). Its columns, the one row
builder, writing, and reading it back (as rows, or as the analysis's curve groups); also the
per-prompt table that `shift` may bootstrap from."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from analysis.curves import CurveGroup
from safe_io.files import atomic_file, check_table_file
from user_errors import MissingInput, UserError

CURVE_COLUMNS = ("run", "k", "task", "shots", "prob", "nll", "acc", "count")
OPTIONAL_COLUMNS = ("acc",)  # curves drawn from a law have no accuracy
REQUIRED_COLUMNS = tuple(c for c in CURVE_COLUMNS if c not in OPTIONAL_COLUMNS)
PROMPT_COLUMNS = ("run", "k", "task", "prompt", "shots", "prob")
NLL_ROUNDING = 1e-9  # an nll this far below 0 is 0 computed in floating point


def curve_row(run: str, k: int, task: int, shots: int, prob: float, nll: float, acc: float | str, count: int,
              **extra: object) -> dict[str, object]:
    """One row of the table: the mean over `count` prompts of the label's probability, its negative log
    probability and argmax accuracy ("" where unmeasured); `extra` keys become extra columns. An nll a
    rounding error below 0 (a mean of -log 1 can come out -1e-17) is written as 0, so the table reads back."""
    nll = 0.0 if -NLL_ROUNDING <= nll < 0.0 else nll
    return {"run": run, "k": k, "task": task, "shots": shots, "prob": prob, "nll": nll, "acc": acc, "count": count,
            **extra}


def prob_rows(run: str, k: int, shots: np.ndarray, prob: np.ndarray, count: int,
              **extra: object) -> list[dict[str, object]]:
    """Rows for mean probabilities prob [M, S] known without their prompts (a law's curves, a synthetic
    draw): nll is -log of the mean, acc is left unmeasured."""
    return [curve_row(run, k, i, int(s), float(prob[i, j]), float(-np.log(prob[i, j])), "", count, **extra)
            for i in range(prob.shape[0]) for j, s in enumerate(shots)]


def write_curves(rows: Iterable[Mapping[str, object]], path: str | os.PathLike, append: bool = False,
                 replace: bool = False) -> Path:
    """Write (or append) curve rows atomically; extra keys become extra columns after the contract's.
    Appending rows of a run the table already has is refused, unless `replace` drops its old rows. A file
    at `path` is replaced or appended to only if it is a curves table (or empty): `check_curves_output`."""
    path = Path(path)
    check_curves_output(path)
    rows = list(rows)
    old: list[dict[str, str]] = []
    if append and path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
        # a run's own table holds one block per evaluation: a block is a run at one step
        # step 0 is a step: only a missing step (None or "") is no step
        block = lambda r: (str(r["run"]), "" if r.get("step") in (None, "") else str(r["step"]))  # noqa: E731
        new = {block(r) for r in rows}
        present = sorted({run + (f" (step {step})" if step else "") for run, step in new & {block(r) for r in old}})
        if present and not replace:
            raise UserError(f"{path} already has rows of run {', '.join(present)}; pass --replace to overwrite them, "
                             "or label the new rows with another --run")
        old = [r for r in old if block(r) not in new]
    extra: list[str] = []
    for row in [*old, *rows]:
        extra += [key for key in row if key not in CURVE_COLUMNS and key not in extra]
    columns = [*CURVE_COLUMNS, *extra]
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(rows)
    return path


def check_curves_output(path: str | os.PathLike, flag: str = "") -> None:
    """Refuse, with one line, a file at `path` that is not a curves table (its header lacks the contract's
    columns): writing or appending there would destroy what someone else wrote."""
    check_table_file(Path(path), CURVE_COLUMNS, "curves table", flag)


def _number(path: Path, line: int, column: str, text: str, integer: bool) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{path} line {line}: column {column} is {text!r}, not a number; "
                        "fix or drop that row") from None
    if math.isnan(value):
        raise UserError(f"{path} line {line}: {column} is NaN; drop the row or measure it again")
    if integer and (not math.isfinite(value) or value < 0 or value != int(value) or value >= 2**31):
        raise UserError(f"{path} line {line}: {column} = {text} must be a non-negative integer below 2^31")
    return value


def _check_row(path: Path, line: int, row: dict[str, str]) -> dict[str, object]:
    """The contract's columns of a row, checked and typed (acc: None where unmeasured)."""
    k, task, shots = (int(_number(path, line, c, row[c], True)) for c in ("k", "task", "shots"))
    prob, nll, count = (_number(path, line, c, row[c], False) for c in ("prob", "nll", "count"))
    if not 0.0 <= prob <= 1.0:
        raise UserError(f"{path} line {line}: prob = {row['prob']} is outside [0, 1]; it must be a mean probability")
    if not (math.isfinite(nll) and nll >= -NLL_ROUNDING):
        raise UserError(f"{path} line {line}: nll = {row['nll']} must be finite and >= 0; drop or re-measure the row")
    if not math.isfinite(count) or count < 1 or count != int(count):
        raise UserError(f"{path} line {line}: count = {row['count']} must be a positive integer (prompts averaged)")
    if prob == 0.0 and math.isfinite(nll):
        raise UserError(f"{path} line {line}: prob = 0 with a finite nll = {row['nll']}; a mean probability of 0 "
                         "means every prompt scored 0 (nll inf): fix or drop the row")
    acc = row.get("acc")
    acc = _number(path, line, "acc", acc, False) if acc not in (None, "") else None
    if acc is not None and not 0.0 <= acc <= 1.0:
        raise UserError(f"{path} line {line}: acc = {row['acc']} is outside [0, 1]; it must be a mean accuracy")
    if not row["run"].strip():
        raise UserError(f"{path} line {line}: run is empty; every row needs the label of the run it measures")
    return curve_row(row["run"], k, task, shots, prob, nll, acc, int(count))


def read_rows(path: str | os.PathLike, step: int | None = None) -> list[dict[str, object]]:
    """The checked rows of a curves CSV, contract columns typed and extra columns as text, in file order.

    A run's own table holds one block per evaluation, told apart by its `step` column: each run's last
    step is read, or `step` where given. Raises one-line errors on bad input."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"curves file {path} not found; pass a CSV written by `evaluate.py curves`")
    try:
        return _read_rows(path, step)
    except UnicodeDecodeError:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path} line {number}: not UTF-8 text; save the table as UTF-8 CSV") from None
        raise


def _read_rows(path: Path, step: int | None) -> list[dict[str, object]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a column name
        reader = csv.DictReader(f)
        if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]  # "run, k, task" from a hand-made header
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{path}: missing column(s) {', '.join(missing)}; a curves table needs {', '.join(REQUIRED_COLUMNS)}"
            )
        extra_cols = [c for c in reader.fieldnames if c not in CURVE_COLUMNS]
        rows: list[tuple[tuple[str, int, int], dict[str, object]]] = []
        seen: set[tuple[str, int, int, int, int]] = set()
        for line, raw in enumerate(reader, start=2):
            if None in raw or any(raw[c] is None for c in REQUIRED_COLUMNS):
                raise UserError(f"{path} line {line}: {len(reader.fieldnames)} columns expected; fix or drop that row")
            row = _check_row(path, line, raw)
            at = int(_number(path, line, "step", raw["step"], True)) if raw.get("step") else -1
            key = (row["run"], row["k"], at)
            if (*key, row["task"], row["shots"]) in seen:
                raise UserError(f"{path} line {line}: duplicate row for run {row['run']}, k {row['k']}, "
                                f"task {row['task']}, shots {row['shots']}" + (f", step {at}" if at >= 0 else ""))
            seen.add((*key, row["task"], row["shots"]))
            rows.append((key, {**row, **{c: raw[c] for c in extra_cols}}))
    if not rows:
        raise UserError(f"{path}: the curves table has no rows")
    chosen = _pick_steps(path, list(dict.fromkeys(key for key, _ in rows)), step)
    return [row for key, row in rows if key in chosen]


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
        raise UserError(f"{path}: run {lacking[0]} has no rows at step {step}"
                         + (f"; its steps are {', '.join(map(str, have))}" if have
                            else "; the table has no step column"))
    return {key for key in keys if key[2] == step}


def read_curves(path: str | os.PathLike, step: int | None = None) -> list[CurveGroup]:
    """The (run, k) curve groups of a curves CSV, in first-seen order (rows as `read_rows` picks them)."""
    path = Path(path)
    groups: dict[tuple[str, int], list[dict[str, object]]] = {}
    for row in read_rows(path, step):
        groups.setdefault((row["run"], row["k"]), []).append(row)
    return [_build_group(path, key, rows) for key, rows in groups.items()]


def _build_group(path: Path, key: tuple[str, int], rows: list[dict[str, object]]) -> CurveGroup:
    run, k = key
    tasks = sorted({r["task"] for r in rows})
    if tasks != list(range(len(tasks))):
        raise UserError(f"{path}: run {run}, k {k} has tasks {tasks}; tasks must be numbered 0..M-1 without gaps")
    shots = np.array(sorted({r["shots"] for r in rows}), dtype=np.float64)
    col = {s: j for j, s in enumerate(shots.astype(int))}
    arrays = np.full((3, len(tasks), len(shots)), np.nan)
    for r in rows:
        arrays[:, r["task"], col[r["shots"]]] = r["prob"], r["nll"], r["count"]
    extra = {c: v for c, v in rows[0].items() if c not in CURVE_COLUMNS}
    return CurveGroup(run, k, shots, arrays[0], arrays[1], arrays[2], extra)


def read_prompt_table(path: str | os.PathLike) -> dict[tuple[str, int, int], np.ndarray]:
    """Per-prompt probabilities: a CSV with run, k, task, prompt, shots, prob -> {(run, k, task): [prompts, S]}."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"per-prompt table {path} not found; drop --prompt-table to resample from counts")
    cells: dict = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PROMPT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"a per-prompt table needs {', '.join(PROMPT_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                key = (row["run"], int(row["k"]), int(row["task"]))
                prob = float(row["prob"])
                cells.setdefault(key, {})[(int(row["prompt"]), int(row["shots"]))] = prob
            except ValueError:
                raise UserError(f"{path} line {line}: k, task, prompt, shots must be integers "
                                "and prob a number") from None
            if not 0.0 <= prob <= 1.0:
                raise UserError(f"{path} line {line}: prob = {prob} is outside [0, 1]")
    out = {}
    for key, pts in cells.items():
        prompts = sorted({p for p, _ in pts})
        shots = sorted({s for _, s in pts})
        if len(pts) != len(prompts) * len(shots):
            raise UserError(f"{path}: run {key[0]}, k {key[1]}, task {key[2]} lacks some (prompt, shots) rows; "
                             "every prompt needs every shot count")
        out[key] = np.array([[pts[(p, s)] for s in shots] for p in prompts])
    return out
