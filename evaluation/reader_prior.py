"""The prior with which an ideal learner best predicts a model: a law-free measure of the task prior.

For a model q and an ideal learner p_w of its world with prior w over the tasks, the mean over held-out
positions of KL(q(. | x_<=t) || p_w(. | x_<=t)) is minimised over w. The learner is
- the document reader, the Bayes-optimal model of the pretraining documents, at every position of
  held-out ICL prompts and documents; or
- the exact learner, the Bayes-optimal model of ICL prompts (the target of a model trained with prompts
  in its data: "auto" picks it when the run's demo_rate > 0), at the label positions of held-out ICL
  prompts, where its predictive is over next tokens ("sampled" format) or over labels ("label" format).
Either way p_w is a mixture over tasks of terms that w does not change (each task's evidence and next-token
distribution), so the terms are computed once and the optimisation only recombines them. The KL is taken
over the tokens the learner can give next (a set that no prior with non-zero weights changes), with q
renormalised over them; the mass q puts elsewhere is reported beside it. A model that learned its data sits
near its learner with the world's prior. If post-training moved only the prior, the KL left over at the
best w stays near the base model's KL to the base learner; what is left above that is knowledge of the
tasks that post-training changed, which no prior can express.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from contracts.run_artifacts import read_source
from datamodules.config_io import with_icl_overrides
from datamodules.document_reader import DocumentReader, mixture_next_prob
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import DocumentBlocks, GincDataModule
from datamodules.world import GincWorld
from evaluation.ginc_curves import PRIOR_NAMES, icl_demonstrations, ideal_learner, load_model
from evaluation.settings import ReaderPriorConfig
from models.gpt import resolve_device
from user_errors import UserError

# columns every reader-prior table of the project has (older ones lack `learner`): how an existing --out is
# recognised as one that may be replaced
TABLE_COLUMNS = ("run", "prior_0", "kl", "kl_world", "positions")
STREAM = "reader-prior"  # documents of their own stream: never trained on, never validated on


@dataclass(frozen=True)
class ReaderFit:
    learner: str  # the ideal learner fitted: "exact" or "reader"
    prior: list[float]  # the learner's prior that predicts the model best
    kl: float  # mean KL(model || learner) per position at that prior, nats
    kl_world: float  # the same with the world's own prior
    kl_prompts: float  # the mean KL at the best prior on the ICL prompts alone
    kl_documents: float  # and on the documents alone (NaN without documents, and for the exact learner)
    outside: float  # the model's mean probability of next tokens the learner cannot give (left out of the KL)
    positions: int  # positions averaged over


@dataclass
class _Block:
    """One batch of positions, read by the learner once: what the KL needs for any prior."""

    model_log_prob: torch.Tensor  # [N, L, V] log q(next | x_<=t), renormalised over the tokens the learner can give
    task_evidence: torch.Tensor  # [N, L, M] log p_m(what the learner has read), without the prior
    task_next_prob: torch.Tensor  # [N, L, M, V] p_m(next | x_<=t)
    possible: torch.Tensor  # [N, L] positions the learner can predict at
    outside: torch.Tensor  # [N, L] the model's probability of tokens the learner cannot give there


def held_out_sequences(data: GincDataModule, documents: int) -> dict[str, list[torch.Tensor]]:
    """Token batches [N, L] to compare on: the data module's ICL prompts, and `documents` documents of the
    world's mixture (BOS + context_length - 1 tokens) from a stream no run trains on."""
    blocks = DocumentBlocks(data.world, data.context_length, data.batch_size, None, STREAM)
    return {"prompts": [batch["input_ids"] for batch in data.icl_dataloader()],
            "documents": [blocks.batch(i)["input_ids"][: documents - i * data.batch_size]
                          for i in range(-(-documents // data.batch_size))]}


def _block(logits: torch.Tensor, task_evidence: torch.Tensor, task_next_prob: torch.Tensor) -> _Block:
    """The model's logits [N, L, V] beside the learner's per-task terms at the same positions."""
    # the tokens some task can give next (the same set for every prior with no zero weight): the KL is taken
    # there, with the model renormalised over them, and the mass the model puts elsewhere is counted apart
    support = (task_next_prob > 0).any(-2)
    outside = 1.0 - torch.where(support, logits.softmax(-1), 0.0).sum(-1)
    log_q = torch.where(support, logits, -torch.inf).log_softmax(-1)
    return _Block(log_q, task_evidence, task_next_prob, torch.isfinite(task_evidence).any(-1), outside)


def _logits(model: GPT2LMHeadModel, tokens: torch.Tensor, V: int, device: torch.device) -> torch.Tensor:
    """[N, L, V] on the CPU: the model's next-token logits over the world's tokens (PAD and BOS are never next)."""
    return model(input_ids=tokens.to(device)).logits.double().cpu()[..., :V]


@torch.no_grad()
def _read(model: GPT2LMHeadModel, reader: DocumentReader, tokens: torch.Tensor, device: torch.device) -> _Block:
    """Every position of a token batch, as documents."""
    out = reader.read(tokens, next_tokens=True)
    return _block(_logits(model, tokens, reader.V, device), out.task_log_prob.cumsum(1), out.task_next_prob)


@torch.no_grad()
def _read_labels(model: GPT2LMHeadModel, learner: ExactLearner, batch: dict, demo_format: str,
                 device: torch.device) -> _Block:
    """The label positions of an ICL batch, as prompts: the output before each label predicts it."""
    terms = learner.task_terms(*icl_demonstrations(batch, demo_format, "cpu"))
    before = (batch["label_pos"] - 1)[..., None].expand(-1, -1, learner.V)
    return _block(_logits(model, batch["input_ids"], learner.V, device).gather(1, before), terms.evidence,
                  terms.next_prob)


def learner_blocks(learner: str, model: GPT2LMHeadModel, data: GincDataModule, documents: int,
                   device: torch.device) -> dict[str, list[_Block]]:
    """The positions the KL averages over, by source: the exact learner's on the ICL prompts' labels (it
    has no documents), the reader's on every position of the prompts and of `documents` documents."""
    world = GincWorld.build(data.world)
    if learner == "exact":
        exact = ExactLearner(world)
        return {"prompts": [_read_labels(model, exact, batch, data.icl.demo_format, device)
                            for batch in data.icl_dataloader()],
                "documents": []}
    reader = DocumentReader(world)
    return {name: [_read(model, reader, tokens, device) for tokens in batches]
            for name, batches in held_out_sequences(data, documents).items()}


def mean_kl(blocks: list[_Block], log_prior: torch.Tensor) -> torch.Tensor:
    """Mean over the predictable positions of KL(model || learner with prior exp(log_prior))."""
    total, n = log_prior.new_zeros(()), 0
    for b in blocks:
        p = mixture_next_prob(log_prior + b.task_evidence, b.task_next_prob)
        q = b.model_log_prob.exp()
        # 0 log 0 = 0 off the support; the clamp keeps log's gradient finite there
        kl = torch.where(q > 0, q * (b.model_log_prob - p.clamp_min(torch.finfo(p.dtype).tiny).log()), 0.0).sum(-1)
        total = total + kl[b.possible].sum()
        n += int(b.possible.sum())
    return total / n


def fit_reader_prior(model: GPT2LMHeadModel, data: GincDataModule, documents: int = 64,
                     device: str | torch.device = "cpu", learner: str = "auto") -> ReaderFit:
    """The ideal learner's prior (`learner`: exact, reader, or auto by data.demo_rate) that minimises the
    mean KL from `model` on `data`'s ICL prompts (and, for the reader, `documents` held-out documents);
    the KL there and at the world's prior."""
    learner = ideal_learner(learner, data.demo_rate)
    model = model.to(device).eval()
    read = learner_blocks(learner, model, data, documents, torch.device(device))
    blocks = [b for source in read.values() for b in source]
    world_kl = mean_kl(blocks, torch.as_tensor(data.world.weights, dtype=torch.float64).log())
    # the last logit stays 0: no flat direction
    free = torch.zeros(data.world.n_tasks - 1, dtype=torch.float64, requires_grad=True)
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
    return ReaderFit(learner, best.exp().tolist(), total, float(world_kl), kl["prompts"], kl["documents"], outside,
                     positions)


def reader_prior_rows(paths: Sequence[str | Path], prompts: int = ReaderPriorConfig.prompts,
                      documents: int = ReaderPriorConfig.documents, device: str = ReaderPriorConfig.device,
                      learner: str = ReaderPriorConfig.learner) -> list[dict]:
    """One row per run's checkpoint or HF export: the KL-fitted prior (prior_0 ...) of its ideal learner
    (`learner`: exact, reader, or auto: exact for a run trained with prompts in its data), the mean KL there
    and at the world's prior, on its own world's ICL prompts (`prompts` per k and task) and, for the
    reader, documents."""
    if prompts < 1 or documents < 0:
        raise UserError(f"prompts must be >= 1 and documents >= 0, got {prompts} and {documents}")
    rows = []
    for path in paths:
        src = read_source(path)
        data = GincDataModule(**with_icl_overrides(src.data, prompts_per_task=prompts))
        fit = fit_reader_prior(load_model(path), data, documents, resolve_device(device), learner)
        print(f"{PRIOR_NAMES[fit.learner]} of {src.label}: {', '.join(f'{p:.3f}' for p in fit.prior)} (KL {fit.kl:.4f} "
              f"nats, {fit.kl_world:.4f} at the world's prior)", file=sys.stderr, flush=True)
        rows.append({"run": src.label, "learner": fit.learner, **{f"prior_{i}": p for i, p in enumerate(fit.prior)},
                     "kl": fit.kl, "kl_world": fit.kl_world, "kl_prompts": fit.kl_prompts,
                     "kl_documents": fit.kl_documents, "outside": fit.outside, "positions": fit.positions,
                     **src.columns()})
    return rows
