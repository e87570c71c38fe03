"""The quickstart (`python train.py` with no arguments): a small pretraining with demonstrations in its
data, SFT at several amounts, and each model's ICL curve beside both ideal learners."""
from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluation.quickstart_report import analyse_quickstart
from models.gpt import resolve_device
from training.config import TrainConfig, layered
from training.run import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORLD = [CONFIGS / f"{name}.yaml" for name in ("small-gradual", "small-demos", "quickstart")]
# the quickstart's post-training: (direction, documents), each document seen once in batches of 16
QUICKSTART_SFT = (("favor", 128), ("favor", 512), ("favor", 2048), ("disfavor", 512))


def run_quickstart(root: str = "runs", overrides: Mapping[str, Any] | None = None) -> None:
    """Pretrain a small GPT-2 on the small gradual world with demonstrations in its data, SFT it to favour
    task 0 at three amounts and to disfavour it at one, and print each model's ICL curve beside both ideal
    learners, task 0's fitted prior along the way, and when the suppressed tasks re-emerge
    (configs/small-gradual.yaml, configs/small-demos.yaml, configs/quickstart*.yaml). `overrides`: settings
    laid over every run's (the tests shorten it so)."""
    began = time.perf_counter()
    on_gpu = resolve_device("auto") == "cuda"
    common = layered({"run": {"root": root},
                      **({"trainer": {"accelerator": "gpu", "precision": "bf16-mixed"}} if on_gpu else {})},
                     overrides or {})
    name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    pre = train(TrainConfig.from_files(*WORLD, overrides=layered({"run": {"name": f"{name}/pretrain"}}, common)))
    posts = {}
    for direction, amount in QUICKSTART_SFT:
        steps = amount // 16
        label = f"after SFT-{direction.replace('favor', 'favour')} {amount}"
        cell = {"run": {"direction": direction, "name": f"{name}/sft-{direction}-{amount}"},
                "model": {"init_from": str(pre.last_checkpoint)}, "data": {"train_documents": amount},
                "trainer": {"max_steps": steps, "val_check_interval": steps}}
        posts[label] = train(TrainConfig.from_files(*WORLD, CONFIGS / "quickstart-sft.yaml",
                                                    overrides=layered(cell, common)))
    loss = {key: pre.metrics[key] for key in ("val/loss", "val/excess_loss")}
    favoured = next(iter(posts.values())).config.run.tasks
    out = pre.run_dir.parent
    print(analyse_quickstart({"pretrained": pre.run_dir, **{label: run.run_dir for label, run in posts.items()}},
                             pre.datamodule, favoured, min(pre.datamodule.icl.k_values), loss, out / "analysis"))
    print(f"\nquickstart took {time.perf_counter() - began:.0f} s on {'GPU' if on_gpu else 'CPU'}; runs and analysis "
          f"(curves.csv, shift/, reader_prior.csv) in {out} (tensorboard --logdir {root})")
