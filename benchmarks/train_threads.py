"""CPU threads for training a small model: torch's default against train.py's choice (`training_threads`).

In one run, the same Lightning training (CausalLMModule + GincDataModule, the small gradual world's
2-layer d=64 GPT-2, batch 16 x 256 tokens) is timed over --steps optimizer steps after --warmup, with
torch's default thread count and with train.py's, first on the machine as it is, then beside --busy
processes that each keep one core busy for the whole measurement (as other jobs on a shared machine do).
Prints tokens/s of each and `ratio_vs_default: X`, ours / default, the smaller over the two loads.

    python benchmarks/train_threads.py             # ~2 minutes on a 2-core CPU
    python benchmarks/train_threads.py --smoke     # seconds
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.train_throughput import LightningClock, Window  # noqa: E402
from datamodules.ginc_datamodule import GincDataModule  # noqa: E402
from datamodules.world import WorldConfig  # noqa: E402
from lightning_modules.lm_module import CausalLMModule, data_arguments  # noqa: E402
from models.gpt import training_threads  # noqa: E402

WORLD = WorldConfig(n_tasks=3, n_entities=5, n_properties=5, vocab_size=30, distinct_emissions=True,
                    property_temperature=0.01, property_smoothing=0.5)
# a busy core: pure Python, bounded in time, so it ends by itself if this process dies
BUSY = "import time, sys\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def tokens_per_s(threads: int, steps: int, warmup: int, context: int, batch: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    window = Window(warmup, steps, torch.device("cpu"))
    data = GincDataModule(world=WORLD, context_length=context, batch_size=batch, num_workers=0)
    module = CausalLMModule(size="gpt2-2l", n_embd=64, n_head=4, n_positions=context, compile=False,
                            **data_arguments(data))
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[LightningClock(window)],
                        max_steps=window.end + 1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return steps * batch * context / window.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--busy", type=int, default=2, help="busy processes beside the second measurement")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a 64-token context (CI)")
    args = parser.parse_args(argv)
    context, batch = (64, 4) if args.smoke else (256, 16)
    steps, warmup = (5, 2) if args.smoke else (args.steps, args.warmup)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    default, ours, before = torch.get_num_threads(), training_threads(), torch.get_num_threads()
    print(f"torch default: {default} threads; train.py: {ours}; {args.busy} busy processes in the second load")
    ratios = []
    try:
        for load in ("as is", f"{args.busy} busy"):
            busy = [] if load == "as is" else [
                subprocess.Popen([sys.executable, "-c", BUSY, "600"]) for _ in range(args.busy)]
            try:
                rate = {name: tokens_per_s(n, steps, warmup, context, batch)
                        for name, n in (("default", default), ("ours", ours))}
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
            ratios.append(rate["ours"] / rate["default"])
            print(f"{load:>8}: default {rate['default']:9,.0f} tokens/s   ours {rate['ours']:9,.0f} tokens/s   "
                  f"ratio {ratios[-1]:.2f}", flush=True)
    finally:
        torch.set_num_threads(before)
    print(f"ratio_vs_default: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
