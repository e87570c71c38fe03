"""The grid's driver: under the grid's lock, train every cell not finished through a launcher, then
measure and report (report.py).
"""
from __future__ import annotations

from pathlib import Path

from training.grid.cells import GIVEN, SKIPPED, CellStatus, cells_of
from training.grid.checks import check_finished
from training.grid.config import AblationConfig
from training.grid.launcher import Launcher
from training.grid.local import LocalLauncher
from training.grid.processes import grid_lock
from training.grid.report import report_grid
from training.grid.slurm import SlurmLauncher


def run_grid(cfg: AblationConfig, stop_after: int | None = None, parallel: int = 1, launcher: str = "local",
             wait: bool = True) -> int:
    """Run (or resume) the grid, `parallel` cells at a time here, or as SLURM jobs that this process waits
    for unless `wait` is false; write curves.csv, fits/, shift/ and report.md. Returns the number of failed
    cells."""
    out = Path(cfg.root) / cfg.name
    where = SlurmLauncher(wait) if launcher == "slurm" else LocalLauncher(parallel)
    with grid_lock(out):  # one driver per grid; SLURM jobs train their cells without it
        check_finished(cfg, out)  # again under the lock: another driver may have trained since the grid was loaded
        with where.started(cfg, out, stop_after):
            status, stopped = train_cells(cfg, out, where, stop_after)
            if stopped:
                return sum(s.failed for s in status.values())
            return report_grid(cfg, out, status, where.workers())


def train_cells(cfg: AblationConfig, out: Path, launcher: Launcher,
                stop_after: int | None) -> tuple[dict[str, CellStatus], bool]:
    """Train every cell neither given nor DONE through `launcher`. Returns each cell's status in the grid's
    order and whether the grid stopped early (--stop-after, --no-wait)."""
    known = {f"{size}/pretrain": GIVEN for size in cfg.pretrained}
    known |= {cell.name: SKIPPED for cell in cells_of(cfg) if (out / cell.name / "DONE").is_file()}
    trained, stopped = launcher.train(cfg, out, [c for c in cells_of(cfg) if c.name not in known], known, stop_after)
    status = known | trained
    order = [name for size in cfg.sizes
             for name in (f"{size}/pretrain", *(c.name for c in cells_of(cfg) if c.size == size))]
    return {name: status[name] for name in order if name in status}, stopped
