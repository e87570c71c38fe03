"""Shift speed: the shift analysis of a paper-sized table vs the same analysis done the straightforward way.

The table is drawn here from known parameters of one Bayesian law (`--law`, seeded): 7 model sizes x 2 k
x 25 conditions (the pretrained model, then SFT/DPO x favour/disfavour x 6 amounts), 5 tasks, shots
0-100, each point with the noise of 200 prompts. The priors of task 0 (the favoured task) move with the
amount; P is shared by a model's conditions at one k, so the joint fit of the generating law is the true
model and its intervals should cover.

Ours: `analysis.shift.analyse_shift` with its defaults, once per model, timed end to end, as ablate.py
runs it: the law is chosen at each k by BIC among the three Bayesian laws (which law was chosen is printed).
The straightforward way: every fit on its own, with scipy's least_squares (trust region, the law's
analytic Jacobian), from the same starts as ours, in a Python loop over tables, conditions and starts;
the joint fit, the free fit per condition, and each resampled table. It takes hours on the whole
table, so it runs on the first model at the first k with `--peer-resamples` resampled tables, and ours
runs that same problem too, both with the generating law: the ratio is of equal work. Both are checked
against each other (point estimates) and against the truth (how often bootstrap intervals cover it).

    python benchmarks/shift_speed.py                         # the paper-sized table, sampling-wise law
    python benchmarks/shift_speed.py --law bayesian_scoring  # drawn from another law
    python benchmarks/shift_speed.py --quick                 # a small table for tests (seconds)

Prints the times, the agreement and the coverage, then, last, `ratio_vs_straightforward: X`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.bootstrap import link_interval, resample_table  # noqa: E402
from analysis.conditions import select_conditions  # noqa: E402
from analysis.curves import CurveGroup  # noqa: E402
from analysis.laws import BAYESIAN_NAMES, get_law  # noqa: E402
from analysis.shift import ShiftConfig, analyse_shift  # noqa: E402
from analysis.shift_fits import _batch, fit_model, named_per_condition, per_condition_thetas  # noqa: E402
from analysis.synthetic import add_noise, law_prob  # noqa: E402

METHODS, DIRECTIONS = ("sft", "dpo"), ("favor", "disfavor")


def paper_table(law: str, sizes: int, ks: tuple[int, ...], amounts: tuple[int, ...], tasks: int, shots: int,
                count: int, seed: int) -> tuple[list[CurveGroup], dict]:
    """Curve groups of every (model, k, condition) and the true named parameters of each {(run, k): params}."""
    rng = np.random.default_rng(seed)
    groups, truth = [], {}
    x = np.arange(float(shots))
    conditions = [("pretrain", "", "", 0)] + [("post", m, d, a) for m in METHODS for d in DIRECTIONS for a in amounts]
    for s in range(sizes):
        model = f"gpt2-{s + 1}l"
        for k in ks:
            gamma = rng.uniform(0.6, 0.9, tasks)
            beta = gamma * rng.uniform(0.2, 0.5, tasks)
            base = np.log(rng.dirichlet(np.full(tasks, 3.0)))
            # the original law's P: each off-diagonal entry its own (the tied laws' beta, scattered by 30%)
            P = np.where(np.eye(tasks, dtype=bool), gamma[:, None], beta[None, :] * (
                rng.uniform(0.7, 1.3, (tasks, tasks)) if law == "bayesian" else 1.0)).clip(max=0.99)
            for stage, method, direction, amount in conditions:
                logit = base.copy()
                logit[0] += (1.0 if direction == "favor" else -1.0) * 1.5 * np.log1p(amount / 250)
                priors = np.exp(logit - logit.max())
                params = {"priors": (priors / priors.sum()).tolist(), "K": float(rng.uniform(0.3, 1.0)),
                          "gamma": gamma.tolist(), "beta": beta.tolist(),
                          "P": P.tolist()}
                prob = add_noise(law_prob(law, params, x, tasks)[0], count, rng)
                run = f"{model}/pretrain" if stage == "pretrain" else f"{model}/{method}-{direction}-{amount}"
                extra = {"model": model, "stage": "pretrain" if stage == "pretrain" else method, "method": method,
                         "direction": direction, "amount": str(amount) if amount else ""}
                groups.append(CurveGroup(run, k, x, prob, -np.log(prob), np.full_like(prob, count), extra))
                truth[(run, k)] = params
    return groups, truth


def lsq_fit(law_name: str, batch, C: int, starts: torch.Tensor, max_iter: int) -> np.ndarray:
    """The best of scipy least_squares runs from each start [E, D] on one table (batch of one group)."""
    law = get_law(law_name)
    _, _, M, _ = batch.prob.shape
    shots, w, y = batch.shots[:1], batch.weight[0].numpy().ravel(), batch.prob[0].numpy().ravel()

    def residual(theta):
        log_p = law.log_prob(torch.from_numpy(theta)[None], shots, M, C)[0].numpy().ravel()
        return w * (np.exp(log_p) - y)

    def jacobian(theta):
        log_p, jac = law.log_prob_and_jacobian(torch.from_numpy(theta)[None], shots, M, C)
        return (w * np.exp(log_p[0].numpy().ravel()))[:, None] * jac[0].reshape(-1, theta.shape[0]).numpy()

    best, best_cost = None, np.inf
    for start in starts.numpy():
        try:
            fit = least_squares(residual, start, jac=jacobian, method="trf", max_nfev=max_iter)
        except ValueError:  # a start whose residuals are not finite
            continue
        if fit.cost < best_cost:
            best, best_cost = fit.x, fit.cost
    return best


def straightforward(cond, config: ShiftConfig, resamples: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The joint and free fits of one (model, k) and of each resampled table, one least_squares call at a
    time, from the same starts as ours: {fit: (theta as ours [1, D] or [C, D], resampled [R, ...])}."""
    law = get_law(config.law)
    C, M, _ = cond.prob.shape
    gen = lambda: torch.Generator().manual_seed(config.seed)  # noqa: E731

    def data_starts(batch, n):
        return law.starts(n, batch.prob, batch.weight, batch.shots, gen())[0]

    def joint(prob, n, extra):
        batch = _batch(cond, prob[None], cond.mask, True)
        starts = torch.cat([data_starts(batch, n), extra[None]]) if extra is not None else data_starts(batch, n)
        return torch.from_numpy(lsq_fit(config.law, batch, C, starts, config.max_iter))

    def free(prob, n, extra):
        batch = _batch(cond, prob[None], cond.mask, False)  # C problems of one condition each
        thetas = []
        for c in range(C):
            one = type(batch)(batch.shots[c:c + 1], batch.prob[c:c + 1], batch.nll[c:c + 1], batch.weight[c:c + 1])
            starts = torch.cat([data_starts(one, n), extra[c]])
            thetas.append(torch.from_numpy(lsq_fit(config.law, one, 1, starts, config.max_iter)))
        return torch.stack(thetas)

    shared = joint(cond.prob, config.starts, None)
    nested = per_condition_thetas(config.law, shared, M, C)[:, None]  # the free fit also starts from the joint
    free_point = free(cond.prob, config.starts, nested)
    shared_boot = torch.stack([joint(sample, config.resample_starts, shared) for sample in resamples])
    free_boot = torch.stack([free(sample, config.resample_starts, free_point[:, None]) for sample in resamples])
    return {"shared": (shared[None], shared_boot), "free": (free_point, free_boot)}


def chi2(law_name: str, theta: torch.Tensor, cond, shared: bool) -> np.ndarray:
    """Chi-square of point thetas on the measured table: one value for the joint fit, one per condition for the free."""
    C, M, _ = cond.prob.shape
    batch = _batch(cond, cond.prob[None], cond.mask, shared)
    log_p = get_law(law_name).log_prob(theta, batch.shots, M, C if shared else 1)
    return (batch.weight * (log_p.exp() - batch.prob)).square().sum((1, 2, 3)).numpy()


def coverage(law_name: str, point: torch.Tensor, boot: torch.Tensor, shared: bool, cond, truth: dict,
             level: float) -> tuple[int, int]:
    """How many of the (condition, task) prior intervals and condition K intervals (bootstrap sd on the
    link scale) contain the truth: (covered, total)."""
    C, M, _ = cond.prob.shape
    est = named_per_condition(law_name, point[0] if shared else point, shared, M, C)
    resampled = [named_per_condition(law_name, t, shared, M, C) for t in boot]
    covered = total = 0
    for c, g in enumerate(cond.groups):
        true = truth[(g.run, g.k)]
        for i in range(M):
            lo, hi = link_interval(est[c]["priors"][i], np.array([b[c]["priors"][i] for b in resampled]), 0.0,
                                   "logit", level)
            covered, total = covered + (lo <= true["priors"][i] <= hi), total + 1
        lo, hi = link_interval(est[c]["K"], np.array([b[c]["K"] for b in resampled]), 0.0, "log", level)
        covered, total = covered + (lo <= true["K"] <= hi), total + 1
    return covered, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 sizes x 1 k x 5 conditions, 31 shots, 10 resamples")
    parser.add_argument("--peer-resamples", type=int, default=10,
                        help="resampled tables of the straightforward run (and of ours on the same problem)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--law", choices=BAYESIAN_NAMES, default="bayesian_sampling",
                        help="the law the table is drawn from")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    threadpool_limits(1)
    law = args.law
    if args.quick:
        sizes, ks, amounts, shots, config = 2, (3,), (250, 2500), 31, ShiftConfig(baseline="", resamples=10)
        args.peer_resamples = min(args.peer_resamples, 4)
    else:
        sizes, ks, amounts, shots, config = 7, (3, 5), (50, 250, 500, 1000, 2500, 5000), 101, ShiftConfig(baseline="")
    groups, truth = paper_table(law, sizes, ks, amounts, 5, shots, 200, args.seed)
    print(f"table: {sizes} models x {len(ks)} k x {1 + 4 * len(amounts)} conditions x 5 tasks x {shots} shots "
          f"= {sum(g.prob.size for g in groups)} rows; drawn from {law}; {config.resamples} resamples, {config.starts} "
          f"starts, law {config.law or 'chosen by BIC'}, tol {config.tol:g}")

    t0 = time.perf_counter()
    results = []
    for s in range(sizes):
        config.baseline = f"gpt2-{s + 1}l/pretrain"
        results.append(analyse_shift(groups, config))
        print(f"  model {s + 1}/{sizes}: {time.perf_counter() - t0:.1f}s so far; laws used: "
              + ", ".join(f"k={k} {choice}" for k, choice in results[-1].chosen_laws().items()), flush=True)
    t_table = time.perf_counter() - t0
    chosen = [law_used for result in results for law_used in result.chosen_laws().values()]
    rows = [r for result in results for r in result.rows if r["fit"] == "shared"]
    covered = sum(r["prior_lo"] <= truth[(r["run"], r["k"])]["priors"][r["task"]] <= r["prior_hi"] for r in rows)
    k_rows = [r for r in rows if r["task"] == 0]
    covered_0 = sum(r["prior_lo"] <= truth[(r["run"], r["k"])]["priors"][0] <= r["prior_hi"] for r in k_rows)
    covered_K = sum(r["K_lo"] <= truth[(r["run"], r["k"])]["K"] <= r["K_hi"] for r in k_rows)
    print(f"ours, whole table: {t_table:.1f}s; the generating law ({law}) chosen at {chosen.count(law)} "
          f"of {len(chosen)} (model, k); joint-fit intervals cover the favoured task's true prior "
          f"{covered_0}/{len(k_rows)} ({covered_0 / len(k_rows):.1%}), every true prior {covered}/{len(rows)} "
          f"({covered / len(rows):.1%}), the true K {covered_K}/{len(k_rows)} ({covered_K / len(k_rows):.1%})")

    # the same problem both ways: the first model at the first k, `peer_resamples` resampled tables
    cond = select_conditions(groups, "gpt2-1l/pretrain")[0]
    small = ShiftConfig(baseline="gpt2-1l/pretrain", law=law, resamples=args.peer_resamples, starts=config.starts)
    resamples = resample_table(cond, small.resamples, np.random.default_rng(args.seed))
    t0 = time.perf_counter()
    ours = {"shared": fit_model(cond, small, resamples)}
    ours["free"] = fit_model(cond, small, resamples, ours["shared"])
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = straightforward(cond, small, resamples)
    t_peer = time.perf_counter() - t0
    C, M, _ = cond.prob.shape
    print(f"one problem ({C} conditions at k={cond.k}, {small.resamples} resampled tables, {law}), "
          "joint and free fits:")
    for name in ("shared", "free"):
        shared = name == "shared"
        mine = named_per_condition(law, ours[name].theta[0] if shared else ours[name].theta, shared, M, C)
        theirs = named_per_condition(law, peer[name][0][0] if shared else peer[name][0], shared, M, C)
        d_prior = max(abs(a - b) for m, t in zip(mine, theirs) for a, b in zip(m["priors"], t["priors"]))
        d_K = max(abs(m["K"] / t["K"] - 1) for m, t in zip(mine, theirs))
        x_ours, x_peer = chi2(law, ours[name].theta, cond, shared), chi2(law, peer[name][0], cond, shared)
        same = np.abs(x_ours - x_peer) <= np.maximum(small.tol, 1e-6 * x_peer)  # the fits' stated precision
        c_ours = coverage(law, ours[name].theta, ours[name].resampled, shared, cond, truth, small.level)
        c_peer = coverage(law, peer[name][0], peer[name][1], shared, cond, truth, small.level)
        print(f"  {name}: chi-square {x_ours.sum():.3f} (ours) vs {x_peer.sum():.3f}; {int(same.sum())}/{len(same)} "
              f"fits reach the same optimum (within {small.tol:g} in chi-square, the precision ours stops at), "
              f"{int((x_ours < x_peer - small.tol).sum())} a lower one by ours, "
              f"{int((x_peer < x_ours - small.tol).sum())} by the straightforward way")
        print(f"  {name}: point estimates differ by at most {d_prior:.2e} in a prior, {d_K:.2e} relative in K; "
              f"intervals cover the truth {c_ours[0]}/{c_ours[1]} (ours) vs {c_peer[0]}/{c_peer[1]} (straightforward)")
    print(f"ours: {t_ours:.1f}s, straightforward: {t_peer:.1f}s on the same problem")
    print(f"ratio_vs_straightforward: {t_peer / t_ours:.1f}")


if __name__ == "__main__":
    main()
