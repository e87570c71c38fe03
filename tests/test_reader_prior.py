"""The KL-fitted reader prior: a reader with a known prior, read as a model, is recovered exactly."""
from types import SimpleNamespace

import pytest
import torch

from datamodules.document_reader import DocumentReader
from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import GincWorld, WorldConfig
from evaluation.reader_prior import fit_reader_prior

WORLD = WorldConfig(n_tasks=3, n_entities=4, n_properties=5, vocab_size=12, property_smoothing=0.5, seed=1)


class ReaderAsModel(torch.nn.Module):
    """A document reader with its own prior behind a causal LM's call: logits over the world's tokens,
    then PAD and BOS at probability 0."""

    def __init__(self, world: GincWorld, weights: list[float]) -> None:
        super().__init__()
        self.reader = DocumentReader(world, weights)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        nxt = self.reader.read(input_ids, next_tokens=True).next_log_prob
        return SimpleNamespace(logits=torch.cat([nxt, torch.full_like(nxt[..., :2], -torch.inf)], -1))


def data(prompts: int = 8) -> GincDataModule:
    return GincDataModule(world=WORLD, context_length=64, batch_size=8,
                          icl={"k_values": [3], "prompts_per_task": prompts, "batch_size": 8, "demo_format": "sampled"})


@pytest.mark.parametrize("weights", [[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
def test_a_reader_with_a_known_prior_is_fitted_back_to_it(weights):
    fit = fit_reader_prior(ReaderAsModel(GincWorld.build(WORLD), weights), data(), documents=16)
    assert fit.prior == pytest.approx(weights, abs=1e-4)
    assert fit.kl < 1e-8
    if max(weights) > 0.5:  # the world's own (uniform) prior predicts this reader worse
        assert fit.kl_world > 1e-3
    assert fit.positions == (3 * 8 + 16) * 64  # every position of 8 prompts per task and 16 documents


def test_documents_and_prompts_are_scored_apart_and_together():
    fit = fit_reader_prior(ReaderAsModel(GincWorld.build(WORLD), [0.6, 0.3, 0.1]), data(), documents=0)
    assert fit.positions == 3 * 8 * 64 and fit.kl_prompts == pytest.approx(fit.kl) and fit.kl_documents != fit.kl_documents
    assert fit.outside == pytest.approx(0.0, abs=1e-12)  # a reader puts nothing on tokens no task can emit
