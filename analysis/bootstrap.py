"""The shift analysis's intervals: resampled tables (a bootstrap over prompts, or each point redrawn
from its sampling error) and normal bootstrap intervals on a link scale from their fits."""
from __future__ import annotations

import math
import statistics

import numpy as np

from analysis.conditions import Conditions
from user_errors import UserError


def resample_table(cond: Conditions, R: int, rng: np.random.Generator,
                   prompt_probs: dict | None = None) -> np.ndarray:
    """R resampled tables [R, C, M, S]: a bootstrap over prompts where per-prompt probabilities are
    given ({(run, task): [prompts, S]}), otherwise each point redrawn from its count-based sampling error."""
    sample = np.clip(cond.prob[None] + rng.standard_normal((R, *cond.prob.shape)) * cond.sd[None], 1e-6, 1 - 1e-6)
    for c, g in enumerate(cond.groups):
        for i in range(cond.prob.shape[1]):
            table = (prompt_probs or {}).get((g.run, g.k, i))
            if table is not None:
                if table.shape[1] != len(g.shots):
                    raise UserError(f"per-prompt table of run {g.run}, k {g.k}, task {i} has {table.shape[1]} shot "
                                     f"counts, the curves table {len(g.shots)}; write both from the same measurement")
                pick = rng.integers(table.shape[0], size=(R, table.shape[0]))
                cols = np.searchsorted(cond.shots, g.shots)
                sample[:, c, i][:, cols] = table[pick].mean(1)
    return sample


# link scale of each reported quantity: (link, inverse, derivative of the link, range kept inside)
LINKS = {
    "logit": (lambda x: np.log(x) - np.log1p(-x), lambda t: 1.0 / (1.0 + np.exp(-t)),
              lambda x: 1.0 / (x * (1.0 - x)), (1e-15, 1.0 - 1e-15)),
    "log": (np.log, np.exp, lambda x: 1.0 / x, (1e-300, np.inf)),
    "log1p": (np.log1p, np.expm1, lambda x: 1.0 / (1.0 + x), (0.0, np.inf)),
}


def link_interval(point: float, boot: np.ndarray, stderr: float, link: str, level: float) -> tuple[float, float]:
    """Normal bootstrap interval on the link scale: link(point) +- z sd, where sd is the larger of the
    resampled estimates' standard deviation and the curvature's (stderr through the link). Contains
    the estimate by construction; a bound the data do not limit is the range's end."""
    f, inverse, slope, (low, high) = LINKS[link]
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    x = float(np.clip(point, low, high))
    t, tb = f(x), f(np.clip(boot[np.isfinite(boot)], low, high))
    sd_boot = float(np.std(tb, ddof=1)) if len(tb) >= 2 else math.inf
    sd = max(sd_boot, stderr * abs(slope(x)) if np.isfinite(stderr) else math.inf)
    if not np.isfinite(sd):
        return min(0.0, point), max(1.0 if link == "logit" else math.inf, point)
    # the inverse link of link(x) may round away from x: keep the estimate inside at any precision
    lo, hi = np.clip([inverse(t - z * sd), inverse(t + z * sd)], 0.0 if link == "log1p" else low, high)
    return min(float(lo), point), max(float(hi), point)


def shots_interval(point: float, boot: np.ndarray, level: float) -> tuple[float, float]:
    """Interval of a reemergence estimate (inf = not within the horizon), from resampled estimates:
    the normal interval on log(1 + n) of those that recover; its upper end is inf when more than
    (1 - level) / 2 of them never recover, and both ends come from the quantiles when the estimate is inf."""
    alpha = (1.0 - level) / 2.0
    never = ~np.isfinite(boot)
    if not np.isfinite(point):
        # an order statistic, not an interpolation: inf - inf would make it NaN
        return float(np.quantile(np.where(never, np.inf, boot), alpha, method="inverted_cdf")), math.inf
    lo, hi = link_interval(point, boot, math.inf if never.all() else 0.0, "log1p", level)
    return lo, (math.inf if never.mean() > alpha else hi)
