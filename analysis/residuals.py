"""A batch of fits of one law as a least-squares problem: its tensors (`Batch`), their weighted residuals
and Jacobians for analysis.lm, the weak prior that makes each optimum unique, each fit's best start in
canonical order (`BatchFit`), and the covariance of the fitted parameters at the optimum."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from analysis.laws import BayesianLaw, get_law
from analysis.lm import LMResult, normal_equations

# Weak Gaussian prior on the unconstrained parameters, in units of the mean squared point weight: as
# informative as a millionth of one measured point, so it decides only what the data leave open.
RIDGE = 1e-6


@dataclass
class Batch:
    """Fits of one law on padded tensors: shots [G, S]; prob, nll, weight [G, C, M, S] (weight 0 = not
    fitted); count [G, C, M, S], the prompts behind each point, or None where the weights already put the
    residuals in units of their noise (weight = 1 / sampling error, as the shift's fits do)."""

    shots: torch.Tensor
    prob: torch.Tensor
    nll: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor | None = None

    @property
    def dims(self) -> tuple[int, int, int]:
        G, C, M, _ = self.prob.shape
        return G, C, M

    def to(self, device: str | torch.device) -> Batch:
        return Batch(self.shots.to(device), self.prob.to(device), self.nll.to(device), self.weight.to(device),
                     None if self.count is None else self.count.to(device))

    def noise(self, space: str) -> torch.Tensor:
        """Sampling variance of each weighted residual [G, C, M, S]: w^2 p(1 - p) / count for a mean
        probability, w^2 (1 - p) / (p count) for its -log (the delta method); 0 where not fitted."""
        p, n = self.prob.clamp(1e-12, 1.0), self.count.clamp_min(1.0)
        var = p * (1 - p) / n if space == "prob" else (1 - p) / (p * n)
        return self.weight.square() * var


@dataclass
class BatchFit:
    theta: torch.Tensor  # [G, D] best start, hypotheses in canonical order
    loss: torch.Tensor  # [G] half sum of squared weighted residuals (inf if no start was finite)
    converged: torch.Tensor  # [G] bool


def _residual_fn(law, batch: Batch, space: str, owner: Callable[[torch.Tensor], torch.Tensor]):
    """Residuals/Jacobian of batch rows; owner maps rows to (group, curve) indices."""
    G, C, M = batch.dims
    if isinstance(law, BayesianLaw):
        # the original law: task i's curves move only with row i of P. An ordinary fit has those rows as
        # blocks and the priors and K shared (theta is [P, priors and K], the normal equations [shared,
        # blocks]); a joint fit has both the rows and the conditions as blocks (analysis.lm.ResidualFn)
        rows_of_P = law.tying == "none"
        columns = torch.cat([torch.arange(M, M + M * M), torch.arange(M)]).to(batch.prob.device)

        def fn(theta, rows, jacobian=True):
            g = owner(rows)
            w, y = batch.weight[g], (batch.prob[g] if space == "prob" else batch.nll[g])
            A = len(rows)
            if not jacobian:
                log_p = law.fit_log_prob(theta, batch.shots[g], M, C)
                return ((w * (log_p.exp() - y) if space == "prob" else w * (-log_p - y)).reshape(A, -1),)
            log_p, jac_P, jac_own = law.log_prob_and_jacobian_blocks(theta, batch.shots[g], M, C, p_rows=rows_of_P)
            if space == "prob":
                p = log_p.exp()
                r, scale = w * (p - y), (w * p)[..., None]
            else:
                r, scale = w * (-log_p - y), -w[..., None]
            S = jac_P.shape[3]
            if rows_of_P and C == 1:
                return (r.reshape(A, -1), (scale * jac_own).reshape(A, M * S, M),
                        (scale * jac_P).reshape(A, M, S, M), columns)
            if rows_of_P:
                return r.reshape(A, -1), scale * jac_P, (scale * jac_own).reshape(A, C, -1, M)
            if C == 1:  # a tied law: one dense Jacobian
                return r.reshape(A, -1), (scale * torch.cat([jac_P, jac_own], -1)).reshape(A, M * S, -1)
            return r.reshape(A, -1), (scale * jac_P).reshape(A, C * M * S, -1), (scale * jac_own).reshape(A, C, -1, M)

        return fn

    flat = lambda t: t.reshape(G * C * M, -1)  # noqa: E731 - curves as rows

    def curve_fn(theta, rows, jacobian=True):
        c = owner(rows)
        w, y = flat(batch.weight)[c], flat(batch.prob if space == "prob" else batch.nll)[c]
        if not jacobian:
            log_p = -law.nll(theta, batch.shots[c // (C * M)])
            return (w * (log_p.exp() - y) if space == "prob" else w * (-log_p - y)),
        log_p, jac = law.curve_log_prob_and_jacobian(theta, batch.shots[c // (C * M)])
        if space == "prob":
            p = log_p.exp()
            return w * (p - y), (w * p)[..., None] * jac
        return w * (-log_p - y), -w[..., None] * jac

    return curve_fn


def canonical_order(law: BayesianLaw, theta: torch.Tensor, M: int, C: int) -> torch.Tensor:
    """Relabel the hypotheses of the original law so that hypothesis i is the one matched to task i.

    The law is invariant under permuting P's columns together with the priors, so a fit may land on a
    relabelled copy; reporting the assignment that maximises sum_i log P[i, pi(i)] makes P's diagonal
    the task's own hypothesis and the priors comparable across fits. Tied laws fix the labels already.
    """
    if law.tying != "none":
        return theta
    log_P = law.log_P(theta[: M * M], M)
    _, perm = linear_sum_assignment(-log_P.detach().cpu().numpy())
    perm_t = torch.as_tensor(perm, device=theta.device)
    p_raw = theta[: M * M].reshape(M, M)[:, perm_t].flatten()
    per_cond = theta[M * M :].reshape(C, M)
    logits = torch.cat([per_cond[:, : M - 1], torch.zeros_like(per_cond[:, :1])], 1)[:, perm_t]
    per_cond = torch.cat([logits[:, : M - 1] - logits[:, M - 1 :], per_cond[:, M - 1 :]], dim=1)
    return torch.cat([p_raw, per_cond.flatten()])


def ridge_of(batch: Batch) -> torch.Tensor:
    """Per-group prior strength [G]: RIDGE x the mean squared weight of the group's fitted points."""
    w2 = batch.weight.square()
    return RIDGE * w2.sum((1, 2, 3)) / (batch.weight > 0).sum((1, 2, 3)).clamp_min(1)


def _best_starts(law, batch: Batch, result: LMResult, R: int) -> BatchFit:
    """Each group's best start (each curve's, for the baselines), hypotheses in canonical order."""
    G, C, M = batch.dims
    dev = result.theta.device
    if isinstance(law, BayesianLaw):
        objective, cost = result.objective.reshape(G, R), result.cost.reshape(G, R)
        conv = result.converged.reshape(G, R)
        theta = result.theta.reshape(G, R, -1)
    else:
        P = law.per_curve
        # starts are independent per curve, so the best start is chosen per curve
        obj_c = result.objective.reshape(G * C * M, R)
        best = obj_c.argmin(1)
        pick = torch.arange(G * C * M, device=dev)
        theta_c = result.theta.reshape(G * C * M, R, P)[pick, best]
        conv_c = result.converged.reshape(G * C * M, R)[pick, best]
        objective = obj_c[pick, best].reshape(G, C * M).sum(1, keepdim=True)
        cost = result.cost.reshape(G * C * M, R)[pick, best].reshape(G, C * M).sum(1, keepdim=True)
        conv = conv_c.reshape(G, C * M).all(1, keepdim=True)
        theta = theta_c.reshape(G, 1, C * M * P)
    best = objective.argmin(1)
    pick = torch.arange(G, device=dev)
    theta_best = theta[pick, best]
    if isinstance(law, BayesianLaw):
        theta_best = torch.stack([canonical_order(law, t, M, C) for t in theta_best])
    return BatchFit(theta_best, cost[pick, best], conv[pick, best] & torch.isfinite(cost[pick, best]))


def theta_covariance(law_name: str, batch: Batch, theta: torch.Tensor, space: str = "prob",
                     noise_known: bool = False) -> torch.Tensor:
    """Covariance [G, D] of fitted thetas [G, D]: s^2 (J^T J + ridge)^-1 at the optimum, with s^2 the
    residual variance (or 1 where the weights are the points' known sampling errors)."""
    law = get_law(law_name)
    G, C, M = batch.dims
    D = theta.shape[1]
    ridge = ridge_of(batch)
    if isinstance(law, BayesianLaw):
        A, _, cost = normal_equations(*_residual_fn(law, batch, space, lambda rows: rows)(theta, torch.arange(G)))
    else:  # curves are independent: J^T J is block diagonal, one block per curve
        P, curves = law.per_curve, G * C * M
        A_c, _, cost_c = normal_equations(*_residual_fn(law, batch, space, lambda rows: rows)(
            theta.reshape(curves, P), torch.arange(curves)))
        A = torch.zeros(G, C * M, P, C * M, P, dtype=theta.dtype)
        own = torch.arange(C * M)
        A[:, own, :, own, :] = A_c.reshape(G, C * M, P, P).transpose(0, 1)
        A, cost = A.reshape(G, D, D), cost_c.reshape(G, C * M).sum(1)
    H = A + ridge[:, None, None] * torch.eye(D, dtype=theta.dtype)
    n_fit = (batch.weight > 0).sum((1, 2, 3))
    s2 = torch.ones(G, dtype=theta.dtype) if noise_known else 2 * cost / (n_fit - law.n_params(M, C)).clamp_min(1)
    cov = torch.from_numpy(np.linalg.pinv(H.numpy(), hermitian=True))
    return s2[:, None, None] * cov
