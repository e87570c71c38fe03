"""The document reader against brute-force enumeration of hidden paths, and as the floor of document loss."""
import itertools

import numpy as np
import pytest
import torch

from datamodules.document_reader import DocumentReader
from datamodules.sampling import GincSampler
from datamodules.world import GincWorld, WorldConfig


def brute_force(world: GincWorld, tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """p(x_t | x_<t) for t >= 1 by summing over every hidden path of every task (NaN once impossible)."""
    cfg = world.config
    S, L = cfg.n_states, len(tokens)
    emit = world.emission.reshape(-1).numpy()
    prefix = np.zeros((cfg.n_tasks, L))  # p_m(x_1..x_t), each t by its own enumeration of paths
    for m in range(cfg.n_tasks):
        T, start = world.transition_matrix(m).numpy(), world.start[m].numpy()
        for t in range(1, L):
            for path in itertools.product(range(S), repeat=t):
                p = start[path[0]] * (emit[path[0]] == tokens[1])
                for j in range(1, t):
                    p *= T[path[j - 1], path[j]] * (emit[path[j]] == tokens[j + 1])
                prefix[m, t] += p
    joint = weights @ prefix
    before = np.concatenate([[1.0], joint[1:-1]])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(before > 0, joint[1:] / before, np.nan)


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_reader_equals_brute_force(smoothing):
    world = GincWorld.build(WorldConfig(n_tasks=2, n_entities=2, n_properties=3, vocab_size=4,
                                        property_temperature=1.0, property_smoothing=smoothing, seed=4))
    weights = np.array([0.7, 0.3])
    docs = GincSampler(world).documents(torch.arange(4), 6, weights=weights)
    bos = torch.full((4, 1), world.config.bos_id)
    tokens = torch.cat([bos, docs.tokens[:, :5]], 1)
    out = DocumentReader(world, weights).read(tokens)
    for i in range(4):
        want = brute_force(world, tokens[i].numpy(), weights)
        got = np.where(out.possible[i, 1:].numpy(), out.log_prob[i, 1:].exp().numpy(), np.nan)
        np.testing.assert_allclose(got, want, rtol=1e-10, equal_nan=True)


def test_impossible_prefixes_are_flagged_not_nan():
    world = GincWorld.build(WorldConfig())
    reader = DocumentReader(world)
    prompts = GincSampler(world).icl_prompts(0, 3, torch.arange(8), n_shots=20)
    out = reader.read(prompts.tokens)
    assert torch.isfinite(out.log_prob).all()
    assert not out.possible.all(), "an unsmoothed world should make some demonstration boundaries impossible"
    assert (out.possible.cummin(1).values == out.possible).all()


def test_reader_loss_is_the_floor_of_document_loss():
    """On documents, the reader's mean NLL is below that of any other predictor, e.g. the reader of a
    wrongly weighted mixture, and close to the entropy rate given the true task."""
    world = GincWorld.build(WorldConfig(weights=[0.4, 0.3, 0.2, 0.05, 0.05]))
    docs = GincSampler(world).documents(torch.arange(24), 255, stream="val")
    tokens = torch.cat([torch.full((24, 1), world.config.bos_id), docs.tokens], 1)
    right = DocumentReader(world).read(tokens)
    wrong = DocumentReader(world, [0.05, 0.05, 0.2, 0.3, 0.4]).read(tokens)
    assert right.possible.all()
    nll = -right.log_prob[:, 1:].mean()
    assert nll < -wrong.log_prob[:, 1:].mean()
    own = -right.task_log_prob[:, 1:].gather(-1, docs.tasks[:, None, None].expand(-1, 255, 1)).mean()
    assert own <= nll + 1e-9  # knowing the task can only help


@pytest.mark.parametrize("smoothing, demo_format", [(0.0, "label"), (0.6, "sampled")])
def test_ideal_curves_of_both_learners_are_finite_and_count_undefined_points(tmp_path, capsys, smoothing, demo_format):
    import csv

    import evaluate

    config = tmp_path / "world.yaml"
    config.write_text(f"world: {{n_tasks: 3, n_entities: 4, n_properties: 5, vocab_size: 12, "
                      f"property_smoothing: {smoothing}, seed: 1}}\ncontext_length: 96\n"
                      f"icl: {{k_values: [3], prompts_per_task: 12, batch_size: 12, demo_format: {demo_format}}}\n")
    out = tmp_path / "curves.csv"
    assert evaluate.main(["curves", "--ideal", "--learner", "both", "--data-config", str(config), "--out", str(out),
                          "--device", "cpu"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {"ideal", "ideal-reader"}
    assert all(np.isfinite(float(r["prob"])) and np.isfinite(float(r["nll"])) for r in rows)
    reader = [r for r in rows if r["run"] == "ideal-reader"]
    assert all(int(r["count"]) + int(r["undefined"]) == 12 for r in reader)
    assert "of scored positions have probability 0 as a document" in capsys.readouterr().err


def test_curves_append_refuses_a_run_already_in_the_table_unless_replace(tmp_path, capsys):
    import csv
    import os

    import evaluate

    config = tmp_path / "world.yaml"
    config.write_text("world: {n_tasks: 2, n_entities: 3, n_properties: 4, vocab_size: 8, seed: 1}\n"
                      "context_length: 32\n"
                      "icl: {k_values: [3], prompts_per_task: 4, batch_size: 4}\n")
    out = tmp_path / "curves.csv"
    base = ["curves", "--ideal", "--data-config", str(config), "--out", str(out), "--device", "cpu"]
    assert evaluate.main(base) == 0
    before = out.read_text()
    assert evaluate.main([*base, "--append"]) == 2
    assert "already has rows of run ideal; pass --replace" in capsys.readouterr().err
    assert out.read_text() == before
    assert evaluate.main([*base, "--append", "--replace"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(before.splitlines()) - 1  # replaced, not duplicated
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~mask


def test_reference_curves_are_computed_once_per_world_and_prompt_set(monkeypatch):
    """An ablation grid's runs share the ideal learners' curves; another world or prompt set gets its own."""
    from datamodules.ginc_datamodule import GincDataModule
    from evaluation import ginc_curves

    calls = []
    real = ginc_curves.exact_curve_rows
    monkeypatch.setattr(ginc_curves, "exact_curve_rows",
                        lambda data, *a, **kw: calls.append(data) or real(data, *a, **kw))
    monkeypatch.setattr(ginc_curves, "_REFERENCES", {})

    def data(seed: int, prompts: int, **extra) -> GincDataModule:
        return GincDataModule(world={"n_tasks": 2, "n_entities": 3, "n_properties": 4, "vocab_size": 8, "seed": seed},
                              context_length=32, icl={"k_values": [3], "prompts_per_task": prompts, "batch_size": 4},
                              **extra)

    first = ginc_curves.ideal_references(data(1, 4))
    again = ginc_curves.ideal_references(data(1, 4, train_documents=16))  # post-training data, same prompts
    assert again is first and len(calls) == 1
    assert ginc_curves.ideal_references(data(2, 4)) != first and len(calls) == 2
    assert ginc_curves.ideal_references(data(1, 8))["exact Bayesian"][0]["count"] == 8 and len(calls) == 3
