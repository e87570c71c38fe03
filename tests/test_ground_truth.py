"""A tiny ground-truth ladder: ideal learners with known priors, then fit and shift on their curves."""
import csv

import numpy as np
import pytest
import yaml

import evaluate
from evaluation.ladder import ladder_weights
from tests.conftest import SMOOTH_WORLD

DATA = {"world": SMOOTH_WORLD, "context_length": 128,
        "icl": {"k_values": [3], "prompts_per_task": 40, "batch_size": 20, "demo_format": "sampled", "n_shots": 24}}


def test_ladder_weights_favour_and_disfavour_one_task():
    w = ladder_weights(np.array([0.5, 0.25, 0.25]), 1, [4.0])
    np.testing.assert_allclose(w["favor-4"], np.array([0.5, 1.0, 0.25]) / 1.75)
    np.testing.assert_allclose(w["disfavor-4"], np.array([0.5, 0.0625, 0.25]) / 0.8125)
    assert list(w) == ["pretrain", "favor-4", "disfavor-4"]


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["exact", "reader"])
def test_tiny_ladder_moves_the_favoured_prior_the_right_way(tmp_path, capsys, learner):
    config = tmp_path / "world.yaml"
    config.write_text(yaml.safe_dump(DATA))
    out = tmp_path / "ladder"
    assert evaluate.main(["ladder", "--data-config", str(config), "--out", str(out), "--strengths", "8",
                          "--resamples", "10", "--starts", "8", "--device", "cpu", "--learner", learner]) == 0
    with (out / "shift" / "shift.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["fit"] == "shared" and r["task"] == "0"]
    prior = {r["run"].split("/")[1]: float(r["prior"]) for r in rows}
    assert prior["favor-8"] > prior["pretrain"] > prior["disfavor-8"], prior
    for r in rows:
        assert float(r["prior_lo"]) <= float(r["prior"]) <= float(r["prior_hi"])
    report = (out / "report.md").read_text()
    assert "intervals cover the truth in" in report and "Shared P vs free" in report
    assert report.count({"exact": "Exact Bayesian learners", "reader": "Document readers"}[learner]) == 1
    assert (out / "fits" / "fits.csv").exists() and (out / "curves.csv").exists()
