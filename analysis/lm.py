"""Batched Levenberg-Marquardt: many independent least-squares problems in one set of tensor ops.

Each batch row (a curve group x start) keeps its own damping, accepts or rejects its own steps and
stops on its own, so one hard group neither slows nor destabilises the others (one L-BFGS on the summed
loss would share its line search). Rows that have stopped drop out of the active set.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# residual_fn(theta [A, D], rows [A]) -> residuals [A, N], jacobian [A, N, D] for batch rows `rows`.
ResidualFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LMResult:
    theta: torch.Tensor  # [B, D]
    cost: torch.Tensor  # [B], half the sum of squared residuals; inf where never finite
    converged: torch.Tensor  # [B] bool: stopped improving before max_iter with a finite cost
    iterations: int


def _normal_equations(r: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """J^T J [A, D, D], J^T r [A, D] and the cost 0.5 |r|^2 [A] (inf where not finite)."""
    c = 0.5 * (r * r).sum(-1)
    cost = torch.where(torch.isfinite(c), c, torch.full_like(c, float("inf")))
    return J.transpose(1, 2) @ J, torch.einsum("bn,bnd->bd", r, J), cost


def levenberg_marquardt(
    residual_fn: ResidualFn,
    theta0: torch.Tensor,
    max_iter: int = 200,
    ftol: float = 1e-7,
    patience: int = 6,
    crawl_tol: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
    starts_of: torch.Tensor | None = None,
    prune_ratio: float = 1.05,
) -> LMResult:
    """Minimise 0.5 ||r_b(theta_b)||^2 for every row b; stop a row after `patience` steps that
    improve its cost by less than `ftol` relatively (rejected steps count as no improvement), or once
    ten iterations together improve it by less than `crawl_tol` relatively: a crawl along a valley to a
    parameter at infinity (e.g. the logistic law's x0 -> 0 with L x0^kappa fixed) that would otherwise
    run to max_iter while the fit's RMSE moves by less than 0.05% per ten iterations.

    starts_of [B] names the problem each row is a start of: every other iteration, a start whose cost
    is above (prune_ratio + 2 / iteration) x the best start of its problem is dropped (left
    unconverged). The margin is wide while starts still descend and narrows as they settle; a start
    that stays well behind the best sits in a worse basin, and most of a multi-start fit's work would
    otherwise go into such starts."""
    theta = theta0.clone()
    B, D = theta.shape
    dev = theta.device
    # only the normal equations (J^T J, J^T r) are kept between iterations, not the [B, N, D] Jacobian
    A, g, cost = _normal_equations(*residual_fn(theta, torch.arange(B, device=dev)))
    cost_ref = cost.clone()
    lam = torch.full((B,), 1e-3, dtype=theta.dtype, device=dev)
    stall = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    pruned = torch.zeros(B, dtype=torch.bool, device=dev)
    eye = torch.eye(D, dtype=theta.dtype, device=dev)
    it = 0
    for it in range(1, max_iter + 1):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        Aa = A[idx]
        diag = Aa.diagonal(dim1=-2, dim2=-1)
        damp = lam[idx, None] * diag + 1e-10 * diag.amax(-1, keepdim=True).clamp_min(1e-30)
        L, info = torch.linalg.cholesky_ex(Aa + torch.diag_embed(damp) + 1e-30 * eye)
        delta = -torch.cholesky_solve(g[idx].unsqueeze(-1), L).squeeze(-1)
        ok = (info == 0) & torch.isfinite(delta).all(-1)
        trial = theta[idx] + torch.where(ok[:, None], delta, torch.zeros_like(delta))
        A_new, g_new, cost_new = _normal_equations(*residual_fn(trial, idx))
        accept = ok & (cost_new < cost[idx])
        gain = (cost[idx] - cost_new) / cost[idx].clamp_min(1e-300)
        improving = accept & (gain > ftol)
        moved = idx[accept]
        theta[moved], A[moved], g[moved], cost[moved] = trial[accept], A_new[accept], g_new[accept], cost_new[accept]
        lam[idx] = torch.where(accept, lam[idx] * 0.3, lam[idx] * 10.0).clamp(1e-12, 1e12)
        stall[idx] = torch.where(improving, torch.zeros_like(stall[idx]), stall[idx] + 1)
        active[idx] = stall[idx] < patience
        if it % 10 == 0:
            crawling = (cost_ref - cost) <= crawl_tol * cost
            active &= ~crawling
            cost_ref = cost.clone()
        if starts_of is not None and it % 2 == 0:
            best = torch.full((int(starts_of.max()) + 1,), float("inf"), dtype=cost.dtype, device=dev)
            best = best.scatter_reduce(0, starts_of, cost, reduce="amin")
            dominated = cost > (prune_ratio + 2.0 / it) * best[starts_of]
            active &= ~dominated
            pruned |= dominated
        if progress is not None:
            progress(it, int(active.sum()))
    converged = ~active & ~pruned & torch.isfinite(cost)
    return LMResult(theta=theta, cost=cost, converged=converged, iterations=it)
