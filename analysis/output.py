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


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out: Path) -> None:
    """One `error:` line for an output directory that cannot be written, before any work starts."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory path (it is created if missing)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out} lies under {existing}, which is a file; choose another path")
    writable = existing if existing != out else out.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {writable} is not writable; choose a directory you can write to")


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Check `out`, then yield a fresh directory beside it; on success that directory replaces `out` as
    a whole (the old one is moved aside, then removed), so a reader sees the old report or the new one,
    never a mix. A failure leaves `out` as it was. Modes follow the umask."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_rows(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Rows as a CSV (the union of their keys as columns, in first-seen order), swapped in whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    write_csv(tmp, list(dict.fromkeys(key for row in rows for key in row)), rows)
    os.replace(tmp, path)
    return path


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
