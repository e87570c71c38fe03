"""Curve groups: the M task curves of one (run, k), as the laws and the fitter take them.

Reading and writing the curves table itself is `contracts.curves_table`'s job; nothing here does I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CONDITION_COLUMNS = ("stage", "method", "direction", "amount")  # extra columns that label a post-training condition


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

    def __repr__(self) -> str:  # the arrays would fill a notebook cell
        return (f"CurveGroup(run={self.run!r}, k={self.k}, tasks={self.n_tasks}, shots={len(self.shots)} "
                f"from {self.shots.min():g} to {self.shots.max():g})")


def standard_error(prob: np.ndarray, count: np.ndarray | float) -> np.ndarray:
    """Standard error of a mean of `count` per-prompt probabilities, taken as Bernoulli-like: sqrt(p(1-p)/count).

    p is kept half a prompt away from 0 and 1 so that a measured 0 or 1 still gets a non-zero error."""
    count = np.asarray(count, dtype=np.float64)
    p = np.clip(prob, 0.5 / count, 1.0 - 0.5 / count)
    return np.sqrt(p * (1.0 - p) / count)


def rise(curve: np.ndarray, window: int = 5) -> tuple[float, float]:
    """(rise, shots to 90% of it) of one mean curve over shots 0, 1, 2, ...: the rise is the mean of its last
    `window` points minus its zero-shot point, and the shots are the first n whose running mean over n ..
    n + window - 1 reaches the zero-shot point plus 90% of the rise (NaN where the curve does not rise)."""
    curve = np.asarray(curve, dtype=np.float64)
    total = float(curve[-window:].mean() - curve[0])
    if not total > 0:
        return total, math.nan
    running = np.convolve(curve, np.ones(window) / window, mode="valid")
    return total, float(np.argmax(running >= curve[0] + 0.9 * total))
