"""Evaluate models and curves: ICL curves, law fits, post-training shift.

    python evaluate.py curves --ideal --data-config configs/data/ginc.yaml --out curves.csv
    python evaluate.py curves --ckpt runs/x/checkpoints/last.ckpt --out curves.csv
    python evaluate.py curves --hf-model DIR --dataset FILE.jsonl --out curves.csv
    python evaluate.py fit --curves curves.csv --out fits/
    python evaluate.py shift --curves curves.csv --baseline RUN --out shift/
    python evaluate.py ladder --data-config configs/data/ginc-gradual.yaml --out ground-truth/

The sub-commands are parsed in evaluation/cli.py, which calls the evaluation package's functions;
this file turns bad input into one `error:` line and exit status 2, and Ctrl-C into one line and 130.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from evaluation.cli import build_parser
from user_errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written (outputs are swapped in whole when complete)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
