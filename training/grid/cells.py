"""The cells of an ablation grid: what each is, the TrainConfig it trains with, the records that say
what it was asked (ASKED when it starts, DONE when it ends), which finished cells are stale, training one
cell, and what became of it (CellStatus).

A cell takes the grid's settings (config.AblationConfig) as its input; loading those settings checks the
cells, so this module sits below config.py and names the settings' type for type checkers only.
"""
from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
import shutil
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

from safe_io.files import inside
from training.config import TrainConfig
from user_errors import UserError

if typing.TYPE_CHECKING:
    from training.grid.config import AblationConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DONE_ARGS = "asked: "  # DONE's line with the record of what the cell was asked (cell_record), as JSON
ASKED = "ASKED"  # the same record, written when a cell starts: it marks the directory as ablate.py's


@dataclass
class Cell:
    size: str
    method: str  # "pretrain" for the pretraining run
    direction: str = ""
    amount: int = 0

    @property
    def name(self) -> str:
        return (f"{self.size}/pretrain" if self.method == "pretrain"
                else f"{self.size}/{self.method}-{self.direction}-{self.amount}")


class State(enum.Enum):
    GIVEN = "given"  # a pretrained model the grid names, not trained here
    SKIPPED = "skipped"  # DONE before this run
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class CellStatus:
    """What became of a cell; it reads as report.md's status column: given, skipped, done, failed: <reason>."""

    state: State
    reason: str = ""  # why it failed, one line

    @classmethod
    def failure(cls, reason: str) -> CellStatus:
        return cls(State.FAILED, (reason.splitlines() or [""])[0])

    @property
    def failed(self) -> bool:
        return self.state is State.FAILED

    @property
    def finished(self) -> bool:
        """Whether the cell holds a trained model to measure."""
        return self.state in (State.DONE, State.SKIPPED)

    def __str__(self) -> str:
        return f"failed: {self.reason}" if self.failed else self.state.value


GIVEN, SKIPPED, DONE = CellStatus(State.GIVEN), CellStatus(State.SKIPPED), CellStatus(State.DONE)


def pretrained_of(cfg: AblationConfig, out: Path, size: str) -> Path:
    """The model a size's cells post-train: the given checkpoint, or the grid's own pretraining export."""
    return Path(cfg.pretrained[size]) if size in cfg.pretrained else out / size / "pretrain" / "hf"


def cells_of(cfg: AblationConfig) -> list[Cell]:
    """Every cell to train, in order: each size's pretraining (unless given), then its post-training cells."""
    return [cell for size in cfg.sizes
            for cell in ([] if size in cfg.pretrained else [Cell(size, "pretrain")])
            + [Cell(size, m, d, a) for m in cfg.methods for d in cfg.directions for a in cfg.amounts if a > 0]]


def cell_steps(cfg: AblationConfig, cell: Cell) -> int:
    """A cell's training steps: pretrain_steps, or its amount seen `epochs` times in batches of batch_size."""
    return (cfg.pretrain_steps if cell.method == "pretrain"
            else max(1, math.ceil(cell.amount * cfg.epochs / cfg.batch_size)))


def cell_args(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> list[str]:
    """train.py flags of one cell: the stage's config, then the grid's base configs, then the cell's settings.
    The one place a cell's flags are built."""
    base = [a for c in cfg.base_configs for a in ("--config", c)]
    steps = cell_steps(cfg, cell)
    if cell.method == "pretrain":
        args = ["--config", str(CONFIGS / "pretrain.yaml"), *base, "--run.stage", "pretrain", "--model.size", cell.size]
        extra = cfg.pretrain_overrides
    else:
        args = ["--config", str(CONFIGS / f"{cell.method}-{cell.direction}.yaml"), *base, "--run.stage", cell.method,
                "--run.direction", cell.direction, "--run.tasks", str(list(cfg.tasks)),
                "--model.init_from", str(pretrained), "--data.train_documents", str(cell.amount),
                "--data.batch_size", str(cfg.batch_size)]
        extra = [*cfg.posttrain_overrides, *cfg.method_overrides.get(cell.method, [])]
    interval = max(1, steps // cfg.evals_per_cell)
    return ["fit", *args, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(interval),
            "--run.root", str(out), "--run.name", cell.name, "--run.eval_at_start", "false", *cfg.overrides, *extra]


# ---- the records of what a cell was asked ----

def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asked_of(cfg: AblationConfig, cell: Cell, out: Path) -> dict[str, object]:
    """What the grid asks of a cell: its TrainConfig (its train.py flags read as train.py reads them, as
    JSON), and the content (sha256) of every file it names (the stage's config, the base configs, a config
    given in the overrides), so that a config edited in place asks something else. The model it starts
    from is cell_record's."""
    from training.cli import config_of  # the parser's classes load torch and lightning

    flags = cell_args(cfg, cell, out, pretrained_of(cfg, out, cell.size))
    config = config_of(flags[1:])  # flags[0] is the subcommand, fit
    named = set(config.configs) | {value for value in flags if value.endswith((".yaml", ".yml", ".json"))}
    files = {value: _file_hash(Path(value)) for value in sorted(named) if Path(value).is_file()}
    return {"config": json.loads(config.to_json()), "files": files}


def asked_of_cells(cfg: AblationConfig, out: Path) -> dict[str, dict[str, object]]:
    """What the grid asks of each cell now (asked_of), by cell name: what DONE and jobs.json must match."""
    return {cell.name: asked_of(cfg, cell, out) for cell in cells_of(cfg)}


_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(model: Path) -> str | None:
    """sha256 of a model's files (a checkpoint, or every file of an HF export), None where there is none;
    kept per process for files whose size and modification time have not changed."""
    files = sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else [model] if model.is_file() else []
    if not files:
        return None
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.relative_to(model) if model.is_dir() else f.name}\0{_file_hash(f)}\0".encode())
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def cell_record(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> dict[str, object]:
    """What a cell is asked (asked_of) and the model it starts from (its fingerprint): written to ASKED when
    it starts and to DONE when it finishes; a finished or interrupted cell is reused only under the same."""
    starts_from = model_fingerprint(pretrained) if cell.method != "pretrain" and pretrained is not None else None
    return {**asked_of(cfg, cell, out), "pretrained": starts_from}


def recorded(cell_dir: Path) -> object:
    """The record of a cell directory: DONE's (finished), else ASKED's (started); None where there is none."""
    done, asked = cell_dir / "DONE", cell_dir / ASKED
    try:
        if done.is_file():
            lines = [line[len(DONE_ARGS):] for line in done.read_text().splitlines() if line.startswith(DONE_ARGS)]
            return json.loads(lines[0]) if lines else None
        return json.loads(asked.read_text()) if asked.is_file() else None
    except (ValueError, OSError):  # cut short or not ours: no record, so not reused
        return None


def has_work(cell_dir: Path) -> bool:
    """Whether a cell directory holds training to reuse: a finished cell, or a checkpoint to resume."""
    return (cell_dir / "DONE").is_file() or (cell_dir / "checkpoints" / "last.ckpt").is_file()


def stale_cells(cfg: AblationConfig, out: Path) -> list[str]:
    """Finished or interrupted cells whose record differs from what the grid asks of them now (another
    world, config content, tasks, steps or overrides), and the cells trained from a pretraining that is
    stale, gone or another model now: reusing them would report what was not asked for."""
    stale, asked = [], asked_of_cells(cfg, out)
    for size in cfg.sizes:
        pre = Cell(size, "pretrain")
        pre_stale = size not in cfg.pretrained and has_work(out / pre.name) and \
            recorded(out / pre.name) != {**asked[pre.name], "pretrained": None}
        stale += [pre.name] if pre_stale else []
        usable = size in cfg.pretrained or (not pre_stale and (out / pre.name / "DONE").is_file())
        starts_from = None
        for cell in cells_of(cfg):
            if cell.size != size or cell.method == "pretrain" or not has_work(out / cell.name):
                continue
            if usable and starts_from is None:
                starts_from = model_fingerprint(pretrained_of(cfg, out, size))
            if not usable or recorded(out / cell.name) != {**asked[cell.name], "pretrained": starts_from}:
                stale.append(cell.name)
    return stale


# ---- training a cell ----

def run_cell(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> CellStatus:
    """Train one cell in this process unless it is done; returns done, skipped or failed with the reason."""
    # heavy imports (torch, lightning) only when there is training to do
    from training.console import quiet_lightning
    from training.run import train

    cell_dir = inside(out, cell.name, "cell", "the grid's directory")
    if (cell_dir / "DONE").is_file():
        return SKIPPED
    record = cell_record(cfg, cell, out, pretrained)  # what DONE records: a resumed cell asks the same as a fresh one
    config = TrainConfig.from_settings(record["config"])
    args = cell_args(cfg, cell, out, pretrained)  # how to train the cell by hand, for the log
    if cell_dir.exists() and not (cell_dir / ASKED).is_file():  # not made by ablate.py: never deleted or resumed
        return CellStatus.failure(f"{cell_dir} holds no record of ablate.py's ({ASKED}); move it away and rerun")
    if (cell_dir / "checkpoints" / "last.ckpt").is_file() and recorded(cell_dir) == record:
        # interrupted after a checkpoint: continue from it
        config.ckpt_path, args = "last", [*args, "--ckpt_path", "last"]
    elif cell_dir.exists():
        shutil.rmtree(cell_dir)  # ours, interrupted before its first checkpoint or asked something else: start again
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / ASKED).write_text(json.dumps(record) + "\n")
    print(f"[ablate] {cell.name}: python train.py {' '.join(args)}", flush=True)
    began = time.perf_counter()
    quiet_lightning()
    with (cell_dir / "train.log").open("a") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the cell's own log
                train(config)
        except UserError as exc:  # bad settings or a diverged run: the reason goes in the report
            reason = str(exc)
            print(f"error: {reason}", file=log)
            return CellStatus.failure(reason)
        except Exception as exc:  # a crash (a bug, CUDA): its traceback is kept, and the grid goes on
            (cell_dir / "error.txt").write_text(traceback.format_exc())
            return CellStatus.failure(f"{type(exc).__name__}: {exc}")
    if not (cell_dir / "hf").is_dir():
        return CellStatus.failure(f"training ended without an export (see {cell_dir / 'train.log'})")
    (cell_dir / "DONE").write_text(f"{time.perf_counter() - began:.1f} s\n{DONE_ARGS}{json.dumps(record)}\n")
    return DONE


class CellFailed(Exception):
    """A failed cell's status line, raised by its SLURM job so that SLURM marks the job failed (and cancels
    the cells that wait for it)."""


def outcome(job: object) -> CellStatus:
    """A finished cell's status: what run_cell returned, or why its job or process died, with its log."""
    try:
        return job.result()
    except Exception as exc:  # the cell failed in its job, or the job was killed or crashed outside run_cell
        log = getattr(getattr(job, "paths", None), "stderr", None)
        return CellStatus.failure(failure_reason(exc) + (f" (log: {log})" if log else ""))


def failure_reason(exc: Exception) -> str:
    """Why a cell failed, from a worker's exception or the text of a SLURM job's traceback (submitit puts
    it between two lines of dashes): the cell's own reason when it was a CellFailed."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    marker = f"{CellFailed.__name__}: "
    own = [line.split(marker, 1)[1] for line in lines if marker in line]
    if own:
        return own[-1].removeprefix("failed: ")
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    last = lines[rules[1] - 1] if len(rules) >= 2 else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {last.strip()}"
