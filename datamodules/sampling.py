"""Vectorised sampling from the GINC world: documents, ICL prompts and preference pairs.

Sampling runs over whole batches of sequences at once: one vector step per time step advances every
sequence (Walker alias tables make a step a few gathers), and every draw is a counter-based hash of
(seed, stream, sequence id, time step). Hence document `i` of a stream is the same whichever batch,
rank, worker or device produces it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datamodules.rng import hash_bits32, stream_key, uniform
from datamodules.world import DELIMITER, GincWorld, WorldConfigError, check_weights

DEMO_FORMATS = ("label", "sampled")
_TIME_CHUNK = 128  # time steps whose random bits are drawn in one vector call
_SEQ_GROUP = 4096  # sequences advanced together (measured best on one core among 512..4096)


def alias_table(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Walker/Vose alias tables of the rows of a stochastic matrix [R, S] -> (accept prob, alias), each [R, S]."""
    rows = matrix.detach().cpu().double().numpy()
    n_rows, size = rows.shape
    accept = np.ones((n_rows, size))
    alias = np.tile(np.arange(size), (n_rows, 1))
    for r in range(n_rows):
        scaled = rows[r] / rows[r].sum() * size
        small = [i for i in range(size) if scaled[i] < 1.0]
        large = [i for i in range(size) if scaled[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            accept[r, s], alias[r, s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
    return torch.as_tensor(accept, device=matrix.device), torch.as_tensor(alias, device=matrix.device)


class ChainSampler:
    """Samples hidden paths of many sequences at once, over joint states h = entity * P + property.

    Alias sampling: 24 random bits give u in [0, S); its integer part picks a column of the row, its
    fraction accepts that column or takes the column's alias. Thresholds and fractions are float32,
    so a transition probability is exact to ~1e-7. All step arithmetic is int32, which vectorises
    twice as wide as int64.
    """

    def __init__(self, world: GincWorld) -> None:
        self.n_states = S = world.config.n_states
        joint = world.transition_matrices()
        accept, alias = alias_table(joint.reshape(-1, S))
        self.accept = accept.reshape(-1).float()
        self.alias_scaled = (alias.reshape(-1) * S).int()  # pre-multiplied by S: a step's table index is one addition
        # int16 tokens move half the bytes of int32 through the final transpose (vocabularies < 32768)
        token_dtype = torch.int16 if world.config.vocab_size < 2**15 else torch.int32
        self.emission_scaled = torch.zeros(S * S, dtype=token_dtype, device=joint.device)
        self.emission_scaled[::S] = world.emission.reshape(-1).to(token_dtype)  # token of a path entry h * S

    def run(self, key: int, seq_ids: torch.Tensor, tasks: torch.Tensor, first: torch.Tensor,
            n_steps: int) -> torch.Tensor:
        """Advance each sequence from its first state n_steps times -> time-major int32
        path [n_steps + 1, B] of h * S."""
        S, B, dev = self.n_states, seq_ids.shape[0], seq_ids.device
        path = torch.empty(n_steps + 1, B, dtype=torch.int32, device=dev)  # time-major: contiguous rows
        path[0] = first * S
        row_base = (tasks * S * S).int()[None, :]
        i = torch.empty(B, dtype=torch.int32, device=dev)
        accept = torch.empty(B, dtype=torch.float32, device=dev)
        alias = torch.empty(B, dtype=torch.int32, device=dev)
        take = torch.empty(B, dtype=torch.bool, device=dev)
        for start in range(0, n_steps, _TIME_CHUNK):
            steps = torch.arange(start + 1, min(start + _TIME_CHUNK, n_steps) + 1, device=dev, dtype=torch.int32)
            u = ((hash_bits32(key, seq_ids[None, :], steps[:, None]) >> 8) & 0xFFFFFF).float().mul_(S * 2.0**-24)
            column = u.floor()
            frac = u.sub_(column)
            column = column.int()
            table_index = column + row_base
            column.mul_(S)
            for c in range(steps.shape[0]):  # one vector step advances every sequence; out= avoids allocations
                torch.add(path[start + c], table_index[c], out=i)
                torch.index_select(self.accept, 0, i, out=accept)
                torch.index_select(self.alias_scaled, 0, i, out=alias)
                torch.lt(frac[c], accept, out=take)
                torch.where(take, column[c], alias, out=path[start + c + 1])
        return path


def _categorical(u: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: u [B] uniforms, probs [B, S] (or [S]) -> indices [B]."""
    cdf = probs.cumsum(-1)
    cdf = cdf.expand(u.shape[0], -1) if cdf.dim() == 1 else cdf
    return torch.searchsorted(cdf.contiguous(), u[:, None]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class Documents:
    tokens: torch.Tensor  # [B, length] long
    tasks: torch.Tensor  # [B] long: the HMM each document was drawn from
    states: torch.Tensor | None  # [B, length] hidden path h = entity * n_properties + property (with_states=True)


class GincSampler:
    """All sampling of one world; pass `world.to(device)` to sample on a GPU."""

    def __init__(self, world: GincWorld) -> None:
        self.world = world
        self.config = world.config
        self.chains = ChainSampler(world)

    def documents(self, doc_ids: torch.Tensor, length: int, weights: object = None, stream: str = "pretrain",
                  with_states: bool = False) -> Documents:
        """Documents `doc_ids` of a stream: each picks a task by `weights` (default: the world's),
        then walks its HMM."""
        cfg, w = self.config, self.world
        doc_ids = torch.as_tensor(doc_ids, dtype=torch.long, device=w.device)
        mix = torch.as_tensor(check_weights(cfg.weights if weights is None else weights, cfg.n_tasks), device=w.device)
        key = stream_key(cfg.seed, "docs", stream)
        tasks = _categorical(uniform(key, doc_ids, -1), mix)
        first = _categorical(uniform(key, doc_ids, -2), w.start[tasks])
        tokens, states = [], []
        for g in range(0, doc_ids.shape[0], _SEQ_GROUP):
            group = slice(g, g + _SEQ_GROUP)
            path = self.chains.run(key, doc_ids[group], tasks[group], first[group], length - 1)
            tokens.append(self.chains.emission_scaled.index_select(0, path.view(-1)).view(path.shape).T)
            if with_states:
                states.append(path.T.long().div(cfg.n_states, rounding_mode="floor"))
        return Documents(torch.cat(tokens).long(), tasks, torch.cat(states) if with_states else None)

    def icl_prompts(self, task: int, k: int, prompt_ids: torch.Tensor, n_shots: int,
                    demo_format: str = "label") -> ICLPrompts:
        """ICL prompts of one task: BOS, then n_shots demonstrations of k tokens separated by the delimiter.

        A demonstration walks hidden states from a uniform entity and the prompt's start property
        (uniform over 1..P-1, shared by the prompt's demonstrations). Its target y is the emission of
        the most likely state after its first k-1 states, scored at the demonstration's k-th position.
        demo_format "label" shows y there (`x_1 .. x_{k-1} y`); "sampled" shows the k-th state's own
        emission, drawn from the HMM like the rest, as the reference code does (it equals y only as often
        as the walk takes its most likely step). The first k-1 tokens are the same in both formats.
        The last demonstration's delimiter is left out.
        """
        cfg, w = self.config, self.world
        if not 0 <= task < cfg.n_tasks:
            raise WorldConfigError(f"task {task} is out of range for a world of {cfg.n_tasks} tasks")
        if demo_format not in DEMO_FORMATS:
            raise WorldConfigError(f"unknown demonstration format {demo_format!r}; "
                                   f"choose one of {', '.join(DEMO_FORMATS)}")
        check_example_length(k)
        if n_shots < 1:
            raise WorldConfigError(f"n_shots must be >= 1, got {n_shots}")
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=w.device)
        N = prompt_ids.shape[0]
        key = stream_key(cfg.seed, "icl", task, k)
        start_prop = 1 + (uniform(key, prompt_ids, -1) * (cfg.n_properties - 1)).long()
        demo_ids = (prompt_ids[:, None] * n_shots + torch.arange(n_shots, device=w.device)).reshape(-1)
        first_entity = (uniform(key, demo_ids, -2) * cfg.n_entities).long()
        tasks = torch.full_like(demo_ids, task)
        first = first_entity * cfg.n_properties + start_prop.repeat_interleave(n_shots)
        sampled = demo_format == "sampled"
        path = self.chains.run(key, demo_ids, tasks, first, k - 1 if sampled else k - 2)
        shown = self.chains.emission_scaled[path.long()].T.reshape(N, n_shots, -1).long()
        y = w.label_token[task].reshape(-1)[path[k - 2].long() // cfg.n_states].reshape(N, n_shots)
        delim = torch.full((N, n_shots, 1), DELIMITER, dtype=torch.long, device=w.device)
        demos = [shown, delim] if sampled else [shown, y[..., None], delim]
        body = torch.cat(demos, dim=2).reshape(N, -1)[:, :-1]
        bos = torch.full((N, 1), cfg.bos_id, dtype=torch.long, device=w.device)
        label_pos = 1 + torch.arange(n_shots, device=w.device) * (k + 1) + (k - 1)
        return ICLPrompts(torch.cat([bos, body], 1), label_pos.expand(N, -1), y, task, k, start_prop, demo_format)

    def preference_pairs(self, pair_ids: torch.Tensor, length: int, chosen_weights: object, rejected_weights: object,
                         stream: str = "preference") -> tuple[Documents, Documents]:
        """Pairs (chosen, rejected): chosen documents from one mixture, rejected ones from another."""
        chosen = self.documents(pair_ids, length, chosen_weights, stream=f"{stream}/chosen")
        rejected = self.documents(pair_ids, length, rejected_weights, stream=f"{stream}/rejected")
        return chosen, rejected


@dataclass
class ICLPrompts:
    tokens: torch.Tensor  # [N, n_shots * (k + 1)] long, BOS first
    label_pos: torch.Tensor  # [N, n_shots]: position of each label in tokens
    labels: torch.Tensor  # [N, n_shots]
    task: int
    k: int
    start_property: torch.Tensor  # [N]
    demo_format: str = "label"

    @property
    def n_shots(self) -> int:
        return self.labels.shape[1]

    def demonstrations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, n, k-1], shown [N, n]): each demonstration's inputs and its k-th token, which is the
        target in the "label" format and a sampled emission in the "sampled" one (targets: `labels`)."""
        return split_demonstrations(self.tokens, self.k, self.n_shots)


def split_demonstrations(tokens: torch.Tensor, k: int, n_shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ICL prompt tokens [N, n_shots * (k + 1)] -> inputs x [N, n, k-1] and the k-th token [N, n]
    of each demonstration."""
    # drop BOS, restore the last delimiter
    body = torch.cat([tokens[:, 1:], tokens.new_full((tokens.shape[0], 1), DELIMITER)], 1)
    demos = body.reshape(tokens.shape[0], n_shots, k + 1)
    return demos[..., : k - 1], demos[..., k - 1]


def check_example_length(k: int) -> None:
    if k < 2:
        raise WorldConfigError(f"example length k must be >= 2 (inputs plus a label), got {k}")


def shots_for_context(context_length: int, k: int) -> int:
    """Demonstrations that fill a context: BOS plus n * (k + 1) - 1 tokens must fit."""
    check_example_length(k)
    n = context_length // (k + 1)
    if n < 1:
        raise WorldConfigError(f"context_length {context_length} is too short for one example of length k={k} "
                               f"(needs {k + 1}); raise it or lower k")
    return n
