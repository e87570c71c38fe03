"""A grid's cells trained on this machine: one after the other in this process, or `--parallel N` at a
time in spawned worker processes (each on a GPU of its own when there are that many), which die with the
driver (processes.py) and then run the report's analyses.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import typing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from training.grid.cells import Cell, CellStatus, State, cells_of, outcome, pretrained_of, run_cell
from training.grid.config import AblationConfig
from training.grid.launcher import Launcher
from training.grid.processes import children_die_with_me, die_with_parent, stop_processes
from training.grid.slurm import queued_cells
from user_errors import UserError

POOL_ANALYSES = 2  # report_grid runs the law fits and the reader tables in the pool


class LocalLauncher(Launcher):
    """`parallel` cells at a time: 1 in this process, more in a pool of worker processes."""

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = parallel
        self._pool: ProcessPoolExecutor | None = None

    @contextlib.contextmanager
    def started(self, cfg: AblationConfig, out: Path, stop_after: int | None) -> typing.Iterator[None]:
        """Refuse a grid whose cells SLURM jobs still train, tie what this process forks to it, and start
        the workers, no more than can be used (worker_count)."""
        queued = queued_cells(out)
        if queued:
            name, job = next(iter(queued.items()))
            raise UserError(f"{out}: " + (f"cell {name} is a SLURM job" if len(queued) == 1 else
                                           f"cells {name} and {len(queued) - 1} more are SLURM jobs")
                            + f" still queued or running (job {job}); wait for them with `--launcher slurm`, "
                              "or scancel them, then rerun")
        children_die_with_me()  # a DataLoader's workers forked here die with this process
        self.parallel = worker_count(cfg, out, stop_after, self.parallel)
        with worker_pool(self.parallel) as self._pool:
            yield

    def train(self, cfg: AblationConfig, out: Path, cells: list[Cell], known: dict[str, CellStatus],
              stop_after: int | None) -> tuple[dict[str, CellStatus], bool]:
        """Without a pool each cell in this process, in order; with one, `parallel` at once."""
        status, queue, running, trained = dict(known), list(cells), {}, 0
        stopped = False
        while queue or running:
            for job in [j for j in running if j.done()]:
                status[running.pop(job).name] = outcome(job)
            for cell in list(queue):
                if len(running) >= self.parallel or (stop_after is not None and trained >= stop_after):
                    break
                if cell.method != "pretrain" and f"{cell.size}/pretrain" not in status:
                    continue  # its pretraining has not finished yet
                queue.remove(cell)
                pretrained = pretrained_of(cfg, out, cell.size)
                if cell.method != "pretrain" and not pretrained.exists():
                    status[cell.name] = CellStatus.failure(f"no pretrained model at {pretrained}")
                elif self._pool is None:
                    status[cell.name] = run_cell(cfg, cell, out, pretrained)
                    trained += status[cell.name].state is State.DONE
                else:
                    try:
                        running[self._pool.submit(run_cell, cfg, cell, out, pretrained)] = cell
                    except BrokenProcessPool:  # a worker was killed (out of memory, say): its cells failed above
                        status[cell.name] = CellStatus.failure("not started, a worker process died (see the other "
                                                               "failed cells); rerun to train it")
                        continue
                    trained += 1
            if stop_after is not None and trained >= stop_after and queue and not running:
                print(f"[ablate] stopped after {trained} trained cells (--stop-after); rerun to finish", flush=True)
                stopped = True
                break
            if running:
                time.sleep(0.5)
        return {name: s for name, s in status.items() if name not in known}, stopped

    def workers(self) -> ProcessPoolExecutor | None:
        """The pool, unless a worker died (the analyses then run here)."""
        return None if self._pool is None or getattr(self._pool, "_broken", False) else self._pool


def worker_count(cfg: AblationConfig, out: Path, stop_after: int | None, parallel: int) -> int:
    """--parallel as far as it can be used: no more workers than cells left to train (but the analyses
    the pool runs), and no more than the CPUs this process may use. Says so when it takes fewer."""
    if parallel <= 1:
        return parallel
    left = sum(not (out / cell.name / "DONE").is_file() for cell in cells_of(cfg))
    if stop_after is not None:
        left = min(left, stop_after)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(parallel, max(left, POOL_ANALYSES), cpus)
    if workers < parallel:
        print(f"[ablate] --parallel {parallel}: {workers} worker processes ({left} cell{'' if left == 1 else 's'} left "
              f"to train, {cpus} CPU{'' if cpus == 1 else 's'} here)", flush=True)
    return workers


def _cell_worker(gpus: object, driver: int, start_method: str) -> None:
    """A worker process of `--parallel`: tied to its driver first (it dies with it, kill -9 included, and so
    does what it forks), it takes one GPU id from the queue (None: no pinning) before torch starts, and
    trains cell after cell, so imports and reference curves are paid once per worker. Its processes (a
    DataLoader's workers) start as the driver's would (fork on Linux), not as it was started itself
    (spawn): a cell trains as in one process, and what it forks is tied to it."""
    die_with_parent(driver)
    multiprocessing.set_start_method(start_method, force=True)
    gpu = gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


@contextlib.contextmanager
def worker_pool(parallel: int) -> typing.Iterator[ProcessPoolExecutor | None]:
    """`parallel` spawn worker processes, each on a GPU of its own when there are that many; None for 1.
    The workers die with this process (processes.py); when it leaves the pool early (an error, Ctrl-C)
    they are killed at once, running cells included, which a rerun resumes from their last checkpoint.
    `parallel` must be sane already (worker_count)."""
    if parallel <= 1:
        yield None
        return
    import torch

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    gpus = context.SimpleQueue()  # written at once, no feeder thread for the exit to wait on
    pin = torch.cuda.is_available() and torch.cuda.device_count() >= parallel
    for slot in range(parallel):
        gpus.put(slot if pin else None)
    start_method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    pool = ProcessPoolExecutor(parallel, mp_context=context, initializer=_cell_worker,
                               initargs=(gpus, os.getpid(), start_method))
    try:
        yield pool
    except BaseException:
        stop_processes(list((getattr(pool, "_processes", None) or {}).values()))
        raise
    finally:
        pool.shutdown(cancel_futures=True)
        gpus.close()
