"""Batched Levenberg-Marquardt: many independent least-squares problems in one set of tensor ops.

Each batch row (a curve group x start) keeps its own damping, accepts or rejects its own steps and
stops on its own, so one hard group neither slows nor destabilises the others (one L-BFGS on the summed
loss would share its line search). Rows that have stopped drop out of the active set.

What is minimised is 0.5 |r|^2 + 0.5 ridge |theta|^2: the ridge is a weak Gaussian prior on the
unconstrained parameters. It gives every problem a unique optimum, also in directions the data do not
determine (a prior at 0, a K the curves cannot tell from infinity), which otherwise drift wherever
rounding pushes them; with it, a fit ends at the same point from any path.

A row's result does not depend on the other rows: on the CPU the normal equations and the solves go
through numpy, which calls BLAS/LAPACK once per row on a copy of the same layout, while torch's batched
CPU BLAS may pick kernels by batch size and alignment (seen to change fits by 1e-2 on some CPUs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# residual_fn(theta [A, D], rows [A]) -> residuals [A, N] and the Jacobian for batch rows `rows`: either
# dense [A, N, D], or as (shared [A, N, Ds], own [A, C, N / C, Do]) where the last C * Do parameters
# come in C blocks and block c moves only residuals c * N / C to (c + 1) * N / C (a joint fit's
# per-condition parameters).
ResidualFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]

# converged: the Gauss-Newton step from the point is below XTOL * (1 + max |theta|) in every parameter,
# or the gain it predicts is below FTOL of the objective (as MINPACK's tests on step and predicted gain)
XTOL = 1e-9
FTOL = 1e-10
ROUNDING = 1e-12  # relative error of an objective summed over up to ~10^4 points, with margin
CHUNK_ELEMENTS = 1 << 24  # rows per residual_fn call are capped so a Jacobian chunk stays near 128 MB


@dataclass
class LMResult:
    theta: torch.Tensor  # [B, D]
    cost: torch.Tensor  # [B], 0.5 |r|^2 of the data; inf where never finite
    objective: torch.Tensor  # [B], cost + 0.5 ridge |theta|^2, what was minimised
    converged: torch.Tensor  # [B] bool: at a stationary point by the XTOL/FTOL tests
    iterations: int


def normal_equations(r: torch.Tensor, J: torch.Tensor, J_own: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """J^T J [A, D, D], J^T r [A, D] and the cost 0.5 |r|^2 [A] (inf where not finite), row by row;
    with J_own, J is the shared columns and J_own the per-condition blocks (see ResidualFn)."""
    if r.device.type == "cpu":
        mm = lambda a, b: torch.from_numpy(np.matmul(a.numpy(), b.numpy()))  # noqa: E731
        cost = torch.from_numpy(0.5 * np.square(r.numpy()).sum(-1))
    else:
        mm, cost = torch.matmul, 0.5 * (r * r).sum(-1)
    Jt = J.transpose(-1, -2)
    A, g = mm(Jt, J), mm(Jt, r[..., None])[..., 0]
    if J_own is not None:
        B, C, Nc, Do = J_own.shape
        Ds = J.shape[-1]
        r_c, Ot = r.reshape(B, C, Nc, 1), J_own.transpose(-1, -2)
        cross = mm(J.reshape(B, C, Nc, Ds).transpose(-1, -2), J_own)  # [B, C, Ds, Do]
        own = torch.zeros(B, C, Do, C, Do, dtype=r.dtype, device=r.device)
        diag = torch.arange(C, device=r.device)
        own[:, diag, :, diag, :] = mm(Ot, J_own).transpose(0, 1)
        cross = cross.transpose(1, 2).reshape(B, Ds, C * Do)
        A = torch.cat([torch.cat([A, cross], -1), torch.cat([cross.transpose(1, 2), own.reshape(B, C * Do, C * Do)], -1)], 1)
        g = torch.cat([g, mm(Ot, r_c)[..., 0].reshape(B, C * Do)], -1)
    return A, g, torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


def solve_spd(H: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = H^{-1} b for symmetric positive definite H [A, D, D]; ok [A] is False where that failed."""
    ok = torch.isfinite(H).all(-1).all(-1) & torch.isfinite(b).all(-1)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    H = torch.where(ok[:, None, None], H, eye)
    b = torch.where(ok[:, None], b, torch.zeros_like(b))
    if H.device.type != "cpu":
        L, info = torch.linalg.cholesky_ex(H)
        x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
        return x, ok & (info == 0) & torch.isfinite(x).all(-1)
    Hn, bn = H.numpy(), b.numpy()[..., None]
    try:
        x = np.linalg.solve(Hn, bn)
    except np.linalg.LinAlgError:  # one singular row must not fail the others
        x = np.full_like(bn, np.nan)
        for j in range(len(Hn)):
            try:
                x[j] = np.linalg.solve(Hn[j], bn[j])
            except np.linalg.LinAlgError:
                pass
    x = torch.from_numpy(x[..., 0])
    return x, ok & torch.isfinite(x).all(-1)


@dataclass
class Stacked:
    """Several problems' residual functions as one: the first sizes[0] rows are fns[0]'s rows 0, 1, ...,
    the next sizes[1] are fns[1]'s, and so on. Their residuals may differ in length (another shots
    grid); only the parameter count must agree, as the normal equations are what the loop sees."""

    fns: list[ResidualFn]
    sizes: list[int]


def _evaluate(residual_fn: ResidualFn | Stacked, theta: torch.Tensor, rows: torch.Tensor):
    if isinstance(residual_fn, Stacked):
        D, B = theta.shape[1], len(rows)
        A = torch.empty(B, D, D, dtype=theta.dtype, device=theta.device)
        g, cost = torch.empty(B, D, dtype=theta.dtype, device=theta.device), torch.empty(B, dtype=theta.dtype, device=theta.device)
        start = 0
        for fn, size in zip(residual_fn.fns, residual_fn.sizes):
            mine = ((rows >= start) & (rows < start + size)).nonzero().squeeze(-1)
            if len(mine):
                A[mine], g[mine], cost[mine] = _evaluate(fn, theta[mine], rows[mine] - start)
            start += size
        return A, g, cost
    return _evaluate_rows(residual_fn, theta, rows)


def _evaluate_rows(residual_fn: ResidualFn, theta: torch.Tensor, rows: torch.Tensor):
    """Normal equations of `rows` at theta, in chunks of rows so the Jacobian never gets huge (the
    first chunk's Jacobian tells how many rows fit in CHUNK_ELEMENTS)."""
    first = min(len(rows), 64)
    r, *J = residual_fn(theta[:first], rows[:first])
    parts = [normal_equations(r, *J)]
    step = max(1, CHUNK_ELEMENTS // max(sum(j[0].numel() for j in J), 1))
    parts += [normal_equations(*residual_fn(theta[i:i + step], rows[i:i + step])) for i in range(first, len(rows), step)]
    return tuple(torch.cat(p) for p in zip(*parts))


def levenberg_marquardt(
    residual_fn: ResidualFn | Stacked,
    theta0: torch.Tensor,
    max_iter: int = 300,
    ridge: torch.Tensor | float = 0.0,
    patience: int = 20,
    progress: Callable[[int, int], None] | None = None,
    starts_of: torch.Tensor | None = None,
    prune_ratio: float = 1.05,
    gain_tol: float = 0.0,
) -> LMResult:
    """Minimise 0.5 |r_b(theta_b)|^2 + 0.5 ridge_b |theta_b|^2 for every row b.

    Each iteration takes a damped step and also computes the undamped (Gauss-Newton) step from the
    same point; a row stops, converged, once that step is below XTOL * (1 + max |theta|) in every
    parameter or the gain it predicts is below FTOL of the objective: the row then sits at a
    stationary point, up to directions that only the weak prior determines. A row also stops, not
    converged, after `patience` rejected steps in a row, or at max_iter. A step is accepted when it
    lowers the objective, or when the model predicts a gain below the objective's rounding (ROUNDING
    relative) and it does not raise the objective beyond that: the last steps to a tight optimum are
    decided by the gradient, which stays accurate after cost differences drown in rounding.

    starts_of [B] names the problem each row is a start of: every other iteration, a start whose
    objective is above (prune_ratio + 2 / iteration) x the best start of its problem is dropped (left
    unconverged). The margin is wide while starts still descend and narrows as they settle.

    gain_tol (objective units) also counts a row as converged once its Gauss-Newton step would gain
    less than that: for fits whose objective is chi-square / 2, the optimum is then within about
    sqrt(2 gain_tol) standard errors, which is precise enough where only a spread is wanted."""
    theta = theta0.clone()
    B, D = theta.shape
    dev = theta.device
    ridge = torch.as_tensor(ridge, dtype=theta.dtype, device=dev).expand(B).clone()
    eye = torch.eye(D, dtype=theta.dtype, device=dev)
    A, g, cost = _evaluate(residual_fn, theta, torch.arange(B, device=dev))
    objective = lambda c, t, w: c + 0.5 * w * (t * t).sum(-1)  # noqa: E731
    obj = objective(cost, theta, ridge)
    lam = torch.full((B,), 1e-3, dtype=theta.dtype, device=dev)
    nu = torch.full((B,), 2.0, dtype=theta.dtype, device=dev)
    stall = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    pruned = torch.zeros(B, dtype=torch.bool, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    it = 0
    for it in range(1, max_iter + 1):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        w, th = ridge[idx], theta[idx]
        H = A[idx] + w[:, None, None] * eye
        grad = g[idx] + w[:, None] * th
        damped = H + torch.diag_embed(lam[idx, None] * H.diagonal(dim1=-2, dim2=-1))
        steps, ok = solve_spd(torch.cat([damped, H]), -torch.cat([grad, grad]))
        n = len(idx)
        delta, ok, gn_step, gn_ok = steps[:n], ok[:n], steps[n:], ok[n:]
        gn_gain = -0.5 * (grad * gn_step).sum(-1)
        at_optimum = gn_ok & ((gn_step.abs().amax(-1) <= XTOL * (1.0 + th.abs().amax(-1)))
                              | (gn_gain <= torch.clamp(FTOL * obj[idx].abs(), min=gain_tol)))
        converged[idx] = at_optimum & torch.isfinite(obj[idx])
        trial = th + torch.where(ok[:, None], delta, torch.zeros_like(delta))
        A_new, g_new, cost_new = _evaluate(residual_fn, trial, idx)
        obj_new = objective(cost_new, trial, w)
        # gain the quadratic model predicts; elementwise, as batched matmuls on the CPU depend on the batch
        predicted = -(grad * delta).sum(-1) - 0.5 * (delta * (H * delta[:, None, :]).sum(-1)).sum(-1)
        rho = (obj[idx] - obj_new) / predicted.clamp_min(1e-300)
        band = ROUNDING * obj[idx].abs()
        accept = ok & ~at_optimum & ((obj_new < obj[idx]) | ((predicted <= band) & (obj_new <= obj[idx] + band)))
        moved = idx[accept]
        theta[moved], A[moved], g[moved] = trial[accept], A_new[accept], g_new[accept]
        cost[moved], obj[moved] = cost_new[accept], obj_new[accept]
        # Nielsen's rule: shrink the damping by how well the model predicted the gain, grow it
        # geometrically faster on each rejection in a row
        shrink = torch.clamp(1 - (2 * rho.clamp(max=1.0) - 1) ** 3, min=1 / 3)
        lam[idx] = torch.where(accept, lam[idx] * shrink, lam[idx] * nu[idx]).clamp(1e-12, 1e12)
        nu[idx] = torch.where(accept, torch.full_like(nu[idx], 2.0), nu[idx] * 2)
        stall[idx] = torch.where(accept, torch.zeros_like(stall[idx]), stall[idx] + 1)
        active[idx] = ~at_optimum & (stall[idx] < patience)
        if starts_of is not None and it % 2 == 0:
            best = torch.full((int(starts_of.max()) + 1,), float("inf"), dtype=obj.dtype, device=dev)
            best = best.scatter_reduce(0, starts_of, obj, reduce="amin")
            dominated = active & (obj > (prune_ratio + 2.0 / it) * best[starts_of])
            active &= ~dominated
            pruned |= dominated
        if progress is not None:
            progress(it, int(active.sum()))
    return LMResult(theta=theta, cost=cost, objective=obj, converged=converged & ~pruned, iterations=it)
