"""The curves table (docs/design.md): one row per (run, k, task, shots)."""
from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from analysis.output import umask

CURVE_COLUMNS = ("run", "k", "task", "shots", "prob", "nll", "acc", "count")


def write_curves(rows: Iterable[Mapping[str, object]], path: str | os.PathLike, append: bool = False,
                 replace: bool = False) -> Path:
    """Write (or append) curve rows atomically; extra keys become extra columns after the contract's.
    Appending rows of a run the table already has is refused, unless `replace` drops its old rows."""
    path = Path(path)
    rows = list(rows)
    old: list[dict[str, str]] = []
    if append and path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
        # a run's own table holds one block per evaluation: a block is a run at one step
        block = lambda r: (str(r["run"]), str(r.get("step", "") or ""))  # noqa: E731
        new = {block(r) for r in rows}
        present = sorted({run + (f" (step {step})" if step else "") for run, step in new & {block(r) for r in old}})
        if present and not replace:
            raise ValueError(f"{path} already has rows of run {', '.join(present)}; pass --replace to overwrite them, "
                             "or label the new rows with another --run")
        old = [r for r in old if block(r) not in new]
    extra: list[str] = []
    for row in [*old, *rows]:
        extra += [key for key in row if key not in CURVE_COLUMNS and key not in extra]
    columns = [*CURVE_COLUMNS, *extra]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(rows)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
    os.replace(tmp, path)
    return path

