"""Curves of the exact Bayesian learner (`evaluate.py curves --ideal`) on the data config's ICL prompts."""
from __future__ import annotations

import argparse
import sys

import torch

from datamodules.config_io import load_datamodule_config
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import ICLPromptSet
from datamodules.world import GincWorld
from lightning_modules.curves_table import curve_rows


def ideal_curve_rows(args: argparse.Namespace) -> list[dict]:
    if args.data_config is None:
        raise ValueError("--ideal needs --data-config (a YAML with the GINC world and ICL settings, e.g. configs/data/ginc.yaml)")
    dm = load_datamodule_config(args.data_config, k_values=args.k, prompts_per_task=args.prompts, icl_batch_size=args.batch_size)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    learner = ExactLearner(GincWorld.build(dm.world).to(device), args.weights)
    prompts = ICLPromptSet(dm.world, dm.icl, dm.context_length)
    sums: dict[tuple[int, int], list[torch.Tensor]] = {}
    for i, item in enumerate(prompts):
        pred = learner.predict_demos(*_demos(item, device))
        prob = pred.prob.clamp_min(torch.finfo(torch.float64).tiny)
        acc = sums.setdefault((item["k"], item["task"]), [0, 0, 0, 0])
        for j, value in enumerate((prob.sum(0), -prob.log().sum(0), pred.correct.double().sum(0), torch.full_like(prob[0], prob.shape[0]))):
            acc[j] = acc[j] + value.cpu()
        print(f"\rexact learner: batch {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    run = args.run or "ideal"
    return [row for (k, task), s in sorted(sums.items()) for row in curve_rows(run, k, task, *s)]


def _demos(item: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x [b, n, k-1] and labels y [b, n] of a batch of ICL prompts, from its label positions."""
    tokens, pos, k = item["input_ids"].to(device), item["label_pos"].to(device), item["k"]
    offsets = torch.arange(-(k - 1), 0, device=device)
    x = tokens.gather(1, (pos[..., None] + offsets).flatten(1)).view(*pos.shape, k - 1)
    return x, item["labels"].to(device)
