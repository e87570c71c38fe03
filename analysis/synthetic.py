"""Synthetic curves from known law parameters, with the sampling noise of averaging `count` prompts.

Tests and the benchmark use them to check that fits recover the parameters that made the curves.
"""
from __future__ import annotations

import numpy as np
import torch

from analysis.curves import CurveGroup
from analysis.laws import get_law


def law_prob(law_name: str, params: dict, shots: np.ndarray, M: int, C: int = 1) -> np.ndarray:
    """Noise-free p [C, M, S] of a law with named parameters (as `named` reports them)."""
    law = get_law(law_name)
    theta = law.theta_from(params)[None]
    with torch.no_grad():
        log_p = law.log_prob(theta, torch.as_tensor(shots, dtype=torch.float64)[None], M, C)
    return log_p[0].exp().numpy()


def noise_sd(prob: np.ndarray, count: np.ndarray | float) -> np.ndarray:
    """Standard error of a mean of `count` per-prompt probabilities, taken as Bernoulli-like: sqrt(p(1-p)/count).

    p is kept half a prompt away from 0 and 1 so that a measured 0 or 1 still gets a non-zero error."""
    count = np.asarray(count, dtype=np.float64)
    p = np.clip(prob, 0.5 / count, 1.0 - 0.5 / count)
    return np.sqrt(p * (1.0 - p) / count)


def add_noise(prob: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Measured means: the true p plus the sampling error of `count` prompts, kept inside (0, 1)."""
    noisy = prob + rng.standard_normal(prob.shape) * noise_sd(prob, count)
    return np.clip(noisy, 1e-6, 1.0 - 1e-6)


def curve_rows(run: str, k: int, shots: np.ndarray, prob: np.ndarray, count: int, **extra) -> list[dict]:
    """Rows of the curves table for prob [M, S]; nll is -log of the mean, acc is left unmeasured."""
    return [
        {"run": run, "k": k, "task": i, "shots": int(s), "prob": float(prob[i, j]), "nll": float(-np.log(prob[i, j])),
         "acc": "", "count": count, **extra}
        for i in range(prob.shape[0]) for j, s in enumerate(shots)
    ]


def synthetic_group(run: str, k: int, law_name: str, params: dict, shots: np.ndarray, M: int, count: int,
                    rng: np.random.Generator) -> tuple[CurveGroup, np.ndarray]:
    """A measured-looking group drawn from a law, and its noise-free p [M, S]."""
    truth = law_prob(law_name, params, shots, M)[0]
    prob = add_noise(truth, count, rng)
    return CurveGroup(run, k, np.asarray(shots, dtype=np.float64), prob, -np.log(prob), np.full_like(prob, count)), truth
