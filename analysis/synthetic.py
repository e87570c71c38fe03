"""Synthetic curves from known law parameters, with the sampling noise of averaging `count` prompts.

Tests and the benchmark use them to check that fits recover the parameters that made the curves.
"""
from __future__ import annotations

import numpy as np
import torch

from analysis.curves import CurveGroup, standard_error
from analysis.laws import get_law


def law_prob(law_name: str, params: dict, shots: np.ndarray, M: int, C: int = 1) -> np.ndarray:
    """Noise-free p [C, M, S] of a law with named parameters (as `named` reports them)."""
    law = get_law(law_name)
    theta = law.theta_from(params)[None]
    with torch.no_grad():
        log_p = law.log_prob(theta, torch.as_tensor(shots, dtype=torch.float64)[None], M, C)
    return log_p[0].exp().numpy()


def add_noise(prob: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Measured means: the true p plus the sampling error of `count` prompts, kept inside (0, 1)."""
    noisy = prob + rng.standard_normal(prob.shape) * standard_error(prob, count)
    return np.clip(noisy, 1e-6, 1.0 - 1e-6)


def synthetic_group(run: str, k: int, law_name: str, params: dict, shots: np.ndarray, M: int, count: int,
                    rng: np.random.Generator) -> tuple[CurveGroup, np.ndarray]:
    """A measured-looking group drawn from a law, and its noise-free p [M, S]."""
    truth = law_prob(law_name, params, shots, M)[0]
    prob = add_noise(truth, count, rng)
    return CurveGroup(run, k, np.asarray(shots, dtype=np.float64), prob, -np.log(prob),
                      np.full_like(prob, count)), truth
