"""Evaluate models and curves: ICL curves, law fits, post-training shift.

    python evaluate.py curves --ideal --data-config configs/data/ginc.yaml --out curves.csv
    python evaluate.py curves --ckpt runs/x/checkpoints/last.ckpt --out curves.csv
    python evaluate.py curves --hf-model DIR --dataset FILE.jsonl --out curves.csv
    python evaluate.py fit --curves curves.csv --out fits/
    python evaluate.py shift --curves curves.csv --baseline RUN --out shift/
    python evaluate.py ladder --data-config configs/data/ginc-gradual.yaml --out ground-truth/

Each sub-command is a typed function in evaluation/cli.py, its options read off its signature and its
config dataclasses (evaluation/arguments.py); user_errors/exit_status.py turns bad input into one
`error:` line and exit status 2, and Ctrl-C into one line and 130.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from evaluation.arguments import run_commands
from evaluation.cli import COMMANDS
from user_errors.exit_status import exit_status


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: run_commands(COMMANDS, argv, "evaluate.py"),
                       "nothing was written (outputs are swapped in whole when complete)")


if __name__ == "__main__":
    sys.exit(main())
