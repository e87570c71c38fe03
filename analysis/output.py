"""Small helpers the fit and shift reports share: markdown tables, file names of labels, shots to draw a law at."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def file_names(labels: Sequence[str]) -> dict[str, str]:
    """A file name for each distinct label: its safe_name, plus a hash of the label where two labels
    would share one (a/b and a_b), whatever order they come in."""
    safe = {label: safe_name(label) for label in dict.fromkeys(labels)}
    shared = {name for name in safe.values() if list(safe.values()).count(name) > 1}
    return {label: f"{name}-{hashlib.sha1(label.encode()).hexdigest()[:6]}" if name in shared else name
            for label, name in safe.items()}


def shots_grid(max_shots: float, points: int = 300) -> np.ndarray:
    """Shots at which to draw a law: dense near 0 (where curves turn fastest), log-spaced beyond."""
    near = np.linspace(0.0, min(2.0, max_shots), 60)
    far = np.geomspace(min(2.0, max_shots) or 1.0, max(max_shots, 1.0), points)
    return np.unique(np.concatenate([near, far]))
