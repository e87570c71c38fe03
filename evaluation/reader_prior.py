"""The prior with which the document reader best predicts a model: a law-free measure of the task prior.

For a model q and the document reader p_w of its world with prior w over the tasks, the mean over every
position of held-out ICL prompts and documents of KL(q(. | x_<=t) || p_w(. | x_<=t)) is minimised over w.
The KL is taken over the tokens some task can emit next (a set that no prior with non-zero weights
changes), with q renormalised over them; the mass q puts on impossible tokens is reported beside it.
The reader is the Bayes-optimal model of the pretraining documents, so a pretrained model that learned
them sits near the reader with the world's prior. If post-training moved only the prior, the KL left
over at the best w stays near the base model's KL to the base reader; what is left above that is
knowledge of the tasks that post-training changed, which no prior can express.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from datamodules.config_io import with_icl_overrides
from datamodules.document_reader import DocumentReader, mixture_next_prob, task_evidence
from datamodules.ginc_datamodule import DocumentBlocks, GincDataModule
from datamodules.world import GincWorld
from evaluation.ginc_curves import load_model
from evaluation.run_artifacts import read_source
from lightning_modules.gpt import resolve_device
from user_errors import UserError

STREAM = "reader-prior"  # documents of their own stream: never trained on, never validated on


@dataclass(frozen=True)
class ReaderFit:
    prior: list[float]  # the reader's prior that predicts the model best
    kl: float  # mean KL(model || reader) per position at that prior, nats
    kl_world: float  # the same with the world's own prior
    kl_prompts: float  # the mean KL at the best prior on the ICL prompts alone
    kl_documents: float  # and on the documents alone (NaN without documents)
    outside: float  # the model's mean probability of next tokens no task can emit (left out of the KL)
    positions: int  # positions averaged over


@dataclass
class _Block:
    """One batch of token sequences, read by the reader once: what the KL needs for any prior."""

    model_log_prob: torch.Tensor  # [N, L, V] log q(next | x_<=t), renormalised over the tokens some task can emit
    task_log_prob: torch.Tensor  # [N, L, M] log p_m(x_t | x_<t)
    task_next_prob: torch.Tensor  # [N, L, M, V] p_m(next | x_<=t)
    possible: torch.Tensor  # [N, L] positions the reader can predict after
    outside: torch.Tensor  # [N, L] the model's probability of tokens no task can emit there


def held_out_sequences(data: GincDataModule, documents: int) -> dict[str, list[torch.Tensor]]:
    """Token batches [N, L] to compare on: the data module's ICL prompts, and `documents` documents of the
    world's mixture (BOS + context_length - 1 tokens) from a stream no run trains on."""
    blocks = DocumentBlocks(data.world, data.context_length, data.batch_size, None, STREAM)
    return {"prompts": [batch["input_ids"] for batch in data.icl_dataloader()],
            "documents": [blocks.batch(i)["input_ids"][: documents - i * data.batch_size]
                          for i in range(-(-documents // data.batch_size))]}


@torch.no_grad()
def _read(model: GPT2LMHeadModel, reader: DocumentReader, tokens: torch.Tensor, device: torch.device) -> _Block:
    out = reader.read(tokens, next_tokens=True)
    # the tokens some task can emit next (the same set for every prior with no zero weight): the KL is taken
    # there, with the model renormalised over them, and the mass the model puts elsewhere is counted apart
    support = (out.task_next_prob > 0).any(-2)
    logits = model(input_ids=tokens.to(device)).logits.double().cpu()[..., :reader.V]  # PAD and BOS are never next
    outside = 1.0 - torch.where(support, logits.softmax(-1), 0.0).sum(-1)
    log_q = torch.where(support, logits, -torch.inf).log_softmax(-1)
    return _Block(log_q, out.task_log_prob, out.task_next_prob, out.possible, outside)


def mean_kl(blocks: list[_Block], log_prior: torch.Tensor) -> torch.Tensor:
    """Mean over the readable positions of KL(model || reader with prior exp(log_prior))."""
    total, n = log_prior.new_zeros(()), 0
    for b in blocks:
        p = mixture_next_prob(task_evidence(log_prior, b.task_log_prob), b.task_next_prob)
        q = b.model_log_prob.exp()
        # 0 log 0 = 0 off the support; the clamp keeps log's gradient finite there
        kl = torch.where(q > 0, q * (b.model_log_prob - p.clamp_min(torch.finfo(p.dtype).tiny).log()), 0.0).sum(-1)
        total = total + kl[b.possible].sum()
        n += int(b.possible.sum())
    return total / n


def fit_reader_prior(model: GPT2LMHeadModel, data: GincDataModule, documents: int = 64,
                     device: str | torch.device = "cpu") -> ReaderFit:
    """The reader's prior that minimises the mean KL from `model` on `data`'s ICL prompts and `documents`
    held-out documents; the KL there and at the world's prior."""
    reader = DocumentReader(GincWorld.build(data.world))
    model = model.to(device).eval()
    read = {name: [_read(model, reader, tokens, torch.device(device)) for tokens in batches]
            for name, batches in held_out_sequences(data, documents).items()}
    blocks = [b for source in read.values() for b in source]
    world_kl = mean_kl(blocks, reader.log_prior)
    free = torch.zeros(reader.M - 1, dtype=torch.float64, requires_grad=True)  # the last logit stays 0: no flat direction
    opt = torch.optim.LBFGS([free], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def log_prior() -> torch.Tensor:
        return torch.cat([free, free.new_zeros(1)]).log_softmax(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mean_kl(blocks, log_prior())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        best = log_prior()
        kl = {name: float(mean_kl(source, best)) if source else math.nan for name, source in read.items()}
        total = float(mean_kl(blocks, best))
    positions = sum(int(b.possible.sum()) for b in blocks)
    outside = sum(float(b.outside[b.possible].sum()) for b in blocks) / positions
    return ReaderFit(best.exp().tolist(), total, float(world_kl), kl["prompts"], kl["documents"], outside, positions)


def reader_prior_rows(paths: Sequence[str | Path], prompts: int = 32, documents: int = 64,
                      device: str = "auto") -> list[dict]:
    """One row per run's checkpoint or HF export: its KL-fitted reader prior (prior_0 ...), the mean KL
    there and at the world's prior, on its own world's ICL prompts (`prompts` per k and task) and documents."""
    if prompts < 1 or documents < 0:
        raise UserError(f"--prompts must be >= 1 and --documents >= 0, got {prompts} and {documents}")
    rows = []
    for path in paths:
        src = read_source(path)
        data = GincDataModule(**with_icl_overrides(src.data, prompts_per_task=prompts))
        fit = fit_reader_prior(load_model(path), data, documents, resolve_device(device))
        print(f"reader prior of {src.label}: {', '.join(f'{p:.3f}' for p in fit.prior)} (KL {fit.kl:.4f} nats, "
              f"{fit.kl_world:.4f} at the world's prior)", file=sys.stderr, flush=True)
        rows.append({"run": src.label, **{f"prior_{i}": p for i, p in enumerate(fit.prior)}, "kl": fit.kl,
                     "kl_world": fit.kl_world, "kl_prompts": fit.kl_prompts, "kl_documents": fit.kl_documents, "outside": fit.outside, "positions": fit.positions, **src.columns()})
    return rows
