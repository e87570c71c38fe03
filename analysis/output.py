"""Atomic output directories and small writers shared by the fit and shift reports."""
from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success its entries replace those in `out`.

    A failure leaves `out` as it was (no half-written report); entries of an older report that the new
    one does not write are kept."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for entry in tmp.iterdir():
            dest = out / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def shots_grid(max_shots: float, points: int = 300) -> np.ndarray:
    """Shots at which to draw a law: dense near 0 (where curves turn fastest), log-spaced beyond."""
    near = np.linspace(0.0, min(2.0, max_shots), 60)
    far = np.geomspace(min(2.0, max_shots) or 1.0, max(max_shots, 1.0), points)
    return np.unique(np.concatenate([near, far]))
