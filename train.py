"""Train GPT-2 on the GINC world: pretraining, SFT that favours or disfavours tasks, and the quickstart.

    python train.py                                                   # the quickstart (a few CPU minutes)
    python train.py fit --config configs/pretrain.yaml --model configs/model/gpt2-12l.yaml --trainer.devices 8
    python train.py fit --config configs/sft-favor.yaml --model.init_from runs/NAME/checkpoints/last.ckpt
        --run.tasks [2]
    python train.py fit --config configs/dpo-favor.yaml --model.init_from runs/NAME/checkpoints/last.ckpt
        --run.tasks [2]
    python train.py fit --config configs/pretrain.yaml --run.name NAME --ckpt_path last      # resume NAME

The flags and --config files name a run's settings (a `TrainConfig`), which `training.run.train` runs;
every option of the model, data and trainer is a flag. The `run` group picks the stage (pretrain, sft, dpo; a
stage registry, so others can be added) and the run directory runs/NAME/ that holds config.yaml,
checkpoints/{best,last}.ckpt, TensorBoard logs, curves.csv and hf/.
Bad settings end in one `error:` line and exit status 2 before anything is written.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

from training.cli import print_config, read_command
from training.console import CtrlC, quiet_lightning
from training.quickstart import run_quickstart
from training.run import train
from user_errors import UserError
from user_errors.exit_status import INTERRUPTED, exit_status

# A Ctrl-C that lands while a lock is held (TensorBoard's event writer, logging) can leave interpreter
# shutdown waiting on it forever; the checkpoints are safe by then, so the process ends regardless.
EXIT_GRACE_S = 30.0


def exit_within(seconds: float, status: int) -> None:
    """End the process with `status` after `seconds` unless it has ended by itself (a daemon timer)."""
    timer = threading.Timer(seconds, os._exit, (status,))
    timer.daemon = True
    timer.start()


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_lightning()
    CtrlC.watch()
    status = exit_status(lambda: start(argv),
                         "resume with --run.name NAME --ckpt_path last (the run's checkpoints are kept)")
    if status == INTERRUPTED and from_command_line:  # not when a caller (a test) runs main() in its own process
        exit_within(EXIT_GRACE_S, INTERRUPTED)
    return status


def start(argv: list[str]) -> None:
    """The quickstart without arguments, else the run the flags ask for."""
    if argv and argv[0] in ("test", "predict"):
        raise UserError(f"train.py has no {argv[0]} split to run `{argv[0]}` on (the GINC stream has no held-out "
                        "set of that kind); use `python train.py validate --config CONFIG --ckpt_path CKPT` or "
                        "`python evaluate.py curves --ckpt CKPT`")
    if not argv:
        run_quickstart()
        return
    subcommand, config, show = read_command(argv)
    if show:
        print_config(config)
    else:
        train(config, subcommand)


if __name__ == "__main__":
    sys.exit(main())
