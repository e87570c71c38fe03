"""The six ICL laws of DESIGN.md, evaluated in log space, with analytic Jacobians for fitting.

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

LAW_NAMES = ("bayesian", "bayesian_sampling", "bayesian_scoring", "power", "bounded_power", "logistic")
BAYESIAN_NAMES = LAW_NAMES[:3]


def _lse_softmax(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp and softmax over the last dim from one exp (the fit's hot loop needs both)."""
    top = e.amax(-1, keepdim=True)
    ex = torch.exp(e - top)
    total = ex.sum(-1, keepdim=True)
    return (top + total.log()).squeeze(-1), ex / total


@dataclass(frozen=True)
class BayesianLaw:
    """Original (tying='none'), sampling-wise or scoring-wise tied Bayesian law.

    theta = [P part, then per condition: M prior logits, log K]. P part: M*M logits of P (original) or
    M logits of gamma and M logits of beta/gamma (tied: beta_j = gamma_j * sigmoid(.) keeps beta <= gamma).
    """

    name: str
    tying: str

    def p_size(self, M: int) -> int:
        return M * M if self.tying == "none" else 2 * M

    def n_params(self, M: int, C: int = 1) -> int:
        return self.p_size(M) + C * (M + 1)

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
        per_cond = theta[..., n_p:].reshape(*theta.shape[:-1], C, M + 1)
        log_rho = torch.log_softmax(per_cond[..., :M], dim=-1)
        return log_rho, self.log_P(theta[..., :n_p], M), per_cond[..., M]

    def log_prob(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int) -> torch.Tensor:
        """theta [B, D], shots [B, S] -> log p [B, C, M, S]."""
        return self._evaluate(theta, shots, M, C, jacobian=False)[0]

    def log_prob_and_jacobian(self, theta: torch.Tensor, shots: torch.Tensor, M: int, C: int):
        """log p [B, C, M, S] and d log p / d theta [B, C, M, S, D]."""
        return self._evaluate(theta, shots, M, C, jacobian=True)

    def _evaluate(self, theta, shots, M, C, jacobian):
        log_rho, log_P, log_K = self.structure(theta, M, C)
        K = log_K.exp()[:, :, None, None, None]  # [B, C, 1, 1, 1]
        n = shots[:, None, None, :, None]  # [B, 1, 1, S, 1]
        lp = log_P[:, None, :, None, :]  # [B, 1, M(i), 1, M(m)]
        e0 = log_rho[:, :, None, None, :] + K * n * lp
        e1 = e0 + lp
        if not jacobian:
            return (torch.logsumexp(e1, -1) - torch.logsumexp(e0, -1),)
        (lse1, w1), (lse0, w0) = _lse_softmax(e1), _lse_softmax(e0)
        d_rho = w1 - w0  # d log p / d log rho_m, and also d / d prior logit_m since sum_m d_rho = 0
        d_K = (K * n * lp * d_rho).sum(-1, keepdim=True)  # d log p / d log K
        # each condition's priors and K only move that condition's points
        own = torch.cat([d_rho, d_K], -1)[:, :, :, :, None, :] * torch.eye(C, dtype=theta.dtype, device=theta.device)[:, None, None, :, None]
        d_P = (K * n + 1) * w1 - K * n * w0  # d log p_i / d log P_im, for row i only
        jac_P = self._p_jacobian(d_P, theta[:, : self.p_size(M)], M)
        return lse1 - lse0, torch.cat([jac_P, own.flatten(-2)], -1)

    def _p_jacobian(self, d_P: torch.Tensor, p_raw: torch.Tensor, M: int) -> torch.Tensor:
        """Chain d log p_i / d log P_im [B, C, M(i), S, M(m)] to the P part of theta."""
        eye = torch.eye(M, dtype=d_P.dtype, device=d_P.device)
        if self.tying == "none":  # log P_im = logsigmoid(q_im): derivative 1 - P_im, own row only
            scaled = d_P * torch.sigmoid(-p_raw).reshape(-1, 1, M, 1, M)
            return (scaled[:, :, :, :, None, :] * eye[:, None, :, None]).flatten(-2)
        one_minus_gamma = torch.sigmoid(-p_raw[:, None, None, None, :M])
        one_minus_ratio = torch.sigmoid(-p_raw[:, None, None, None, M:])
        off = 1.0 - eye[:, None, :]  # [M(i), 1, M(k)]: k != i
        if self.tying == "sampling":  # P_ik = beta_k for k != i; beta_k = gamma_k sigmoid(b_k)
            return torch.cat([d_P * one_minus_gamma, d_P * off * one_minus_ratio], -1)
        # scoring-wise: every entry of row i is gamma_i or beta_i = gamma_i sigmoid(b_i)
        diag = eye[:, None, :]
        d_gamma = d_P.sum(-1, keepdim=True) * diag * one_minus_gamma
        d_ratio = (d_P * off).sum(-1, keepdim=True) * diag * one_minus_ratio
        return torch.cat([d_gamma, d_ratio], -1)

    def named(self, theta: torch.Tensor, M: int, C: int = 1) -> dict:
        """Interpretable parameters: priors, K and P (or gamma, beta); lists per condition when C > 1."""
        log_rho, log_P, log_K = self.structure(theta.double(), M, C)
        out: dict = {"priors": log_rho.exp().tolist(), "K": log_K.exp().tolist()}
        if self.tying == "none":
            out["P"] = log_P.exp().tolist()
        else:
            gamma = torch.sigmoid(theta[:M])
            out["gamma"] = gamma.tolist()
            out["beta"] = (gamma * torch.sigmoid(theta[M : 2 * M])).tolist()
        if C == 1:
            out["priors"], out["K"] = out["priors"][0], out["K"][0]
        return out

    def theta_from(self, params: dict) -> torch.Tensor:
        """Inverse of `named`: priors [C, M] (or [M]), K [C] (or scalar), and P [M, M] or gamma, beta [M]."""
        priors = torch.as_tensor(params["priors"], dtype=torch.float64)
        priors = priors if priors.dim() == 2 else priors[None]
        log_K = torch.log(torch.as_tensor(params["K"], dtype=torch.float64).reshape(-1, 1))
        if self.tying == "none":
            p_raw = torch.logit(torch.as_tensor(params["P"], dtype=torch.float64)).flatten()
        else:
            gamma = torch.as_tensor(params["gamma"], dtype=torch.float64)
            beta = torch.as_tensor(params["beta"], dtype=torch.float64)
            p_raw = torch.cat([torch.logit(gamma), torch.logit(beta / gamma)])
        return torch.cat([p_raw, torch.cat([priors.log(), log_K], dim=1).flatten()])

    def starts(self, R: int, M: int, C: int, generator: torch.Generator) -> torch.Tensor:
        """R starting points [R, D]: the first puts P's diagonal high (the task's own hypothesis
        explains it best); the others scatter around it, some with no diagonal preference at all,
        so mirrored basins are also explored and the best is kept."""
        D = self.n_params(M, C)
        noise = torch.randn(R, D, generator=generator, dtype=torch.float64)
        scale = torch.linspace(0.0, 1.5, R, dtype=torch.float64)[:, None]
        theta = scale * noise
        if self.tying == "none":
            diag = torch.eye(M, dtype=torch.float64).flatten()
            theta[:, : M * M] += -1.0 + 3.0 * diag * (torch.arange(R) % 4 != 3)[:, None]
        else:
            theta[:, :M] += 2.0
            theta[:, M : 2 * M] += -1.0
        return theta


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
            term = amp * torch.sigmoid(-z)
            slope = term * torch.sigmoid(z)  # -d term / dz
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

    def named(self, theta: torch.Tensor, M: int, C: int = 1) -> dict:
        values = theta.double().reshape(C, M, self.per_curve).exp()
        out = {name: values[..., j].tolist() for j, name in enumerate(self.param_names)}
        return {k: v[0] for k, v in out.items()} if C == 1 else out

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
        raise ValueError(f"unknown law {name!r}; choose from {', '.join(LAW_NAMES)}")
    return LAWS[name]
