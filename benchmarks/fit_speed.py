"""Fit speed: our batched float64 fitter vs a one-group-at-a-time float32 L-BFGS loop.

Synthetic curves from known Bayesian laws on a grid of model sizes x k x tasks (shots per prompt as
in GINC: 1024 // (k+1), at most 250), fitted with all six laws on both splits, once by each fitter in
the same run. The sequential peer re-implements how the existing research code fits: per curve group,
torch float32 parameters, torch.optim.LBFGS, one start, a Python loop over groups, laws and splits.
It evaluates the same law formulas, so the comparison is of the fitting strategy alone.

    python benchmarks/fit_speed.py            # 7 sizes x 4 k x 5 tasks
    python benchmarks/fit_speed.py --quick    # a small grid for tests
    python benchmarks/fit_speed.py --tol 0    # our fits to rounding, not to the default precision

Prints wall time and mean NRMSE of both, then, last, `ratio_vs_sequential: X` (peer time / ours).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.curves import CurveGroup  # noqa: E402
from analysis.fitting import FitConfig, fit_groups, nrmse, split_masks  # noqa: E402
from analysis.laws import BAYESIAN_NAMES, LAW_NAMES, BayesianLaw, get_law  # noqa: E402
from analysis.synthetic import synthetic_group  # noqa: E402


def make_grid(sizes: int, ks: list[int], tasks: int, max_shots: int, seed: int) -> list[CurveGroup]:
    """One group per (size, k), drawn from one of the Bayesian laws with random parameters, 1,000 prompts' noise."""
    rng = np.random.default_rng(seed)
    groups = []
    for s in range(sizes):
        for k in ks:
            law = BAYESIAN_NAMES[len(groups) % 3]
            gamma = rng.uniform(0.6, 0.95, tasks)
            P = np.where(np.eye(tasks, dtype=bool), gamma[:, None],
                         rng.uniform(0.05, 0.5, (tasks, tasks)) * gamma[None])
            params = {"priors": rng.dirichlet(np.full(tasks, 3.0)).tolist(), "K": float(rng.uniform(0.3, 2.0)),
                      "P": P.tolist(), "gamma": gamma.tolist(), "beta": (gamma * rng.uniform(0.1, 0.6, tasks)).tolist()}
            shots = np.arange(float(min(1024 // (k + 1), max_shots)))
            group, _ = synthetic_group(f"size{s}", k, law, params, shots, tasks, 1000, rng)
            groups.append(group)
    return groups


def make_gradual(per_law: int, tasks: int, max_shots: int, count: int, seed: int) -> list[CurveGroup]:
    """Curves that rise over tens of shots (K 0.1-0.3, beta 50-80% of gamma), `per_law` groups from each
    Bayesian law, with the noise of `count` prompts: where a fit must find the right optimum to extrapolate."""
    rng = np.random.default_rng(seed + 1)
    groups = []
    for law in BAYESIAN_NAMES:
        for j in range(per_law):
            gamma = rng.uniform(0.55, 0.8, tasks)
            beta = gamma * rng.uniform(0.5, 0.8, tasks)
            P = np.where(np.eye(tasks, dtype=bool), gamma[:, None],
                         beta[None, :] * rng.uniform(0.7, 1.3, (tasks, tasks)))
            params = {"priors": rng.dirichlet(np.full(tasks, 3.0)).tolist(), "K": float(rng.uniform(0.1, 0.3)),
                      "P": P.clip(0.01, 0.99).tolist(), "gamma": gamma.tolist(), "beta": beta.tolist()}
            group, _ = synthetic_group(f"gradual-{law}-{j}", 3, law, params, np.arange(float(max_shots)), tasks,
                                       count, rng)
            groups.append(group)
    return groups


def sequential_fit(group: CurveGroup, law_name: str, fit_mask: np.ndarray, max_iter: int) -> np.ndarray:
    """One group, one law, one start, float32 L-BFGS (strong Wolfe line search); returns predicted p [M, S]."""
    law = get_law(law_name)
    M = group.n_tasks
    gen = torch.Generator().manual_seed(0)
    if isinstance(law, BayesianLaw):  # the first of our data-driven starts, so both begin at the same point
        t = lambda a: torch.as_tensor(np.nan_to_num(a), dtype=torch.float64)[None, None]  # noqa: E731
        theta0 = law.starts(1, t(group.prob), t(fit_mask), t(group.shots)[0], gen)[0, 0]
    else:
        theta0 = law.starts(1, torch.as_tensor(np.nan_to_num(group.nll[:, 0], nan=1.0)), gen)[0].flatten()
    theta = torch.nn.Parameter(theta0.float().clone()[None])
    shots = torch.as_tensor(group.shots, dtype=torch.float32)[None]
    y = torch.as_tensor(np.nan_to_num(group.prob), dtype=torch.float32)
    w = torch.as_tensor(fit_mask, dtype=torch.float32)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((law.log_prob(theta, shots, M, 1)[0, 0].exp() - y) ** 2 * w).sum()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # float32 L-BFGS can step to an overflow; the research loop had no guard either
        return np.full(group.prob.shape, np.nan)
    with torch.no_grad():
        return law.log_prob(theta, shots, M, 1)[0, 0].exp().double().numpy()


def run_sequential(groups: list[CurveGroup], laws: tuple[str, ...], fraction: float, max_iter: int) -> dict:
    """NRMSE of every (law, split) fit, NaN where the fit broke down."""
    scores: dict[tuple[str, str], list[float]] = {}
    t0 = time.perf_counter()
    for j, g in enumerate(groups, start=1):
        for law in laws:
            for split in ("interpolation", "extrapolation"):
                fit_mask, eval_mask = split_masks(g, split, fraction if split == "extrapolation" else None)
                pred = sequential_fit(g, law, fit_mask, max_iter)
                score = nrmse(pred, g.prob, eval_mask)
                scores.setdefault((law, split), []).append(score if np.isfinite(score) else np.nan)
        print(f"  sequential: group {j}/{len(groups)} done at {time.perf_counter() - t0:.1f}s", flush=True)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 size x 1 k x 3 tasks, 60 shots (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference is a 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-max-iter", type=int, default=500, help="L-BFGS iterations per sequential fit")
    parser.add_argument("--device", default="cpu", help="where our batched fitter runs (the peer stays on the CPU)")
    parser.add_argument("--tol", type=float, default=FitConfig.tol,
                        help="our fits' precision in chi-square (0: to rounding)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        groups = make_grid(1, [3], 3, 60, args.seed) + make_gradual(1, 3, 60, 200, args.seed)
    else:
        groups = make_grid(7, [3, 5, 8, 10], 5, 250, args.seed) + make_gradual(4, 5, 101, 200, args.seed)
    n_curves = sum(g.n_tasks for g in groups)
    print(f"grid: {len(groups)} groups, {n_curves} curves, {sum(g.mask.sum() for g in groups)} points; "
          f"6 laws x 2 splits; {args.threads} threads; our tol {args.tol:g}")
    config = FitConfig(laws=LAW_NAMES, fractions=(0.1,), device=args.device, tol=args.tol)
    t0 = time.perf_counter()
    ours = fit_groups(groups, config, stream=sys.stdout)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = run_sequential(groups, LAW_NAMES, 0.1, args.peer_max_iter)
    t_peer = time.perf_counter() - t0
    print(f"{'law':<18} {'split':<14} {'ours NRMSE':>11} {'sequential NRMSE':>17} {'sequential failed':>18}")
    for (law, split), theirs in peer.items():
        mine = np.mean([r.nrmse for r in ours if r.law == law and r.split == split])
        theirs = np.array(theirs)
        print(f"{law:<18} {split:<14} {mine:>11.4f} {np.nanmean(theirs):>17.4f} {int(np.isnan(theirs).sum()):>18}")
    not_converged = sum(not r.converged for r in ours)
    all_peer = np.concatenate([np.array(v) for v in peer.values()])
    ok = ~np.isnan(all_peer)
    mine_all = np.array([r.nrmse for law, split in peer for r in ours if r.law == law and r.split == split])
    print(f"ours: {t_ours:.1f}s on {args.device}, mean NRMSE {mine_all.mean():.4f} "
          f"({mine_all[ok].mean():.4f} on the fits where sequential did not fail), "
          f"{len(ours) - not_converged}/{len(ours)} converged")
    print(f"sequential: {t_peer:.1f}s on cpu, mean NRMSE {np.nanmean(all_peer):.4f} "
          f"({int((~ok).sum())} fits not finite, left out of its mean)")
    gradual = [j for j, g in enumerate(groups) if g.run.startswith("gradual")]
    for law in BAYESIAN_NAMES:
        mine = [r.nrmse for r in ours
                if r.law == law and r.split == "extrapolation" and r.group.run.startswith("gradual")]
        theirs = np.array(peer[(law, "extrapolation")])[gradual]
        print(f"gradual curves, {law} extrapolation NRMSE: ours {np.mean(mine):.4f}, "
              f"sequential {np.nanmean(theirs):.4f}")
    print(f"ratio_vs_sequential: {t_peer / t_ours:.1f}")


if __name__ == "__main__":
    main()
