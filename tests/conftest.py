"""What the tests share: the repository's paths, the tiny worlds, the tiny model, one tiny pretrained run
(trained once per test run, read-only), the true parameters of synthetic law curves, a snapshot of what
is on disk, and the markers.

Markers (registered in pyproject.toml): `slow` (over about a second: training end to end, benchmarks,
grids of processes; `pytest -m "not slow"` is the fast lane), `slurm` (needs a SLURM cluster), `gpu` (needs
CUDA; skipped here without it).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from evaluation.reports import one_thread

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
_TINY = yaml.safe_load(TINY_CONFIG.read_text())
# configs/tiny.yaml's world and model: 3 tasks, 4 entities, 4 properties, 20 tokens with distinct emissions;
# GPT-2 of one layer, d=32. A model learns the world in tens of steps.
TINY_WORLD: dict = _TINY["data"]["world"]
TINY_ARCH: dict = {name: _TINY["model"][name] for name in ("size", "n_embd", "n_head", "n_positions", "compile")}
# Full-support transitions (property smoothing): the ideal learners' curves rise over many shots.
SMOOTH_WORLD: dict = dict(n_tasks=3, n_entities=4, n_properties=5, vocab_size=12, property_smoothing=0.5, seed=1)
# A Bayesian law's parameters for curves whose truth is known (3 tasks).
TRUE_LAW: dict = {"priors": [0.5, 0.3, 0.2], "K": 0.8, "gamma": [0.9, 0.8, 0.85], "beta": [0.3, 0.2, 0.25]}
# `train.py fit` on configs/tiny.yaml: the start of every tiny run's command line
TINY_FIT = ["fit", "--config", str(TINY_CONFIG)]
TINY_RUN_STEPS = 60


def snapshot(*paths: Path) -> dict[str, str]:
    """Every entry under each path (hidden ones too, none for a path that does not exist): a link's target,
    a file's bytes' hash, or 'dir'. Equal before and after a command: it wrote nothing there."""
    def state(p: Path) -> str:
        if p.is_symlink():
            return "link -> " + os.readlink(p)
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"

    return {str(p): state(p) for path in paths for p in sorted([path, *path.rglob("*")])
            if p.is_symlink() or p.exists()}


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny models train faster on one torch thread than on two contended ones."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/tiny.yaml pretrained for 60 steps (validation and curves every 10): the run directory, with
    checkpoints/last.ckpt, hf/ and curves.csv. Shared by every test that reads it: do not write into it."""
    import train

    root = tmp_path_factory.mktemp("tiny-run")
    with one_thread():
        assert train.main([*TINY_FIT, "--run.root", str(root), "--run.name", "pre", "--trainer.max_steps",
                           str(TINY_RUN_STEPS), "--trainer.val_check_interval", "10"]) == 0
    return root / "pre"


@pytest.fixture
def tiny_run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run that a test may change."""
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / tiny_run.name))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device; this torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
