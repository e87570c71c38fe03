"""A run killed after a checkpoint and resumed with --ckpt_path last ends exactly like an uninterrupted one."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

import train


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    """Stands in for a killed job: raises at a step (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contended ones
    yield
    torch.set_num_threads(threads)


def fit(root, name: str, *extra: str) -> int:
    return train.main(["fit", "--config", "configs/tiny.yaml", "--run.root", str(root), "--run.name", name,
                       "--trainer.max_steps", "10", "--run.checkpoint_every", "3", "--trainer.val_check_interval", "5", *extra])


def final_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def curves_at(run, step: str) -> list[dict]:
    with (run / "curves.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["step"] == step]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    assert fit(tmp_path, "whole") == 0
    with pytest.raises(Killed):
        fit(tmp_path, "killed", "--trainer.callbacks+=tests.test_train_resume.KillAt", "--trainer.callbacks.step=7")
    killed = tmp_path / "killed"
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6  # the last save before the kill
    assert fit(tmp_path, "killed", "--ckpt_path", "last") == 0

    whole, resumed = final_state(tmp_path / "whole"), final_state(killed)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert curves_at(tmp_path / "whole", "10") == curves_at(killed, "10") != []
    # best.ckpt: the same weights, from the same validation, with or without the interruption
    best_whole = torch.load(tmp_path / "whole" / "checkpoints" / "best.ckpt", weights_only=False)
    best_killed = torch.load(killed / "checkpoints" / "best.ckpt", weights_only=False)
    assert best_whole["global_step"] == best_killed["global_step"] and best_whole["global_step"] % 5 == 0
    for key in best_whole["state_dict"]:
        assert torch.equal(best_whole["state_dict"][key], best_killed["state_dict"][key]), key
