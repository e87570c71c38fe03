"""Post-training ablations: a grid of model sizes x methods x directions x amounts, from one YAML.

    python ablate.py --config configs/ablations/tiny.yaml          # CPU, a few minutes
    python ablate.py --config configs/ablations/paper.yaml         # the paper-scale grid (GPUs)

For each size the runner pretrains once (or reuses a given checkpoint), post-trains every
(method, direction, amount) cell from that checkpoint with train.py's own stages, measures every cell's
final ICL curves on the same prompts, and writes one combined curves table, the law fits
(`evaluate.py fit`) and the shift report (`evaluate.py shift`, baseline = each size's pretrained model).
Amount 0 of every method is the pretrained model itself.

It is resumable: a finished cell leaves `DONE` in its directory and is skipped on the next call; a cell
that was interrupted after a checkpoint resumes from it. A failed cell is reported in report.md and in
the exit status, and the other cells still run.

One process drives a grid at a time (a lock in the grid's directory; a second is refused, naming the
first), and every process it starts dies with it, kill -9 included (training/grid/processes.py).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from evaluation.arguments import run_command
from training.grid import AblationConfig, run_grid
from training.grid.processes import die_with_parent
from user_errors import UserError
from user_errors.exit_status import exit_status

# Workers stopped on purpose (Ctrl-C, kill -9 of the driver) leave their semaphores to multiprocessing's
# resource tracker, which removes them and warns about them after the driver's last line; it takes the
# warning filters of this interpreter's flags when it starts, so it is told here that this is expected.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"

if __name__ == "__mp_main__":
    # a process the driver spawned (a --parallel worker, a shift fit's worker) imports this script first:
    # it dies with the driver, kill -9 included, and leaves Ctrl-C to the driver
    die_with_parent()


def ablate(config: Path, stop_after: int | None = None, parallel: int = 1,
           launcher: Literal["local", "slurm"] = "local", no_wait: bool = False) -> int:
    """Post-training ablations: a grid of model sizes x methods x directions x amounts, from one YAML.

    Args:
        config: ablation YAML (configs/ablations/*.yaml)
        stop_after: stop after training this many cells (rerun to finish)
        parallel: cells trained at once, each in a process of its own (on a GPU of its own when there are
            enough); no more than the cells left to train and the CPUs here
        launcher: where cells train: here (--parallel at a time) or as SLURM jobs (the YAML's slurm: section)
        no_wait: --launcher slurm: submit the jobs, print their ids and exit; a rerun collects them
    """
    if no_wait and launcher != "slurm":
        raise UserError("--no-wait needs --launcher slurm (a local grid cannot outlive this process)")
    if parallel > 1 and launcher == "slurm":
        raise UserError("--parallel is for --launcher local; under SLURM every cell is a job of its own (set what "
                        "each asks for in the grid's slurm: section)")
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
    failed = run_grid(AblationConfig.load(config), stop_after, parallel, launcher, not no_wait)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status(lambda: run_command(ablate, argv, "ablate.py"),
                       "rerun the same command to resume (finished cells are kept, a cell resumes from its last "
                       "checkpoint)")


if __name__ == "__main__":
    sys.exit(main())
