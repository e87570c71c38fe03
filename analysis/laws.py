"""The six ICL laws of docs/design.md, evaluated in log space, with analytic Jacobians for fitting.

Every law maps an unconstrained parameter vector theta (one per fitted group) to log p, the log
expected probability of the next label, for a group's curves laid out as [conditions C, tasks M,
shots S]. An ordinary fit has C = 1; a joint fit across post-training conditions shares P (or
gamma, beta) between the C conditions and gives each condition its own priors and K.

Bayesian laws: log p_i(n) = LSE_m(log rho_m + (Kn+1) log P_im) - LSE_m(log rho_m + Kn log P_im), so
thousands of shots and P near 0 never overflow. Baselines are laws of the NLL per curve; their
parameters are per (condition, task) curve and enter through exp, so (n+1) > 0 keeps shots = 0 finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from user_errors import UserError

LAW_NAMES = ("bayesian", "bayesian_sampling", "bayesian_scoring", "power", "bounded_power", "logistic")
BAYESIAN_NAMES = LAW_NAMES[:3]


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-x). torch.sigmoid rounds a tensor's vectorised body and its scalar tail differently,
    which would make a row's value depend on where the batch puts it; exp does not."""
    return 1.0 / (1.0 + torch.exp(-x))


def _softmax(e: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, the same arithmetic wherever a row sits in the batch."""
    ex = torch.exp(e - e.amax(-1, keepdim=True))
    return ex / ex.sum(-1, keepdim=True)


@dataclass(frozen=True)
class BayesianLaw:
    """Original (tying='none'), sampling-wise or scoring-wise tied Bayesian law.

    theta = [P part, then per condition: M - 1 prior logits, log K]. The last task's logit is fixed at 0,
    so no direction of theta leaves the law unchanged. P part: M*M logits of P (original) or M logits of
    gamma and M logits of beta/gamma (tied: beta_j = gamma_j * sigmoid(.) keeps beta <= gamma).
    """

    name: str
    tying: str

    def p_size(self, M: int) -> int:
        return M * M if self.tying == "none" else 2 * M

    def n_params(self, M: int, C: int = 1) -> int:
        return self.p_size(M) + C * M

    def log_P(self, p_raw: torch.Tensor, M: int) -> torch.Tensor:
        """[..., p_size] -> log P [..., M, M]."""
        if self.tying == "none":
            return F.logsigmoid(p_raw.reshape(*p_raw.shape[:-1], M, M))
        log_gamma = F.logsigmoid(p_raw[..., :M])
        log_beta = log_gamma + F.logsigmoid(p_raw[..., M:])
        # sampling-wise: row i, column m != i is beta_m; scoring-wise: it is beta_i.
        off = log_beta.unsqueeze(-2) if self.tying == "sampling" else log_beta.unsqueeze(-1)
        off = off.expand(*log_beta.shape[:-1], M, M)
        eye = torch.eye(M, dtype=torch.bool, device=p_raw.device)
        return torch.where(eye, torch.diag_embed(log_gamma), off)

    def structure(self, theta: torch.Tensor, M: int, C: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta [..., D] -> log rho [..., C, M], log P [..., M, M] (shared by the C conditions), log K [..., C]."""
        n_p = self.p_size(M)
        per_cond = theta[..., n_p:].reshape(*theta.shape[:-1], C, M)
        logits = torch.cat([per_cond[..., : M - 1], torch.zeros_like(per_cond[..., :1])], -1)
        return torch.log_softmax(logits, dim=-1), self.log_P(theta[..., :n_p], M), per_cond[..., M - 1]

    def log_prob(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int) -> torch.Tensor:
        """theta [B, D], shots [B, S] -> log p [B, C, M, S]."""
        return self._evaluate(theta, shots, M, C, jacobian=False)[0]

    def log_prob_and_jacobian(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int):
        """log p [B, C, M, S] and d log p / d theta [B, C, M, S, D], dense."""
        log_p, jac_P, jac_own = self.log_prob_and_jacobian_blocks(theta, shots, M, C)
        # each condition's priors and K only move that condition's points
        own = (jac_own[:, :, :, :, None, :]
               * torch.eye(C, dtype=theta.dtype, device=theta.device)[:, None, None, :, None])
        return log_p, torch.cat([jac_P, own.flatten(-2)], -1)

    def log_prob_and_jacobian_blocks(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int,
                                     p_rows: bool = False):
        """log p [B, C, M, S] and the Jacobian's nonzero blocks: d log p / d (P part) [B, C, M, S, p_size]
        and d log p / d (own condition's M - 1 prior logits, log K) [B, C, M, S, M]. A joint fit's
        Jacobian is zero between a condition's points and another condition's parameters; keeping
        only these blocks makes its normal equations C times cheaper to form. With p_rows (the original
        law), the P part is given as d log p_i / d (logit P[i, m]) [B, C, M(i), S, M(m)] alone: task i's
        curve depends only on row i of P, which makes an ordinary fit's normal equations M times cheaper."""
        return self._evaluate(theta, shots, M, C, jacobian=True, p_rows=p_rows)

    def fit_log_prob(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int) -> torch.Tensor:
        """log p [B, C, M, S], bitwise as log_prob_and_jacobian_blocks gives it, without the Jacobian."""
        return self._evaluate(theta, shots, M, C, jacobian=False, exact=True)[0]

    def _evaluate(self, theta, shots, M, C, jacobian, p_rows=False, exact=False):
        log_rho, log_P, log_K = self.structure(theta, M, C)
        K = log_K.exp()[:, :, None, None, None]  # [B, C, 1, 1, 1]
        n = shots[:, None, None, :, None]  # [B, 1, 1, S, 1]
        lp = log_P[:, None, :, None, :]  # [B, 1, M(i), 1, M(m)]
        e0 = log_rho[:, :, None, None, :] + K * n * lp
        if not (jacobian or exact):
            return (torch.logsumexp(e0 + lp, -1) - torch.logsumexp(e0, -1),)
        # the fit's path: p_i(n) = sum_m w0_m P_im with w0 the posterior after n shots, one exp for both
        w0 = _softmax(e0)
        joint = w0 * lp.exp()
        p = joint.sum(-1)
        if not jacobian:
            return (p.log(),)
        w1 = joint / p[..., None]  # the posterior after n + 1 shots
        d_rho = w1 - w0  # d log p / d log rho_m, and also d / d prior logit_m since sum_m d_rho = 0
        d_K = (K * n * lp * d_rho).sum(-1, keepdim=True)  # d log p / d log K
        d_P = (K * n + 1) * w1 - K * n * w0  # d log p_i / d log P_im, for row i only
        if p_rows and self.tying == "none":  # log P_im = logsigmoid(q_im): derivative 1 - P_im
            jac_P = d_P * _sigmoid(-theta[:, : M * M]).reshape(-1, 1, M, 1, M)
        else:
            jac_P = self._p_jacobian(d_P, theta[:, : self.p_size(M)], M)
        return p.log(), jac_P, torch.cat([d_rho[..., : M - 1], d_K], -1)

    def _p_jacobian(self, d_P: torch.Tensor, p_raw: torch.Tensor, M: int) -> torch.Tensor:
        """Chain d log p_i / d log P_im [B, C, M(i), S, M(m)] to the P part of theta."""
        eye = torch.eye(M, dtype=d_P.dtype, device=d_P.device)
        if self.tying == "none":  # log P_im = logsigmoid(q_im): derivative 1 - P_im, own row only
            scaled = d_P * _sigmoid(-p_raw).reshape(-1, 1, M, 1, M)
            return (scaled[:, :, :, :, None, :] * eye[:, None, :, None]).flatten(-2)
        one_minus_gamma = _sigmoid(-p_raw[:, None, None, None, :M])
        one_minus_ratio = _sigmoid(-p_raw[:, None, None, None, M:])
        off = 1.0 - eye[:, None, :]  # [M(i), 1, M(k)]: k != i
        if self.tying == "sampling":  # P_ik = beta_k for k != i; beta_k = gamma_k sigmoid(b_k)
            return torch.cat([d_P * one_minus_gamma, d_P * off * one_minus_ratio], -1)
        # scoring-wise: every entry of row i is gamma_i or beta_i = gamma_i sigmoid(b_i)
        diag = eye[:, None, :]
        d_gamma = d_P.sum(-1, keepdim=True) * diag * one_minus_gamma
        d_ratio = (d_P * off).sum(-1, keepdim=True) * diag * one_minus_ratio
        return torch.cat([d_gamma, d_ratio], -1)

    def named_tensors(self, theta: torch.Tensor, M: int, C: int = 1) -> dict[str, torch.Tensor]:
        """Interpretable parameters of one theta [D] as tensors (differentiable, for standard errors):
        priors [C, M], K [C], and P [M, M] or gamma, beta [M]."""
        log_rho, log_P, log_K = self.structure(theta[None], M, C)
        out = {"priors": log_rho[0].exp(), "K": log_K[0].exp()}
        if self.tying == "none":
            out["P"] = log_P[0].exp()
        else:
            gamma = torch.sigmoid(theta[:M])
            out["gamma"], out["beta"] = gamma, gamma * torch.sigmoid(theta[M : 2 * M])
        return out

    def named(self, theta: torch.Tensor, M: int, C: int = 1) -> dict:
        """Interpretable parameters as lists: priors, K and P (or gamma, beta); per condition when C > 1."""
        return as_lists(self.named_tensors(theta.double(), M, C), C, ("priors", "K"))

    def theta_from(self, params: dict) -> torch.Tensor:
        """Inverse of `named`: priors [C, M] (or [M]), K [C] (or scalar), and P [M, M] or gamma, beta [M]."""
        priors = torch.as_tensor(params["priors"], dtype=torch.float64)
        priors = priors if priors.dim() == 2 else priors[None]
        M = priors.shape[1]
        log_K = torch.log(torch.as_tensor(params["K"], dtype=torch.float64).reshape(-1, 1))
        if self.tying == "none":
            p_raw = torch.logit(torch.as_tensor(params["P"], dtype=torch.float64)).flatten()
        else:
            gamma = torch.as_tensor(params["gamma"], dtype=torch.float64)
            beta = torch.as_tensor(params["beta"], dtype=torch.float64)
            p_raw = torch.cat([torch.logit(gamma), torch.logit(beta / gamma)])
        logits = priors.log()[:, : M - 1] - priors.log()[:, M - 1 :]
        return torch.cat([p_raw, torch.cat([logits, log_K], dim=1).flatten()])

    def starts(self, R: int, prob: torch.Tensor, weight: torch.Tensor, shots: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """R starting points [G, R, D] for each group's curves prob, weight [G, C, M, S] (weight 0 = not
        fitted), read off its own data only, so a group starts the same in any batch.

        gamma (P's diagonal) starts at each task's late level, since p_i(n) -> P_ii; beta (off the
        diagonal) at the level that uniform priors need to give the first fitted point. The starts
        spread K over K * (last fitted shot) in [0.3, 300] and scatter the rest with growing noise;
        every fourth start has no diagonal preference, so mirrored basins of the original law are
        explored too and the best is kept. Every condition gets the same noise on its priors and K, so
        the starts of a joint fit do not depend on the order of its conditions."""
        G, C, M, S = prob.shape
        fitted = (weight > 0).to(prob.dtype)
        first = fitted * (fitted.cumsum(-1) == 1)
        from_end = fitted.flip(-1).cumsum(-1).flip(-1)
        late = fitted * (from_end <= (fitted.sum(-1, keepdim=True) / 5).clamp_min(2))
        level = lambda m: ((prob * m).sum(-1) / m.sum(-1).clamp_min(1)).where(m.sum(-1) > 0, 0.5)  # noqa: E731
        gamma = level(late).mean(1).clamp(0.05, 0.95)  # [G, M]
        p0 = level(first).mean(1)
        beta = ((p0 - gamma / M) / (1 - 1 / M)).clamp(min=0.05 * gamma, max=0.9 * gamma)
        last = (shots * fitted.amax((1, 2))).amax(-1).clamp_min(1.0)  # [G]
        log_K = torch.linspace(math.log(0.3), math.log(300.0), R, dtype=prob.dtype)[None, :] - last.log()[:, None]
        if self.tying == "none":
            eye = torch.eye(M, dtype=prob.dtype, device=prob.device)
            P = eye * gamma[:, :, None] + (1 - eye) * beta[:, :, None]
            flat = P.mean((1, 2), keepdim=True).expand_as(P)
            no_preference = (torch.arange(R) % 4 == 3).to(prob.device)[None, :, None, None]
            p_part = torch.logit(torch.where(no_preference, flat[:, None], P[:, None])).flatten(-2)
        else:
            p_part = torch.cat([torch.logit(gamma), torch.logit(beta / gamma)], -1)[:, None].expand(G, R, 2 * M)
        per_cond = torch.zeros(G, R, C, M, dtype=prob.dtype, device=prob.device)
        per_cond[..., M - 1] = log_K[:, :, None]
        theta = torch.cat([p_part, per_cond.flatten(-2)], -1)
        scale = torch.linspace(0.0, 0.5, R, dtype=prob.dtype)[:, None]
        # one draw for the P part and one condition's priors and K, the latter given to every condition:
        # a start does not depend on the order of the conditions (permuting them permutes its blocks)
        noise = scale * torch.randn(R, p_part.shape[-1] + M, generator=generator, dtype=prob.dtype)
        noise = torch.cat([noise[:, :-M], noise[:, -M:].repeat(1, C)], -1)
        return theta + noise.to(prob.device)


def as_lists(named: dict[str, torch.Tensor], C: int, per_condition: tuple[str, ...]) -> dict:
    """Tensors to lists; with a single condition, the per-condition entries lose their condition axis."""
    return {k: (v[0] if C == 1 and k in per_condition else v).detach().cpu().tolist() for k, v in named.items()}


@dataclass(frozen=True)
class CurveLaw:
    """A baseline: NLL(n) as a function of x = n + 1 with positive parameters exp(theta)."""

    name: str
    param_names: tuple[str, ...]

    @property
    def per_curve(self) -> int:
        return len(self.param_names)

    def n_params(self, M: int, C: int = 1) -> int:
        return C * M * self.per_curve

    def nll(self, theta: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
        """theta [..., per_curve], shots [..., S] -> NLL [..., S]."""
        return self._nll(theta, shots, jacobian=False)[0]

    def _nll(self, theta: torch.Tensor, shots: torch.Tensor, jacobian: bool):
        """NLL and, if asked, d NLL / d theta [..., S, per_curve] (closed forms: the fit's hot loop)."""
        q = theta.exp().unsqueeze(-2).unbind(-1)  # each [..., 1]
        log_x = torch.log1p(shots)
        if self.name == "power":
            c, alpha, c0 = q
            term = c * torch.exp(-alpha * log_x)
            grads = lambda: (term, -alpha * log_x * term, c0.expand_as(term))  # noqa: E731
        elif self.name == "bounded_power":
            c, n_c, alpha, c0 = q
            log_u = torch.log1p((shots + 1) / n_c)
            term = c * torch.exp(-alpha * log_u)
            grads = lambda: (term, alpha * term * (shots + 1) / (n_c + shots + 1), -alpha * log_u * term,  # noqa: E731
                             c0.expand_as(term))
        else:  # logistic: L / (1 + (x/x0)^kappa) = L * sigmoid(-z), z = kappa log(x/x0)
            amp, x0, kappa, c0 = q
            z = kappa * (log_x - torch.log(x0))
            term = amp * _sigmoid(-z)
            slope = term * _sigmoid(z)  # -d term / dz
            grads = lambda: (term, kappa * slope, -z * slope, c0.expand_as(term))  # noqa: E731
        nll = term + c0
        return (nll, torch.stack(grads(), dim=-1)) if jacobian else (nll,)

    def log_prob(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int) -> torch.Tensor:
        """theta [B, C*M*per_curve], shots [B, S] -> log p [B, C, M, S]."""
        B = theta.shape[0]
        return -self.nll(theta.reshape(B, C, M, self.per_curve), shots[:, None, None, :])

    def curve_log_prob_and_jacobian(self, theta: torch.Tensor, shots: torch.Tensor):
        """Per curve: theta [N, per_curve], shots [N, S] -> log p [N, S], jacobian [N, S, per_curve]."""
        nll, jac = self._nll(theta, shots, jacobian=True)
        return -nll, -jac

    def theta_from(self, params: dict) -> torch.Tensor:
        """Inverse of `named`: each parameter as an array [C, M] or [M]."""
        values = [torch.as_tensor(params[name], dtype=torch.float64) for name in self.param_names]
        return torch.stack(values, dim=-1).log().flatten()

    def named_tensors(self, theta: torch.Tensor, M: int, C: int = 1) -> dict[str, torch.Tensor]:
        """Each parameter as a tensor [C, M]."""
        values = theta.reshape(C, M, self.per_curve).exp()
        return {name: values[..., j] for j, name in enumerate(self.param_names)}

    def named(self, theta: torch.Tensor, M: int, C: int = 1) -> dict:
        return as_lists(self.named_tensors(theta.double(), M, C), C, self.param_names)

    def starts(self, R: int, nll0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """R starts per curve [R, N, per_curve] scaled to each curve's NLL at 0 shots (nll0 [N])."""
        N = nll0.shape[0]
        base = torch.log(nll0.clamp_min(1e-3))[None, :].expand(R, N)
        # the same offsets for every curve, so a curve's fit does not depend on the other curves
        spread = torch.randn(R, 1, self.per_curve, generator=generator, dtype=torch.float64)
        spread[0] = 0.0  # one deterministic, data-scaled start
        shape = {
            "power": [0.0, math.log(0.5), math.log(0.1)],
            "bounded_power": [0.0, math.log(5.0), math.log(0.5), math.log(0.1)],
            "logistic": [0.0, math.log(5.0), 0.0, math.log(0.1)],
        }[self.name]
        theta = torch.tensor(shape, dtype=torch.float64).expand(R, N, -1).clone() + spread
        theta[..., 0] += base  # amplitude ~ NLL at zero shots
        theta[..., -1] += base  # floor ~ a tenth of it
        return theta


LAWS: dict[str, BayesianLaw | CurveLaw] = {
    "bayesian": BayesianLaw("bayesian", "none"),
    "bayesian_sampling": BayesianLaw("bayesian_sampling", "sampling"),
    "bayesian_scoring": BayesianLaw("bayesian_scoring", "scoring"),
    "power": CurveLaw("power", ("C", "alpha", "c0")),
    "bounded_power": CurveLaw("bounded_power", ("C", "n_c", "alpha", "c0")),
    "logistic": CurveLaw("logistic", ("L", "x0", "kappa", "c0")),
}


def get_law(name: str) -> BayesianLaw | CurveLaw:
    if name not in LAWS:
        raise UserError(f"unknown law {name!r}; choose from {', '.join(LAW_NAMES)}")
    return LAWS[name]
