"""SFT from the tiny pretrained run: favouring a task raises its likelihood relative to the others,
disfavouring lowers it."""
from __future__ import annotations

import csv
from collections import defaultdict

import pytest

import train
from evaluation.reports import one_thread
from tests.conftest import TINY_FIT, TINY_RUN_STEPS
from training.checks import post_training_weights

TINY = [*TINY_FIT, "--trainer.val_check_interval", "10"]


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """SFT of the tiny run that favours task 0 and SFT that disfavours it (runs/favor, runs/disfavor)."""
    root = tmp_path_factory.mktemp("runs")
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    with one_thread():
        for direction in ("favor", "disfavor"):
            assert train.main([*TINY, "--run.root", str(root), "--run.name", direction, "--run.stage", "sft",
                               "--run.direction", direction, "--run.tasks", "[0]", "--model.init_from", str(ckpt),
                               "--data.train_documents", "64", "--trainer.max_steps", "30",
                               "--model.optim.lr", "3e-3"]) == 0
    return root


def read_curves(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def relative_log_likelihood(rows: list[dict], step: str) -> float:
    """Mean label log-likelihood of task 0's prompts minus that of the other tasks' prompts."""
    ll = defaultdict(list)
    for r in rows:
        if r["step"] == step:
            ll[r["task"] == "0"].append(-float(r["nll"]))
    return sum(ll[True]) / len(ll[True]) - sum(ll[False]) / len(ll[False])


@pytest.mark.slow
def test_favour_raises_and_disfavour_lowers_the_task(tiny_run, runs):
    pre = relative_log_likelihood(read_curves(tiny_run / "curves.csv"), str(TINY_RUN_STEPS))
    favor = relative_log_likelihood(read_curves(runs / "favor" / "curves.csv"), "30")
    disfavor = relative_log_likelihood(read_curves(runs / "disfavor" / "curves.csv"), "30")
    assert favor > pre + 0.2 and disfavor < pre - 0.2, (pre, favor, disfavor)


@pytest.mark.slow
def test_sft_curves_trace_the_post_training(tiny_run, runs):
    rows = read_curves(runs / "favor" / "curves.csv")
    assert {r["step"] for r in rows} == {"0", "10", "20", "30"}  # step 0 = the pretrained model, before SFT
    assert {(r["run"], r["stage"], r["method"], r["direction"], r["amount"], r["target"]) for r in rows} == {
        ("gpt2-1l-d32/sft-favor-64", "posttrain", "sft", "favor", "64", "0")}
    start = [r["prob"] for r in rows if r["step"] == "0"]
    assert start == [r["prob"] for r in read_curves(tiny_run / "curves.csv") if r["step"] == str(TINY_RUN_STEPS)]


def test_sft_mixture_and_task_errors(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "checkpoints" / "last.ckpt")
    base = [*TINY, "--run.root", str(tmp_path), "--run.stage", "sft", "--model.init_from", ckpt]
    assert train.main([*base, "--run.direction", "favor", "--run.tasks", "[3]"]) == 2
    assert "run.tasks [3] must name tasks of the world (0..2)" in capsys.readouterr().err
    assert train.main([*base, "--run.direction", "favor", "--run.tasks", "[0]",
                       "--data.train_weights", "[1, 0, 0]"]) == 2
    assert "not both" in capsys.readouterr().err
    assert post_training_weights([0.5, 0.25, 0.25], "disfavor", [0]) == [0.0, 0.25, 0.25]
    assert post_training_weights([0.5, 0.25, 0.25], "favor", [0, 2]) == [0.5, 0.0, 0.25]
