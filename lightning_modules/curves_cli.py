"""`evaluate.py curves`: ICL curves of checkpoints, of HF model directories, or of the exact Bayesian learner."""
from __future__ import annotations

import argparse
from pathlib import Path

from lightning_modules.curves_table import write_curves


def add_curves_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("curves", help="measure ICL curves and write the curves table",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", type=Path, help="Lightning checkpoints or HF export dirs of our GPT-2 runs")
    src.add_argument("--ideal", action="store_true", help="the exact Bayesian learner of the GINC world")
    src.add_argument("--hf-model", type=Path, help="a local Hugging Face causal-LM directory (with --dataset)")
    p.add_argument("--out", type=Path, required=True, help="curves CSV to write")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it (refused for a run "
                   "already in the table, unless --replace)")
    p.add_argument("--replace", action="store_true", help="with --append: replace the rows of runs already in the table")
    p.add_argument("--run", help="run label (default: derived from the source)")
    # GINC sources (--ckpt, --ideal)
    p.add_argument("--data-config", type=Path, help="YAML with the GINC world and ICL settings (default: the checkpoint's own)")
    p.add_argument("--k", type=int, nargs="+", help="GINC: example lengths (default: the data config's); --hf-model: answer tokens scored")
    p.add_argument("--prompts", type=int, help="GINC: prompts per (k, task) (default: the data config's); --hf-model: shuffles per answer type (default 5)")
    p.add_argument("--weights", type=float, nargs="+", help="--ideal: mixture weights of the learner's prior (default: the world's)")
    p.add_argument("--learner", choices=("exact", "reader", "both"), default="exact",
                   help="--ideal: the exact learner (knows the prompt format; run RUN), the document reader (the "
                        "Bayes-optimal documents-only model; run RUN-reader), or both")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (for long LLM prompts, 1-4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    # real LLM source (--hf-model)
    p.add_argument("--dataset", type=Path, help="--hf-model: JSONL rows {question, answer, answer_type}")
    p.add_argument("--shots", type=int, help="--hf-model: demonstrations per prompt (default: all rows of the type that fit)")
    p.add_argument("--max-length", type=int, help="--hf-model: prompt tokens (default: the model's context length)")
    p.add_argument("--format", choices=("auto", "chat", "plain"), default="auto",
                   help="--hf-model: chat template or plain User:/Assistant: turns (auto: chat when the tokenizer has a template)")
    p.add_argument("--seed", type=int, default=0, help="--hf-model: seed of the shuffles")
    p.set_defaults(func=run_curves)


def run_curves(args: argparse.Namespace) -> None:
    if args.ideal:
        from lightning_modules.ideal_curves import ideal_curve_rows

        rows = ideal_curve_rows(args)
    elif args.ckpt:
        from lightning_modules.icl_eval import checkpoint_curve_rows

        rows = checkpoint_curve_rows(args)
    else:
        from lightning_modules.llm_curves import hf_curve_rows

        rows = hf_curve_rows(args)
    path = write_curves(rows, args.out, append=args.append, replace=args.replace)
    print(f"wrote {len(rows)} rows to {path}")
