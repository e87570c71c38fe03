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
# dense [A, N, D], or as (shared [A, N, Ds], own [A, C, N / C, Do]) where C * Do parameters come in C
# blocks and block c moves only residuals c * N / C to (c + 1) * N / C (a joint fit's per-condition
# parameters, the original law's rows of P). The own blocks are theta's last C * Do columns, unless a
# fourth element, columns [D], says where each of theta's columns sits in the order [shared, own].
# A joint fit of the original law has both kinds of blocks: (rows [A, C, M, S, M], own [A, C, M * S, Do])
# with residuals laid out [C, M(i), S], where rows[:, c, i, :, m] moves residuals (c, i, .) with the
# logit of P[i, m] (theta's first M * M columns) and own block c the rest, condition by condition.
# residual_fn(theta, rows, jacobian=False) -> (residuals,): the same residuals, bitwise, without the
# Jacobian (for the cost of a trial point).
ResidualFn = Callable[..., tuple[torch.Tensor, ...]]

# converged: the Gauss-Newton step from the point is below XTOL * (1 + max |theta|) in every parameter,
# or the gain it predicts is below FTOL of the objective (as MINPACK's tests on step and predicted gain):
# the point is stationary to rounding. `tol` (see levenberg_marquardt) states the precision asked of a fit.
XTOL = 1e-9
FTOL = 1e-10
# accepted steps per window over which a fit's rate of gain is measured (see levenberg_marquardt)
WINDOW = 8
ROUNDING = 1e-12  # relative error of an objective summed over up to ~10^4 points, with margin
CHUNK_ELEMENTS = 1 << 24  # rows per residual_fn call are capped so a Jacobian chunk stays near 128 MB


@dataclass
class LMResult:
    theta: torch.Tensor  # [B, D]
    cost: torch.Tensor  # [B], 0.5 |r|^2 of the data; inf where never finite
    objective: torch.Tensor  # [B], cost + 0.5 ridge |theta|^2, what was minimised
    converged: torch.Tensor  # [B] bool: at a stationary point by the XTOL/FTOL tests
    iterations: int


def _cost(r: torch.Tensor) -> torch.Tensor:
    """0.5 |r|^2 [A], inf where not finite; through numpy on the CPU, row by row."""
    cost = torch.from_numpy(0.5 * np.square(r.numpy()).sum(-1)) if r.device.type == "cpu" else 0.5 * (r * r).sum(-1)
    return torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy, one BLAS call per matrix whatever the batch (see the module doc)."""
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy())) if a.device.type == "cpu" else a @ b


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """[B, C, d, d] -> [B, C * d, C * d] with the C blocks on the diagonal."""
    B, C, d, _ = blocks.shape
    out = torch.zeros(B, C, d, C, d, dtype=blocks.dtype, device=blocks.device)
    diag = torch.arange(C, device=blocks.device)
    out[:, diag, :, diag, :] = blocks.transpose(0, 1)
    return out.reshape(B, C * d, C * d)


def _rows_of_P_equations(r: torch.Tensor, rows: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """J^T J and J^T r of the original law's joint fit (see ResidualFn): P's rows form a block diagonal
    over tasks, the conditions' parameters one over conditions, and they meet in C x M small blocks."""
    B, C, M, S, _ = rows.shape
    Do = own.shape[-1]
    by_task = rows.transpose(1, 2).reshape(B, M, C * S, M)
    r_task = r.reshape(B, C, M, S).transpose(1, 2).reshape(B, M, C * S, 1)
    by_task_t = by_task.transpose(-1, -2)
    P_P, g_P = _block_diagonal(_matmul(by_task_t, by_task)), _matmul(by_task_t, r_task)[..., 0].reshape(B, M * M)
    own_t = own.transpose(-1, -2)
    own_own, g_own = (_block_diagonal(_matmul(own_t, own)),
                      _matmul(own_t, r.reshape(B, C, M * S, 1))[..., 0].reshape(B, C * Do))
    # P[i, m] against condition c's parameters: residuals (c, i, .) only
    cross = _matmul(rows.transpose(-1, -2), own.reshape(B, C, M, S, Do))  # [B, C, M(i), M(m), Do]
    cross = cross.permute(0, 2, 3, 1, 4).reshape(B, M * M, C * Do)
    A = torch.cat([torch.cat([P_P, cross], -1), torch.cat([cross.transpose(1, 2), own_own], -1)], 1)
    return A, torch.cat([g_P, g_own], -1)


def normal_equations(r: torch.Tensor, J: torch.Tensor, J_own: torch.Tensor | None = None,
                     columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """J^T J [A, D, D], J^T r [A, D] and the cost 0.5 |r|^2 [A] (inf where not finite), row by row;
    with J_own, J is the shared columns (or, 5-dimensional, the rows of P) and J_own the blocks, and
    columns (if given) puts theta's columns back in their order (see ResidualFn)."""
    if J.dim() == 5:
        return (*_rows_of_P_equations(r, J, J_own), _cost(r))
    Jt = J.transpose(-1, -2)
    A, g = _matmul(Jt, J), _matmul(Jt, r[..., None])[..., 0]
    if J_own is not None:
        B, C, Nc, Do = J_own.shape
        Ds = J.shape[-1]
        r_c, Ot = r.reshape(B, C, Nc, 1), J_own.transpose(-1, -2)
        cross = _matmul(J.reshape(B, C, Nc, Ds).transpose(-1, -2), J_own)  # [B, C, Ds, Do]
        cross = cross.transpose(1, 2).reshape(B, Ds, C * Do)
        A = torch.cat([torch.cat([A, cross], -1),
                       torch.cat([cross.transpose(1, 2), _block_diagonal(_matmul(Ot, J_own))], -1)], 1)
        g = torch.cat([g, _matmul(Ot, r_c)[..., 0].reshape(B, C * Do)], -1)
        if columns is not None:
            A, g = A[:, columns][:, :, columns], g[:, columns]
    return A, g, _cost(r)


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


def _by_problem(residual_fn: ResidualFn | Stacked, theta: torch.Tensor, rows: torch.Tensor, single: Callable):
    """single(fn, theta, rows) -> tuple of [A, ...] tensors, of each stacked problem's own rows,
    gathered back in the order of `rows`."""
    if not isinstance(residual_fn, Stacked):
        return single(residual_fn, theta, rows)
    out, start = None, 0
    for fn, size in zip(residual_fn.fns, residual_fn.sizes):
        mine = ((rows >= start) & (rows < start + size)).nonzero().squeeze(-1)
        if len(mine):
            part = single(fn, theta[mine], rows[mine] - start)
            out = out or tuple(torch.empty(len(rows), *t.shape[1:], dtype=t.dtype, device=t.device) for t in part)
            for o, t in zip(out, part):
                o[mine] = t
        start += size
    return out


def _costs(residual_fn: ResidualFn | Stacked, theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The cost 0.5 |r|^2 [A] of `rows` at theta, without the Jacobian."""
    return _by_problem(residual_fn, theta, rows, lambda fn, t, r: (_cost(fn(t, r, jacobian=False)[0]),))[0]


def _evaluate(residual_fn: ResidualFn | Stacked, theta: torch.Tensor, rows: torch.Tensor):
    """Normal equations and cost of `rows` at theta."""
    return _by_problem(residual_fn, theta, rows, _evaluate_rows)


def _evaluate_rows(residual_fn: ResidualFn, theta: torch.Tensor, rows: torch.Tensor):
    """Normal equations of `rows` at theta, in chunks of rows so the Jacobian never gets huge (the
    first chunk's Jacobian tells how many rows fit in CHUNK_ELEMENTS)."""
    first = min(len(rows), 64)
    r, *J = residual_fn(theta[:first], rows[:first])
    parts = [normal_equations(r, *J)]
    step = max(1, CHUNK_ELEMENTS // max(sum(j[0].numel() for j in J if j.dim() > 1), 1))
    parts += [normal_equations(*residual_fn(theta[i:i + step], rows[i:i + step]))
              for i in range(first, len(rows), step)]
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
    tol: float = 0.0,
    noise: torch.Tensor | None = None,
    dof: torch.Tensor | None = None,
) -> LMResult:
    """Minimise 0.5 |r_b(theta_b)|^2 + 0.5 ridge_b |theta_b|^2 for every row b, to the precision `tol`.

    **Precision.** tol is in units of chi-square: 2 x the objective where the residuals are in units of
    their noise (noise and dof None). Otherwise chi-square is |r|^2 over a residual's variance, taken
    as the smaller of noise [B] (the mean sampling variance of a row's residuals, known from the data)
    and s^2 = 2 cost / dof (dof [B]: the row's fitted points minus its parameters; the variance its
    residuals show at the point): the smaller variance asks the finer precision, and the noise keeps a
    start stuck far from the optimum, whose residuals are large, from counting them as noise. A row
    stops, converged, once the Gauss-Newton step from its point would lower chi-square by less than
    tol: the quadratic model of the objective then puts the optimum within sqrt(tol) standard errors of
    the point in every direction (chi-square rises by d^2 a distance of d standard errors away). Also
    converged: a point stationary to rounding (the XTOL / FTOL tests); tol = 0 asks for that alone.

    A row stops, not converged, after `patience` rejected steps in a row, at max_iter, or once it
    creeps: each of its last two windows of WINDOW accepted steps gained less than tol in all. Such a
    row moves along a curved valley or toward the edge of the parameter space (a prior or an entry of
    P going to 0, K to infinity), where the Gauss-Newton step keeps predicting gains that the damped
    steps deliver a few thousandths of a unit at a time; at that pace, what is left would take it
    hundreds of iterations to gain, and it moves the fitted curves by less than the precision per
    window. (Measured on the fit benchmark: stopping there changes the mean NRMSE by under 1%.)

    Each iteration takes a damped step; the cost at the trial point is computed without the Jacobian,
    which is formed only where the step is accepted. A step is accepted when it lowers the objective,
    or when the model predicts a gain below the objective's rounding (ROUNDING relative) and it does
    not raise the objective beyond that: the last steps to a tight optimum are decided by the gradient.

    starts_of [B] names the problem each row is a start of: every other iteration, a start whose
    objective is above (prune_ratio + 2 / iteration) x the best start of its problem is dropped (left
    unconverged). The margin is wide while starts still descend and narrows as they settle. (Dropping a
    problem's other starts once one has converged was tried: a start still descending above a converged
    one often ends lower, off a plateau that the converged one sits on. So was dropping starts far above
    their problem's best before their first step: a start's first objective says little about where it
    ends, and a shift's joint fit ended 19 chi-square worse.)"""
    theta = theta0.clone()
    B, D = theta.shape
    dev, dt = theta.device, theta.dtype
    ridge = torch.as_tensor(ridge, dtype=dt, device=dev).expand(B).clone()
    dof = None if dof is None else torch.as_tensor(dof, dtype=dt, device=dev).expand(B).clamp_min(1.0)
    noise = None if noise is None else torch.as_tensor(noise, dtype=dt, device=dev).expand(B)
    eye = torch.eye(D, dtype=dt, device=dev)
    objective = lambda c, t, w: c + 0.5 * w * (t * t).sum(-1)  # noqa: E731
    A, g, cost = _evaluate(residual_fn, theta, torch.arange(B, device=dev))
    obj = objective(cost, theta, ridge)
    lam = torch.full((B,), 1e-3, dtype=dt, device=dev)
    nu = torch.full((B,), 2.0, dtype=dt, device=dev)
    stall = torch.zeros(B, dtype=torch.long, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    pruned = torch.zeros(B, dtype=torch.bool, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    # chi-square gained in the current window of accepted steps, in the window before it, steps in it
    window = torch.zeros(B, dtype=dt, device=dev)
    before = torch.full((B,), float("inf"), dtype=dt, device=dev)
    in_window = torch.zeros(B, dtype=torch.long, device=dev)
    problems = None if starts_of is None else int(starts_of.max()) + 1
    it = 0
    for it in range(1, max_iter + 1):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        w, th = ridge[idx], theta[idx]
        # objective units per unit of chi-square: 1/2 for whitened residuals, else half a residual's variance
        variance = torch.ones_like(w)
        if noise is not None or dof is not None:
            variance = torch.full_like(w, float("inf"))
            if noise is not None:
                variance = torch.minimum(variance, noise[idx])
            if dof is not None:
                variance = torch.minimum(variance, 2.0 * cost[idx] / dof[idx])
        unit = (0.5 * variance).clamp_min(1e-300)
        H = A[idx] + w[:, None, None] * eye
        grad = g[idx] + w[:, None] * th
        damped = H + torch.diag_embed(lam[idx, None] * H.diagonal(dim1=-2, dim2=-1))
        steps, ok = solve_spd(torch.cat([damped, H]), -torch.cat([grad, grad]))
        n = len(idx)
        delta, ok, gn_step, gn_ok = steps[:n], ok[:n], steps[n:], ok[n:]
        gn_gain = -0.5 * (grad * gn_step).sum(-1)
        finite = torch.isfinite(obj[idx])
        at_optimum = gn_ok & finite & ((gn_step.abs().amax(-1) <= XTOL * (1.0 + th.abs().amax(-1)))
                                       | (gn_gain <= FTOL * obj[idx].abs()) | (gn_gain <= tol * unit))
        trial = th + torch.where(ok[:, None], delta, torch.zeros_like(delta))
        cost_new = _costs(residual_fn, trial, idx)
        obj_new = objective(cost_new, trial, w)
        # gain the quadratic model predicts; elementwise, as batched matmuls on the CPU depend on the batch
        predicted = -(grad * delta).sum(-1) - 0.5 * (delta * (H * delta[:, None, :]).sum(-1)).sum(-1)
        rho = (obj[idx] - obj_new) / predicted.clamp_min(1e-300)
        band = ROUNDING * obj[idx].abs()
        accept = ok & ~at_optimum & ((obj_new < obj[idx]) | ((predicted <= band) & (obj_new <= obj[idx] + band)))
        moved = idx[accept]
        gained = ((obj[idx] - obj_new) / unit).clamp_min(0.0)[accept]  # chi-square
        if len(moved):
            A[moved], g[moved], cost[moved] = _evaluate(residual_fn, trial[accept], moved)
            theta[moved], obj[moved] = trial[accept], objective(cost[moved], trial[accept], w[accept])
        # chi-square gained per window of accepted steps: creeping once two windows in a row gain < tol
        window[moved] += gained
        in_window[moved] += 1
        full = moved[in_window[moved] >= WINDOW]
        slow = torch.zeros(B, dtype=torch.bool, device=dev)
        if len(full):
            slow[full] = torch.maximum(window[full], before[full]) < tol
            before[full], window[full], in_window[full] = window[full], 0.0, 0
        converged[idx] = at_optimum
        # Nielsen's rule: shrink the damping by how well the model predicted the gain, grow it
        # geometrically faster on each rejection in a row
        shrink = torch.clamp(1 - (2 * rho.clamp(max=1.0) - 1) ** 3, min=1 / 3)
        lam[idx] = torch.where(accept, lam[idx] * shrink, lam[idx] * nu[idx]).clamp(1e-12, 1e12)
        nu[idx] = torch.where(accept, torch.full_like(nu[idx], 2.0), nu[idx] * 2)
        stall[idx] = torch.where(accept, torch.zeros_like(stall[idx]), stall[idx] + 1)
        active[idx] = ~at_optimum & (stall[idx] < patience)
        active &= ~slow
        if starts_of is not None and it % 2 == 0:
            best = torch.full((problems,), float("inf"), dtype=dt, device=dev)
            best = best.scatter_reduce(0, starts_of, obj, reduce="amin")
            dominated = active & (obj > (prune_ratio + 2.0 / it) * best[starts_of])
            active &= ~dominated
            pruned |= dominated
        if progress is not None:
            progress(it, int(active.sum()))
    return LMResult(theta=theta, cost=cost, objective=obj, converged=converged & ~pruned, iterations=it)
