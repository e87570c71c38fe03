"""Evaluate models and curves: ICL curves, law fits, post-training shift.

    python evaluate.py curves --ideal --data-config configs/data/ginc.yaml --out curves.csv
    python evaluate.py curves --ckpt runs/x/checkpoints/last.ckpt --out curves.csv
    python evaluate.py curves --hf-model DIR --dataset FILE.jsonl --out curves.csv
    python evaluate.py fit --curves curves.csv --out fits/
    python evaluate.py shift --curves curves.csv --baseline RUN --out shift/
    python evaluate.py ladder --data-config configs/data/ginc-gradual.yaml --out ground-truth/

Each sub-command lives with the code it drives; this file only wires them together, and turns
bad input into one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from analysis.cli import add_fit_command, add_shift_command
    from lightning_modules.curves_cli import add_curves_command
    from lightning_modules.ground_truth import add_ladder_command

    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_curves_command(sub)
    add_fit_command(sub)
    add_shift_command(sub)
    add_ladder_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
