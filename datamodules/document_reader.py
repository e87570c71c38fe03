"""The document reader: the Bayes-optimal model of the world's documents, and nothing else.

It is the task mixture reading any token sequence as one document: p(x_t | x_<t) = sum_m p(m | x_<t)
p_m(x_t | x_<t), with each task's HMM run by a forward pass over all hidden states (float64, rescaled
every step). On documents its negative log-likelihood is the floor a pretrained model's loss can
reach; on ICL prompts it is what a model that learned the documents perfectly, and nothing about
the prompt format, would predict. Where a prefix has probability 0 under every task (a prompt's
demonstration boundary that no document contains), the reader has no prediction: those positions are
flagged, not given a NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from datamodules.world import GincWorld, check_weights


@dataclass
class ReaderOutput:
    log_prob: torch.Tensor  # [N, L]: log p(x_t | x_<t) of every token after BOS (position 0 holds 0)
    possible: torch.Tensor  # [N, L] bool: the prefix x_<=t has non-zero probability under some task
    task_log_prob: torch.Tensor  # [N, L, M]: log p_m(x_t | x_<t) of each task alone (-inf where impossible)
    next_log_prob: torch.Tensor | None = None  # [N, L, V]: log p(next token | x_<=t), when asked for
    task_next_prob: torch.Tensor | None = None  # [N, L, M, V]: p_m(next token | x_<=t) of each task, when asked for


def task_evidence(log_prior: torch.Tensor, task_log_prob: torch.Tensor) -> torch.Tensor:
    """log w_m + log p_m(x_<=t) [N, L, M]: the unnormalised log posterior over tasks after each token."""
    return log_prior + task_log_prob.cumsum(1)


def mixture_next_prob(evidence: torch.Tensor, task_next_prob: torch.Tensor) -> torch.Tensor:
    """p(next token | x_<=t) [N, L, V] of the mixture whose tasks have `evidence` [N, L, M] and next-token
    distributions `task_next_prob` [N, L, M, V]; 0 everywhere after an impossible prefix."""
    ok = torch.isfinite(evidence).any(-1, keepdim=True)
    post = torch.softmax(torch.where(ok, evidence, 0.0), -1)  # a row of -inf would give NaN
    return torch.where(ok, (post[..., None] * task_next_prob).sum(-2), 0.0)


def mixture_next_log_prob(evidence: torch.Tensor, task_next_prob: torch.Tensor) -> torch.Tensor:
    """log of `mixture_next_prob`: -inf everywhere after an impossible prefix."""
    return mixture_next_prob(evidence, task_next_prob).log()


class DocumentReader:
    """The mixture of a world's HMMs (prior `weights`, default the world's) as a next-token predictor."""

    def __init__(self, world: GincWorld, weights: object = None) -> None:
        cfg = world.config
        self.world, self.M, self.S, self.V = world, cfg.n_tasks, cfg.n_states, cfg.vocab_size
        w = check_weights(cfg.weights if weights is None else weights, cfg.n_tasks, "reader weights")
        self.log_prior = torch.as_tensor(w, dtype=torch.float64, device=world.device).log()
        self.transition = world.transition_matrices()  # [M, S, S]
        emit = world.emission.reshape(-1)
        self.emits = torch.zeros(self.S, self.V, dtype=torch.float64, device=world.device)
        self.emits[torch.arange(self.S, device=world.device), emit] = 1.0  # [S, V]

    def read(self, tokens: torch.Tensor, next_tokens: bool = False) -> ReaderOutput:
        """tokens [N, L], BOS first, then emissions only. `next_tokens` adds every position's next-token
        distribution, of the mixture and of each task."""
        N, L = tokens.shape
        dev = tokens.device
        log_prob = torch.zeros(N, L, dtype=torch.float64, device=dev)
        task_lp = torch.zeros(N, L, self.M, dtype=torch.float64, device=dev)
        task_next = torch.zeros(N, L, self.M, self.V, dtype=torch.float64, device=dev) if next_tokens else None
        state = self.world.start[None].expand(N, -1, -1)  # [N, M, S]: p_m(h_t | x_<t), before seeing x_t
        seen = self.log_prior.expand(N, -1).clone()  # log w_m + log p_m(x_<t)
        for t in range(1, L):
            token_prob = state @ self.emits  # [N, M, V]: p_m(x_t = v | x_<t)
            if next_tokens:
                task_next[:, t - 1] = token_prob
            p = token_prob.gather(-1, tokens[:, t, None, None].expand(-1, self.M, 1)).squeeze(-1)  # [N, M]
            log_p = p.log()
            post = torch.softmax(seen, -1)  # p(m | x_<t); a row of -inf (impossible prefix) gives NaN
            mix = (post * p).sum(-1)
            log_prob[:, t] = torch.where(torch.isfinite(seen).any(-1) & (mix > 0), mix.log(), torch.zeros_like(mix))
            task_lp[:, t] = log_p
            seen = seen + log_p
            filtered = state * self.emits[:, tokens[:, t]].T[:, None, :]  # keep states that emit x_t
            state = torch.einsum("nms,mst->nmt", filtered / p.clamp_min(torch.finfo(torch.float64).tiny)[..., None],
                                 self.transition)
        evidence = task_evidence(self.log_prior, task_lp)
        possible = torch.isfinite(evidence).any(-1)  # an impossible prefix stays impossible
        possible[:, 0] = True
        nxt = None
        if next_tokens:  # including the prediction after the last token
            task_next[:, L - 1] = state @ self.emits
            nxt = mixture_next_log_prob(evidence, task_next)
        return ReaderOutput(torch.where(possible, log_prob, torch.zeros_like(log_prob)), possible, task_lp, nxt,
                            task_next)
