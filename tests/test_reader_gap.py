"""The gap between a model's ICL curve and an ideal learner's: paired on the same prompts, with a
standard error and the level prompt noise alone gives."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from analysis.curves import rise
from contracts.run_artifacts import RunInfo, write_export
from datamodules.ginc_datamodule import GincDataModule
from evaluation.ginc_curves import ideal_learner, model_curve_rows, reader_curve_rows
from evaluation.reader_gap import gap_statistic, paired_differences, reader_gap_rows, reader_gaps
from evaluation.reader_prior import reader_prior_rows
from models.gpt import build_gpt, resolve_spec
from tests.ideal_models import ExactAsModel
from tests.test_reader_prior import prompts_of
from training.grid.report import has_prior
from user_errors import UserError

WORLD = dict(n_tasks=3, n_entities=3, n_properties=4, vocab_size=14, distinct_emissions=True, property_smoothing=0.5,
             seed=1)


def test_gap_recovers_a_known_offset_and_its_noise():
    rng = np.random.default_rng(0)
    # three tasks, 400 prompts, 30 shots: the model is 0.05 above the reader at every point, with per-prompt noise 0.1
    diffs = [0.05 + 0.1 * rng.standard_normal((400, 30)) for _ in range(3)]
    gap, se, noise = gap_statistic(diffs)
    assert gap == pytest.approx(0.05, abs=3 * 0.1 / np.sqrt(400))
    assert 0 < se < 0.005
    assert noise == pytest.approx(0.1 / np.sqrt(400) * np.sqrt(2 / np.pi), rel=0.2)  # E|N(0, s)| = s sqrt(2/pi)
    agree = [0.1 * rng.standard_normal((400, 30)) for _ in range(3)]  # curves that agree: the gap is the noise
    assert gap_statistic(agree)[0] == pytest.approx(noise, rel=0.2)


def test_rise_and_shots_to_90_percent_of_a_known_curve():
    shots = np.arange(60)
    curve = 0.2 + 0.2 * (1 - np.exp(-shots / 5))  # late level ~0.4; 90% of the rise at n = 5 ln 10 = 11.5
    total, n90 = rise(curve)
    assert total == pytest.approx(0.2, abs=1e-4)
    # the running mean over n..n+4 passes 0.38 first at n = 10 (mean of shots 10..14 ~ 0.381)
    assert n90 == 10
    assert rise(np.full(60, 0.3))[0] == 0 and math.isnan(rise(np.full(60, 0.3))[1])
    assert math.isnan(rise(curve[::-1])[1])  # a falling curve has no shots to 90%


def test_paired_differences_are_the_curves_table_difference():
    """Per (k, task, shots), the mean paired difference equals the model's curve minus the reader's."""
    data = GincDataModule(world=WORLD, context_length=24, batch_size=4,
                          icl=dict(k_values=[2, 3], prompts_per_task=6, batch_size=4, demo_format="sampled"))
    torch.manual_seed(0)
    model = build_gpt(resolve_spec("gpt2-1l", n_embd=16, n_head=2, n_positions=24), data.world.model_vocab_size,
                      data.world.bos_id, data.world.pad_id).eval()
    diffs = paired_differences(model, data)
    model_rows = {(r["k"], r["task"], r["shots"]): r["prob"]
                  for r in model_curve_rows(model, data, "m", torch.device("cpu"))}
    reader_rows = {(r["k"], r["task"], r["shots"]): r["prob"] for r in reader_curve_rows(data, progress=False)}
    for k, per_task in diffs.items():
        assert len(per_task) == 3 and all(d.shape[0] == 6 for d in per_task)
        for task, d in enumerate(per_task):
            for s, mean in enumerate(d.mean(0)):
                assert mean == pytest.approx(model_rows[k, task, s] - reader_rows[k, task, s], abs=1e-6)
    gaps = reader_gaps(model, data)
    assert [g.k for g in gaps] == [2, 3] and all(g.gap >= abs(g.signed) - 1e-12 and g.gap_se > 0 for g in gaps)


def test_the_exact_learner_has_no_gap_to_itself():
    """The exact learner read as a model against itself: paired on the same prompts, the gap is rounding,
    far below the prompts' noise; against the document reader it is not."""
    data = prompts_of("sampled", 0.5)
    model = ExactAsModel(data, None)
    (same,) = reader_gaps(model, data, learner="exact")
    assert same.learner == "exact" and same.gap < 1e-6 and same.noise < 1e-6 and same.prompts == 8
    assert same.model_rise == pytest.approx(same.learner_rise, abs=1e-6)  # the same curve rises alike
    (other,) = reader_gaps(model, data, learner="reader")
    assert other.learner == "reader" and other.gap > other.noise > 1000 * same.gap


def export(path: Path, data: GincDataModule) -> Path:
    """A run's HF export: an untrained tiny GPT-2 and the data settings it was 'trained' with."""
    torch.manual_seed(0)
    model = build_gpt(resolve_spec("gpt2-1l", n_embd=16, n_head=2, n_positions=48), data.world.model_vocab_size,
                      data.world.bos_id, data.world.pad_id)
    return write_export(path, model, dict(data.hparams), RunInfo("m/pretrain", "pretrain", "", "", "", 1, ""), 0)


def test_auto_compares_a_run_trained_on_prompts_with_the_exact_learner(tmp_path):
    """From a run's export: its saved demo_rate picks the learner, and the rows say which. The exact
    learner scores prompts only, so the grid fits its prior in a world without smoothing too."""
    hf = export(tmp_path / "prompts", prompts_of("sampled", 0.0, demo_rate=0.25))
    (gap,) = reader_gap_rows([hf], prompts=4, device="cpu")
    (prior,) = reader_prior_rows([hf], prompts=2, documents=2, device="cpu")
    assert gap["learner"] == prior["learner"] == "exact" and math.isnan(prior["kl_documents"])
    assert has_prior(hf) and not has_prior(export(tmp_path / "documents", prompts_of("sampled", 0.0)))
    assert ideal_learner("auto", 0.0) == "reader" and ideal_learner("exact", 0.0) == "exact"
    with pytest.raises(UserError, match="unknown learner 'bayes'"):
        ideal_learner("bayes", 0.0)


def test_an_unknown_learner_is_one_error_line(tmp_path, capsys):
    assert evaluate.main(["reader-gap", "--ckpt", str(tmp_path), "--out", str(tmp_path / "gap.csv"),
                          "--learner", "bayes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "bayes" in err
