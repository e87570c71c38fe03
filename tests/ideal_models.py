"""Ideal learners behind a causal LM's calls, as the "models" whose fitted prior or gap is known."""
from types import SimpleNamespace

import torch

from datamodules.document_reader import DocumentReader, mixture_next_prob
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import GincWorld
from evaluation.ginc_curves import icl_demonstrations


class ReaderAsModel(torch.nn.Module):
    """A document reader with its own prior behind a causal LM's call: logits over the world's tokens,
    then PAD and BOS at probability 0."""

    def __init__(self, world: GincWorld, weights: list[float]) -> None:
        super().__init__()
        self.reader = DocumentReader(world, weights)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        nxt = self.reader.read(input_ids, next_tokens=True).next_log_prob
        return SimpleNamespace(logits=torch.cat([nxt, torch.full_like(nxt[..., :2], -torch.inf)], -1))


class ExactAsModel(torch.nn.Module):
    """An exact learner with its own prior behind a causal LM's calls, on the ICL prompts of `data`: at the
    position before each label, the log of its predictive over the world's tokens (PAD and BOS at -inf);
    0 elsewhere, where nothing is scored. `transformer` and `lm_head` serve `label_scores`."""

    def __init__(self, data: GincDataModule, weights: list[float]) -> None:
        super().__init__()
        learner = ExactLearner(GincWorld.build(data.world), weights)
        self.out: dict[bytes, torch.Tensor] = {}
        for batch in data.icl_dataloader():
            terms = learner.task_terms(*icl_demonstrations(batch, data.icl.demo_format, "cpu"))
            pred = mixture_next_prob(learner.log_prior + terms.evidence, terms.next_prob).log()
            logits = torch.zeros(*batch["input_ids"].shape, data.world.model_vocab_size, dtype=torch.float64)
            before = (batch["label_pos"] - 1)[..., None].expand(-1, -1, logits.shape[-1])
            logits.scatter_(1, before, torch.cat([pred, torch.full_like(pred[..., :2], -torch.inf)], -1))
            self.out[batch["input_ids"].numpy().tobytes()] = logits
        self.lm_head = torch.nn.Identity()

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.out[input_ids.numpy().tobytes()])

    def transformer(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self(input_ids).logits)
