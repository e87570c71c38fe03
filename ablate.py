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
from pathlib import Path

from evaluation.arguments import COUNT, INDEX, OneLineParser
from training.grid import AblationConfig, run_grid
from training.grid.processes import die_with_parent
from user_errors import UserError

# Workers stopped on purpose (Ctrl-C, kill -9 of the driver) leave their semaphores to multiprocessing's
# resource tracker, which removes them and warns about them after the driver's last line; it takes the
# warning filters of this interpreter's flags when it starts, so it is told here that this is expected.
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"

if __name__ == "__mp_main__":
    # a process the driver spawned (a --parallel worker, a shift fit's worker) imports this script first:
    # it dies with the driver, kill -9 included, and leaves Ctrl-C to the driver
    die_with_parent()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="ablate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="ablation YAML (configs/ablations/*.yaml)")
    parser.add_argument("--stop-after", type=INDEX, help="stop after training this many cells (rerun to finish)")
    parser.add_argument("--parallel", type=COUNT, default=1,
                        help="cells trained at once, each in a process of its own (on a GPU of its own when there are "
                             "enough); no more than the cells left to train and the CPUs here")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="where cells train: here (--parallel at a time) or as SLURM jobs (the YAML's slurm: section)")
    parser.add_argument("--no-wait", action="store_true",
                        help="--launcher slurm: submit the jobs, print their ids and exit; a rerun collects them")
    args = parser.parse_args(argv)
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
    if args.no_wait and args.launcher != "slurm":
        parser.error("--no-wait needs --launcher slurm (a local grid cannot outlive this process)")
    if args.parallel > 1 and args.launcher == "slurm":
        parser.error("--parallel is for --launcher local; under SLURM every cell is a job of its own (set what each asks "
                     "for in the grid's slurm: section)")
    try:
        failed = run_grid(AblationConfig.load(args.config), args.stop_after, args.parallel, args.launcher, not args.no_wait)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        # Lightning answers Ctrl-C in a cell trained in this process by tearing down and calling sys.exit(1)
        if isinstance(exc, SystemExit) and not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        print("error: interrupted; rerun the same command to resume (finished cells are kept, a cell resumes "
              "from its last checkpoint)", file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
