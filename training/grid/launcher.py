"""Where a grid's cells train, behind one interface: `LocalLauncher` (local.py: this process, or a pool of
worker processes) and `SlurmLauncher` (slurm.py: SLURM jobs through submitit).
"""
from __future__ import annotations

import abc
import contextlib
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from training.grid.cells import Cell, CellStatus
from training.grid.config import AblationConfig


class Launcher(abc.ABC):
    """The driver holds the grid's lock, enters `started`, then calls `train` once with the cells that are
    neither given nor DONE; the report may run its analyses in `workers()`."""

    @contextlib.contextmanager
    def started(self, cfg: AblationConfig, out: Path, stop_after: int | None) -> typing.Iterator[None]:
        """What the launcher needs while the grid runs (worker processes, say); nothing by default."""
        yield

    @abc.abstractmethod
    def train(self, cfg: AblationConfig, out: Path, cells: list[Cell], known: dict[str, CellStatus],
              stop_after: int | None) -> tuple[dict[str, CellStatus], bool]:
        """Train `cells` as a graph (a size's post-training cells once its pretraining has finished), at most
        `stop_after` of them; `known`: the statuses of the cells not to train (given, DONE). Returns the status
        of each cell it trained or failed, and whether the grid stopped before all were trained."""

    def workers(self) -> ProcessPoolExecutor | None:
        """Processes the report may run its analyses in; None: in this one."""
        return None
