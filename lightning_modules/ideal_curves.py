"""Curves of the ideal learners (`evaluate.py curves --ideal`) on a data config's ICL prompts: the exact
Bayesian learner, which knows the prompt format, and the document reader, which knows only documents."""
from __future__ import annotations

import argparse

from datamodules.config_io import load_datamodule_config
from lightning_modules.gpt import resolve_device
from lightning_modules.icl_eval import exact_curve_rows, reader_curve_rows


def ideal_curve_rows(args: argparse.Namespace) -> list[dict]:
    if args.data_config is None:
        raise ValueError("--ideal needs --data-config (a YAML with the GINC world and ICL settings, e.g. configs/data/ginc.yaml)")
    data = load_datamodule_config(args.data_config, k_values=args.k, prompts_per_task=args.prompts, icl_batch_size=args.batch_size)
    device = resolve_device(args.device)
    rows = []
    if args.learner in ("exact", "both"):
        rows += exact_curve_rows(data, args.run or "ideal", args.weights, device)
    if args.learner in ("reader", "both"):
        rows += reader_curve_rows(data, f"{args.run or 'ideal'}-reader", args.weights, device)
    return rows
