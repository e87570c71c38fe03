"""The curves table (DESIGN.md contract): one row per (run, k, task, shots)."""
from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

CURVE_COLUMNS = ("run", "k", "task", "shots", "prob", "nll", "acc", "count")


def write_curves(rows: Iterable[Mapping[str, object]], path: str | os.PathLike, append: bool = False) -> Path:
    """Write (or append) curve rows atomically; extra keys become extra columns after the contract's."""
    path = Path(path)
    rows = list(rows)
    old: list[dict[str, str]] = []
    if append and path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
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
    os.replace(tmp, path)
    return path

