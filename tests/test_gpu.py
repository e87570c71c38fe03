"""On a CUDA device, a tiny run follows the same run on the CPU: same batches, same initial weights, and
curves that differ only by TF32 matmuls (train.py allows them on GPUs). Skipped where torch sees no CUDA."""
import csv

import pytest

import train
from tests.conftest import TINY_FIT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_a_tiny_run_on_cuda_follows_the_cpu_run(tmp_path):
    curves = {}
    for accelerator in ("cpu", "gpu"):
        root = tmp_path / accelerator
        assert train.main([*TINY_FIT, "--run.root", str(root), "--run.name", "t", "--trainer.accelerator",
                           accelerator, "--trainer.max_steps", "8"]) == 0
        with (root / "t" / "curves.csv").open() as f:
            curves[accelerator] = {(r["step"], r["k"], r["task"], r["shots"]): float(r["prob"])
                                   for r in csv.DictReader(f)}
    assert curves["gpu"].keys() == curves["cpu"].keys()
    worst = max(abs(curves["gpu"][key] - p) for key, p in curves["cpu"].items())
    assert worst < 0.02, worst
