"""A run killed after a checkpoint and resumed with --ckpt_path last ends exactly like an uninterrupted one."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

import train
from tests.conftest import TINY_FIT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]  # killed and resumed training runs


class Killed(RuntimeError):
    pass


class KillAt(L.Callback):
    """Stands in for a killed job: raises at a step (before that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def fit(root, name: str, *extra: str) -> int:
    return train.main([*TINY_FIT, "--run.root", str(root), "--run.name", name,
                       "--trainer.max_steps", "10", "--run.checkpoint_every", "3", "--trainer.val_check_interval", "5",
                       *extra])


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
    # the last save before the kill
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
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


def test_tensorboard_steps_match_curves_and_a_resume_does_not_repeat_them(tmp_path):
    """Evaluation scalars carry the step of their curves and images (not one less), and a run resumed
    from a checkpoint older than its last log drops what it logged after that checkpoint."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "runs"
    base = [*TINY_FIT, "--run.root", str(root), "--run.name", "t",
            "--trainer.val_check_interval", "10"]
    assert train.main([*base, "--trainer.max_steps", "20"]) == 0
    shutil.copy(root / "t" / "checkpoints" / "last.ckpt", tmp_path / "step20.ckpt")
    assert train.main([*base, "--trainer.max_steps", "30", "--ckpt_path", "last"]) == 0
    shutil.copy(tmp_path / "step20.ckpt", root / "t" / "checkpoints" / "last.ckpt")  # killed at 30, last saved at 20
    assert train.main([*base, "--trainer.max_steps", "30", "--ckpt_path", "last"]) == 0
    events = EventAccumulator(str(root / "t"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    with (root / "t" / "curves.csv").open() as f:
        curve_steps = sorted({int(r["step"]) for r in csv.DictReader(f)})
    assert [e.step for e in events.Scalars("val/loss")] == curve_steps == [0, 10, 20, 30]
    # hp_metric: one point per evaluation, no -1 placeholders, and still declared for the HParams view
    assert ([e.step for e in events.Scalars("hp_metric")] == curve_steps
            and min(e.value for e in events.Scalars("hp_metric")) > 0)
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    image = events.Tags()["images"][0]
    assert sorted({e.step for e in events.Images(image)}) == curve_steps
