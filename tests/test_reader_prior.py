"""The KL-fitted prior of an ideal learner: a document reader or an exact learner with a known prior,
read as a model, is recovered exactly."""
import dataclasses
import math

import pytest

from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import GincWorld, WorldConfig
from evaluation.quickstart_report import prior_note
from evaluation.reader_prior import fit_reader_prior
from tests.conftest import SMOOTH_WORLD
from tests.ideal_models import ExactAsModel, ReaderAsModel

WORLD = WorldConfig(**SMOOTH_WORLD)


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
    assert (fit.positions == 3 * 8 * 64 and fit.kl_prompts == pytest.approx(fit.kl)
            and fit.kl_documents != fit.kl_documents)
    assert fit.outside == pytest.approx(0.0, abs=1e-12)  # a reader puts nothing on tokens no task can emit


def prompts_of(demo_format: str, smoothing: float, demo_rate: float = 0.0) -> GincDataModule:
    world = dataclasses.replace(WORLD, property_smoothing=smoothing)
    return GincDataModule(world=world, context_length=48, batch_size=8, demo_rate=demo_rate,
                          icl={"k_values": [3], "prompts_per_task": 8, "batch_size": 8, "demo_format": demo_format})


@pytest.mark.parametrize("demo_format,smoothing", [("sampled", 0.5), ("label", 0.0)])
@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
def test_an_exact_learner_with_a_known_prior_is_fitted_back_to_it(demo_format, smoothing, weights):
    """On the labels of ICL prompts, in both formats, smoothed or not."""
    data = prompts_of(demo_format, smoothing)
    fit = fit_reader_prior(ExactAsModel(data, weights), data, documents=16, learner="exact")
    assert fit.learner == "exact" and fit.prior == pytest.approx(weights, abs=1e-4)
    assert fit.kl < 1e-8 and fit.kl_world > 1e-3  # the world's uniform prior predicts this learner worse
    assert fit.kl_prompts == pytest.approx(fit.kl) and math.isnan(fit.kl_documents)  # it has no documents
    assert fit.positions == 3 * 8 * 12  # the labels of 8 prompts per task, 48 // 4 = 12 shots each
    assert fit.outside == pytest.approx(0.0, abs=1e-12)


def test_auto_fits_the_exact_learner_to_a_model_trained_on_prompts():
    data = prompts_of("sampled", 0.5, demo_rate=0.25)
    assert fit_reader_prior(ExactAsModel(data, [0.6, 0.3, 0.1]), data, documents=4).learner == "exact"
    assert fit_reader_prior(ReaderAsModel(GincWorld.build(WORLD), [0.6, 0.3, 0.1]), prompts_of("sampled", 0.5),
                            documents=4).learner == "reader"


def test_the_quickstart_names_the_learner_it_fitted():
    note = prior_note({"pretrained": {"learner": "exact"}, "after SFT": {"learner": "exact"}})
    assert note.startswith("exact-learner prior: the prior with which the exact learner") and "document" not in note
