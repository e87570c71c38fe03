"""The post-training ablation grid: its YAML settings (checked at load), its cells, and the runner that
trains them through `training.run`, measures their curves and writes the fits, shift reports and report.md.

`ablate.py` is the command line over it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import time
import traceback
import types
import typing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from analysis.output import inside
from datamodules.settings_file import read_yaml_mapping
from user_errors import MissingInput, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("sft", "dpo")
DIRECTIONS = ("favor", "disfavor")


class AblationConfigError(UserError):
    """The ablation YAML is wrong; the message names the setting and the fix."""


# the `slurm:` section of a grid: what each cell's job asks for; sbatch: more flags, as --name=value
SLURM_KEYS: dict[str, object] = {"partition": str, "account": str, "gpus_per_cell": int, "cpus_per_cell": int,
                                 "mem_gb": int, "time_min": int, "sbatch": list[str]}


def _is_a(value: object, kind: object) -> bool:
    """Whether a YAML value fits a dataclass annotation (int, float, str, list[...], dict[...], ... | None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is_a(k, args[0]) and _is_a(v, args[1]) for k, v in value.items())
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return isinstance(kind, type) and isinstance(value, kind)


def _describe(kind: object) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {int: "an integer", float: "a number", str: "text", type(None): "null"}.get(kind, str(kind))


@dataclass
class AblationConfig:
    """sizes: model.size of each pretrained model. base_configs: train.py configs of every run (world,
    data, trainer). pretrain_steps: its trainer.max_steps; pretrained: size -> an existing checkpoint to
    reuse instead. methods x directions x amounts: the post-training cells, each a configs/<method>-<direction>.yaml
    run on `tasks`; amounts count documents (SFT) or pairs (DPO), seen `epochs` times in batches of
    batch_size. evals_per_cell: ICL evaluations during a cell. overrides: extra train.py flags for every
    run (e.g. --trainer.devices 8); pretrain_overrides, posttrain_overrides: for those runs only (e.g. lr);
    method_overrides: method -> flags for that method's cells only, after posttrain_overrides (DPO wants a
    smaller lr than SFT).
    fit_fraction, laws: for evaluate.py fit; shift_resamples: for evaluate.py shift's intervals.
    reader_prompts: prompts per (k, task) for each model's prior under its ideal learner (evaluate.py
    reader-prior); gap_prompts: prompts per (k, task) for the pretrained models' gap to their ideal learner."""

    name: str
    sizes: list[str]
    base_configs: list[str] = field(default_factory=list)
    root: str = "runs/ablations"
    pretrain_steps: int = 1000
    pretrained: dict[str, str] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    tasks: list[int] = field(default_factory=lambda: [0])
    amounts: list[int] = field(default_factory=lambda: [0, 50, 250, 500, 1000, 2500, 5000])
    epochs: int = 1
    batch_size: int = 16
    evals_per_cell: int = 2
    overrides: list[str] = field(default_factory=list)
    pretrain_overrides: list[str] = field(default_factory=list)
    posttrain_overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    fit_fraction: float = 0.1
    laws: list[str] | None = None
    shift_resamples: int = 100
    reader_prompts: int = 32
    gap_prompts: int = 256
    slurm: dict[str, str | int | list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "AblationConfig":
        if not path.is_file():
            raise MissingInput(f"ablation config {path} does not exist; see configs/ablations/")
        raw = read_yaml_mapping(path, "ablation config", AblationConfigError)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise AblationConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for name, value in raw.items():
            if not _is_a(value, hints[name]):
                raise AblationConfigError(f"{path}: {name} is {value!r}, which is not {_describe(hints[name])}; "
                                          "fix that setting")
        try:
            cfg = cls(**raw)
        except TypeError as exc:
            raise AblationConfigError(f"{path}: {exc}; give name and sizes at least") from None
        cfg.validate(path)
        return cfg

    def validate(self, path: Path) -> None:
        for key, value in self.slurm.items():
            if key not in SLURM_KEYS:
                raise AblationConfigError(f"{path}: unknown slurm setting {key!r}; known: {', '.join(SLURM_KEYS)}")
            if not _is_a(value, SLURM_KEYS[key]):
                raise AblationConfigError(f"{path}: slurm.{key} is {value!r}, which is not {_describe(SLURM_KEYS[key])}")
        try:
            inside(self.root, self.name, f"{path}: name", f"{path}: root")
        except UserError as exc:
            raise AblationConfigError(str(exc)) from None
        for method in [*self.methods, *self.method_overrides]:
            if method not in METHODS:
                raise AblationConfigError(f"{path}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        for direction in self.directions:
            if direction not in DIRECTIONS:
                raise AblationConfigError(f"{path}: unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        for what, values in (("sizes", self.sizes), ("methods", self.methods), ("directions", self.directions),
                             ("tasks", self.tasks), ("amounts", self.amounts)):
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise AblationConfigError(f"{path}: {what} lists {repeated[0]!r} more than once; list each once")
        if not self.tasks or any(t < 0 for t in self.tasks):
            raise AblationConfigError(f"{path}: tasks must be task indices >= 0, got {self.tasks}")
        self.analysis_configs(path)  # the fit and shift settings, checked before any training
        if any(a < 0 for a in self.amounts) or not self.amounts:
            raise AblationConfigError(f"{path}: amounts must be >= 0 (0 = the pretrained model), got {self.amounts}")
        for value, what, least in ((self.epochs, "epochs", 1), (self.batch_size, "batch_size", 1),
                                   (self.pretrain_steps, "pretrain_steps", 1), (self.evals_per_cell, "evals_per_cell", 1),
                                   (self.reader_prompts, "reader_prompts", 1), (self.gap_prompts, "gap_prompts", 2)):
            if value < least:
                raise AblationConfigError(f"{path}: {what} must be >= {least}, got {value}")
        for size, ckpt in self.pretrained.items():
            if size not in self.sizes:
                raise AblationConfigError(f"{path}: pretrained names size {size!r}, which is not in sizes {self.sizes}")
            if not Path(ckpt).exists():
                raise MissingInput(f"{path}: pretrained checkpoint {ckpt} for {size} does not exist")
        for cfg in self.base_configs:
            if not Path(cfg).is_file():
                raise MissingInput(f"{path}: base config {cfg} does not exist")


    def analysis_configs(self, path: Path | None = None):
        """The FitConfig and ShiftConfig (baseline filled in per size) of the grid's reports, checked."""
        from analysis.fitting import FitConfig
        from analysis.laws import LAW_NAMES
        from analysis.shift import ShiftConfig

        try:
            fit = FitConfig(laws=tuple(self.laws or LAW_NAMES), fractions=(self.fit_fraction,))
            shift = ShiftConfig(baseline="", resamples=self.shift_resamples)
        except UserError as exc:
            raise AblationConfigError(f"{path}: {exc} (fit_fraction, laws, shift_resamples)") from None
        return fit, shift


@dataclass
class Cell:
    size: str
    method: str  # "pretrain" for the pretraining run
    direction: str = ""
    amount: int = 0

    @property
    def name(self) -> str:
        return f"{self.size}/pretrain" if self.method == "pretrain" else f"{self.size}/{self.method}-{self.direction}-{self.amount}"


def cell_args(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> list[str]:
    """train.py flags of one cell: the stage's config, then the grid's base configs, then the cell's settings."""
    base = [a for c in cfg.base_configs for a in ("--config", c)]
    if cell.method == "pretrain":
        steps = cfg.pretrain_steps
        args = ["--config", str(CONFIGS / "pretrain.yaml"), *base, "--run.stage", "pretrain", "--model.size", cell.size]
        extra = cfg.pretrain_overrides
    else:
        steps = max(1, math.ceil(cell.amount * cfg.epochs / cfg.batch_size))
        args = ["--config", str(CONFIGS / f"{cell.method}-{cell.direction}.yaml"), *base, "--run.stage", cell.method,
                "--run.direction", cell.direction, "--run.tasks", str(list(cfg.tasks)), "--model.init_from", str(pretrained),
                "--data.train_documents", str(cell.amount), "--data.batch_size", str(cfg.batch_size)]
        extra = [*cfg.posttrain_overrides, *cfg.method_overrides.get(cell.method, [])]
    interval = max(1, steps // cfg.evals_per_cell)
    return ["fit", *args, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(interval),
            "--run.root", str(out), "--run.name", cell.name, "--run.eval_at_start", "false", *cfg.overrides, *extra]


def run_cell(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> str:
    """Train one cell in this process unless it is done; returns 'done', 'skipped' or 'failed: <reason>'."""
    from training import run as train  # heavy imports (torch, lightning) only when there is training to do

    cell_dir = out / cell.name
    if (cell_dir / "DONE").is_file():
        return "skipped"
    flags = cell_args(cfg, cell, out, pretrained)  # what DONE records: a resumed cell asks the same as a fresh one
    args = flags
    if (cell_dir / "checkpoints" / "last.ckpt").is_file():
        args = [*flags, "--ckpt_path", "last"]  # interrupted after a checkpoint: continue from it
    elif cell_dir.exists():
        shutil.rmtree(cell_dir)  # interrupted before its first checkpoint: start again
    cell_dir.mkdir(parents=True, exist_ok=True)
    print(f"[ablate] {cell.name}: python train.py {' '.join(args)}", flush=True)
    began = time.perf_counter()
    train.quiet_lightning()
    with (cell_dir / "train.log").open("a") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # the cell's own log
                train.cli_main(args)
        except UserError as exc:  # bad settings or a diverged run: the reason goes in the report
            reason = str(exc)
            print(f"error: {reason}", file=log)
            return f"failed: {reason}".splitlines()[0]
        except Exception as exc:  # a crash (a bug, CUDA): its traceback is kept, and the grid goes on
            (cell_dir / "error.txt").write_text(traceback.format_exc())
            return f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
    if not (cell_dir / "hf").is_dir():
        return f"failed: training ended without an export (see {cell_dir / 'train.log'})"
    (cell_dir / "DONE").write_text(f"{time.perf_counter() - began:.1f} s\n{DONE_ARGS}{json.dumps(flags)}\n")
    return "done"


def _cell_worker(gpus: object) -> None:
    """A worker process of `--parallel`: it takes one GPU id from the queue (None: no pinning) before
    torch starts, and trains cell after cell, so imports and reference curves are paid once per worker."""
    gpu = gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


DONE_ARGS = "train.py flags: "


def pretrained_of(cfg: AblationConfig, out: Path, size: str) -> Path:
    """The model a size's cells post-train: the given checkpoint, or the grid's own pretraining export."""
    return Path(cfg.pretrained[size]) if size in cfg.pretrained else out / size / "pretrain" / "hf"


def cells_of(cfg: AblationConfig) -> list[Cell]:
    """Every cell to train, in order: each size's pretraining (unless given), then its post-training cells."""
    return [cell for size in cfg.sizes
            for cell in ([] if size in cfg.pretrained else [Cell(size, "pretrain")])
            + [Cell(size, m, d, a) for m in cfg.methods for d in cfg.directions for a in cfg.amounts if a > 0]]


def asked_flags(cfg: AblationConfig, out: Path) -> dict[str, list[str]]:
    """The train.py flags the grid asks of each cell now, by cell name: what DONE and jobs.json must match."""
    return {cell.name: cell_args(cfg, cell, out, pretrained_of(cfg, out, cell.size)) for cell in cells_of(cfg)}


def stale_cells(cfg: AblationConfig, out: Path) -> list[str]:
    """Finished cells whose recorded train.py flags differ from what the grid asks of them now (another
    world, tasks, steps or overrides): reusing them would report what was not asked for."""
    stale, asked = [], asked_flags(cfg, out)
    for name, flags in asked.items():
        done = out / name / "DONE"
        recorded = [line[len(DONE_ARGS):] for line in done.read_text().splitlines()
                    if line.startswith(DONE_ARGS)] if done.is_file() else []
        if recorded and json.loads(recorded[0]) != flags:
            stale.append(name)
    return stale


class CellFailed(Exception):
    """run_cell's 'failed: <reason>', raised by a cell's SLURM job so that SLURM marks the job failed (and
    cancels the cells that wait for it)."""


def outcome(job: object) -> str:
    """A finished cell's status: what run_cell returned, or why its job or process died, with its log."""
    try:
        return job.result()
    except Exception as exc:  # the cell failed in its job, or the job was killed or crashed outside run_cell
        log = getattr(getattr(job, "paths", None), "stderr", None)
        return failure_line(exc) + (f" (log: {log})" if log else "")


def failure_line(exc: Exception) -> str:
    """'failed: <reason>' from a worker's exception or the text of a SLURM job's traceback (submitit puts
    it between two lines of dashes): the cell's own reason when it was a CellFailed."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    marker = f"{CellFailed.__name__}: "
    own = [line.split(marker, 1)[1] for line in lines if marker in line]
    if own:
        return own[-1]
    rules = [i for i, line in enumerate(lines) if set(line.strip()) == {"-"}]
    last = lines[rules[1] - 1] if len(rules) >= 2 else (lines[-1] if lines else "")
    return f"failed: {type(exc).__name__}: {last.strip()}"


@contextlib.contextmanager
def worker_pool(parallel: int) -> typing.Iterator[ProcessPoolExecutor | None]:
    """`parallel` spawn worker processes, each on a GPU of its own when there are that many; None for 1."""
    if parallel <= 1:
        yield None
        return
    import torch

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    gpus = context.Queue()
    pin = torch.cuda.is_available() and torch.cuda.device_count() >= parallel
    for slot in range(parallel):
        gpus.put(slot if pin else None)
    pool = ProcessPoolExecutor(parallel, mp_context=context, initializer=_cell_worker, initargs=(gpus,))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def train_cells(cfg: AblationConfig, out: Path, stop_after: int | None, parallel: int = 1,
                pool: ProcessPoolExecutor | None = None, launcher: str = "local",
                wait: bool = True) -> tuple[dict[str, str], bool]:
    """Train every cell not done, the grid as a graph: a size's post-training cells start once its
    pretraining has finished. Locally (see local_cells) or as SLURM jobs (training/slurm.py), which this
    process waits for unless `wait` is false. Returns each cell's status ('given', 'skipped' for DONE,
    'done', or 'failed: <reason>') and whether the grid stopped early (--stop-after, --no-wait)."""
    status = {f"{size}/pretrain": "given" for size in cfg.pretrained}
    status |= {cell.name: "skipped" for cell in cells_of(cfg) if (out / cell.name / "DONE").is_file()}
    if launcher == "slurm":
        from training.slurm import slurm_cells

        stopped = slurm_cells(cfg, out, status, stop_after, wait)
    else:
        stopped = local_cells(cfg, out, status, stop_after, parallel, pool)
    order = [name for size in cfg.sizes for name in (f"{size}/pretrain", *(c.name for c in cells_of(cfg) if c.size == size))]
    return {name: status[name] for name in order if name in status}, stopped


def local_cells(cfg: AblationConfig, out: Path, status: dict[str, str], stop_after: int | None, parallel: int,
                pool: ProcessPoolExecutor | None) -> bool:
    """Train the cells not in status on this machine: without a pool each in this process, in order;
    with one (of `parallel` workers), that many at once. Returns whether --stop-after stopped it."""
    queue, running, trained = [c for c in cells_of(cfg) if c.name not in status], {}, 0
    while queue or running:
        for job in [j for j in running if j.done()]:
            status[running.pop(job).name] = outcome(job)
        for cell in list(queue):
            if len(running) >= parallel or (stop_after is not None and trained >= stop_after):
                break
            if cell.method != "pretrain" and f"{cell.size}/pretrain" not in status:
                continue  # its pretraining has not finished yet
            queue.remove(cell)
            pretrained = pretrained_of(cfg, out, cell.size)
            if cell.method != "pretrain" and not pretrained.exists():
                status[cell.name] = f"failed: no pretrained model at {pretrained}"
            elif pool is None:
                status[cell.name] = run_cell(cfg, cell, out, pretrained)
                trained += status[cell.name] == "done"
            else:
                running[pool.submit(run_cell, cfg, cell, out, pretrained)] = cell
                trained += 1
        if stop_after is not None and trained >= stop_after and queue and not running:
            print(f"[ablate] stopped after {trained} trained cells (--stop-after); rerun to finish", flush=True)
            return True
        if running:
            time.sleep(0.5)
    return False


def true_priors(model: Path) -> list[float] | None:
    """The pretraining mixture, to set beside the fitted priors in the shift report, when it is not uniform."""
    from evaluation.run_artifacts import read_source

    weights = (read_source(model).data.get("world") or {}).get("weights")
    if not weights or max(weights) - min(weights) < 1e-9:
        return None
    return [float(w) for w in weights]


def has_prior(model: Path) -> bool:
    """Whether the KL to a model's ideal learner (auto) is finite for some prior: always for the exact
    learner, which scores the prompts' labels only; for the document reader, which reads whole prompts and
    documents, only where the world has property_smoothing > 0."""
    from evaluation.ginc_curves import ideal_learner
    from evaluation.run_artifacts import read_source

    data = read_source(model).data
    return (ideal_learner("auto", float(data.get("demo_rate", 0.0))) == "exact"
            or float((data.get("world") or {}).get("property_smoothing", 0.0)) > 0)


def run_grid(cfg: AblationConfig, stop_after: int | None = None, parallel: int = 1, launcher: str = "local",
             wait: bool = True) -> int:
    """Run (or resume) the grid, `parallel` cells at a time or as SLURM jobs (see train_cells); write
    curves.csv, fits/, shift/ and report.md. Returns the number of failed cells."""
    out = Path(cfg.root) / cfg.name
    stale = stale_cells(cfg, out)
    if stale:
        raise AblationConfigError(f"{out}: cell {stale[0]}" + (f" and {len(stale) - 1} more" if len(stale) > 1 else "")
                                  + " finished under other settings; give the grid a new name, or remove those cells' "
                                    "directories to train them again")
    with worker_pool(parallel if launcher == "local" else 1) as pool:
        status, stopped = train_cells(cfg, out, stop_after, parallel, pool, launcher, wait)
        if stopped:
            return sum(s.startswith("failed") for s in status.values())
        return report_grid(cfg, out, status, pool)


def report_grid(cfg: AblationConfig, out: Path, status: dict[str, str], pool: ProcessPoolExecutor | None) -> int:
    """Measure the curves of every trained model, write curves.csv and the fits, shift reports, reader
    tables and report.md; the fits and reader tables run in the pool's workers while this process
    fits the shifts (which start processes of their own for large tables). Returns how many cells and
    analyses failed."""
    from analysis.report import summary_table
    from evaluation.curves_table import read_curves, write_curves
    from evaluation.ginc_curves import checkpoint_curve_rows
    from evaluation.grid_report import range_comparisons
    from evaluation.reports import fit_table, shift_table
    from evaluation.run_artifacts import read_source

    models = {size: model for size in cfg.sizes if (model := pretrained_of(cfg, out, size)).exists()}
    cells = [cell for cell in cells_of(cfg) if cell.method != "pretrain"]
    finished = [out / c.name / "hf" for c in cells if status[c.name] in ("done", "skipped")]
    # every model on the cells' prompts: a given pretrained checkpoint keeps the ICL settings it was trained
    # with, which the grid's overrides may change for its cells
    icl = (read_source(finished[0]).data.get("icl") or {}) if finished else {}
    baselines = {size: checkpoint_curve_rows([model], k_values=icl.get("k_values"), prompts=icl.get("prompts_per_task"))
                 for size, model in models.items()}
    rows = [r for size_rows in baselines.values() for r in size_rows]
    rows += [r for model in finished for r in checkpoint_curve_rows([model])]
    failed = [name for name, s in status.items() if s.startswith("failed")]
    for name in failed:
        print(f"[ablate] FAILED {name}: {status[name]}", flush=True)
    if not rows:
        raise AblationConfigError(f"no model of {cfg.name} finished, so there are no curves; see {out}/*/*/train.log")
    curves = write_curves(rows, out / "curves.csv")
    fit_config, shift_settings = cfg.analysis_configs()
    elsewhere = {"fits": (fit_table, curves, out / "fits", fit_config),
                 "reader tables": (reader_tables, cfg, out, list(models.values()), [*models.values(), *finished],
                                   list(baselines.values()))}
    started = {name: pool.submit(*call) for name, call in elsewhere.items()} if pool is not None else {}
    settings = {size: dataclasses.replace(shift_settings, baseline=base_rows[0]["run"]) for size, base_rows in baselines.items()}
    shifts = {size: _report(f"shift of {size}", shift_table, curves, out / "shift" / size, settings[size],
                            true_priors=true_priors(models[size])) for size in baselines}
    groups = read_curves(curves)
    ranges = {size: _report(f"amount ranges of {size}", range_comparisons, groups, settings[size], shift) or []
              for size, shift in shifts.items() if shift is not None}
    fits, readers = (_report(name, started[name].result) if name in started else _report(name, *call)
                     for name, call in elsewhere.items())
    unmade = sum(result is None for result in (*shifts.values(), fits, readers))  # analyses that could not be made
    results, _ = fits or ([], [])
    reader, gaps = readers or ([], [])
    if results:
        print(summary_table(results), flush=True)
    shifts = {size: shift for size, shift in shifts.items() if shift is not None}
    write_report(cfg, out, status, shifts, results, {r["run"]: r for r in reader}, gaps, ranges)
    return len(failed) + unmade


def _report(name: str, call: typing.Callable, *args: object, **kwargs: object) -> object:
    """An analysis's result, or None when its settings or input are bad (said in one line; the grid goes on)."""
    try:
        return call(*args, **kwargs)
    except UserError as exc:
        print(f"[ablate] {name} failed: {exc}", flush=True)
        return None


def reader_tables(cfg: AblationConfig, out: Path, pretrained: list[Path], trained: list[Path],
                  baselines: list[list[dict]]) -> tuple[list, list]:
    """reader_prior.csv (every trained model that has a prior) and reader_gap.csv (the pretrained models),
    each against the model's own ideal learner (auto: the exact learner where the data held prompts), and
    learner_curves.png (the first pretrained model's curves, `baselines`, beside both learners'); returns
    the rows."""
    from analysis.output import write_rows
    from datamodules.ginc_datamodule import GincDataModule
    from evaluation.ginc_curves import ideal_references
    from evaluation.grid_report import learner_curves_figure
    from evaluation.reader_gap import reader_gap_rows
    from evaluation.reader_prior import reader_prior_rows
    from evaluation.run_artifacts import read_source

    if pretrained:
        ideal = ideal_references(GincDataModule(**read_source(pretrained[0]).data))
        learner_curves_figure(baselines[0], ideal, out / "learner_curves.png")

    print("[ablate] ideal-learner priors of every model, and the pretrained models' gap to their ideal learner", flush=True)
    reader = reader_prior_rows([m for m in trained if has_prior(m)], cfg.reader_prompts)
    if reader:
        write_rows(reader, out / "reader_prior.csv")
    gaps = reader_gap_rows(pretrained, cfg.gap_prompts)
    write_rows(gaps, out / "reader_gap.csv")
    return reader, gaps


def write_report(cfg: AblationConfig, out: Path, status: dict[str, str], shifts: dict, results: list,
                 reader: dict[str, dict], gaps: list[dict], ranges: dict[str, list[dict]]) -> None:
    """report.md, reemergence.png and favoured_prior.png: each cell's status, then what the grid found
    (evaluation/grid_report.py); `ranges`: each size's shared-P vs free verdicts by amount range."""
    from evaluation.ginc_curves import LEARNER_NAMES, PRIOR_NAMES, named_learners
    from evaluation.grid_report import (extrapolation_section, favoured_prior_section, gap_section, prior_section,
                                        reemergence_section)

    lines = [f"# Ablation {cfg.name}", "", f"Sizes {', '.join(cfg.sizes)}; methods {', '.join(cfg.methods)}; directions "
             f"{', '.join(cfg.directions)}; tasks {cfg.tasks}; amounts {cfg.amounts} (x{cfg.epochs} epochs, batch {cfg.batch_size}).", "",
             "| cell | status |", "| --- | --- |", *[f"| {n} | {s} |" for n, s in status.items()], "",
             "- combined curves: `curves.csv`", "- law fits: `fits/report.md`",
             *[f"- shift of {size}: `shift/{size}/report.md`" for size in shifts],
             (f"- {named_learners(list(reader.values()), PRIOR_NAMES)} of every model (law-free): `reader_prior.csv`" if reader else
              "- reader priors (law-free): none: the world has no property_smoothing, so no prior makes the KL to the "
              "reader finite"),
             f"- gaps to the {named_learners(gaps, LEARNER_NAMES) or 'ideal learner'}: `reader_gap.csv`", "",
             "## What the grid shows", "", "### Reemergence", "", *reemergence_section(shifts, out), *gap_section(gaps, out),
             *favoured_prior_section(shifts, cfg.tasks[0], reader, out)]
    for size, shift in shifts.items():
        lines += [f"## {size}", "", *prior_section(shift, cfg.tasks[0], reader, ranges.get(size, []))]
    lines += ["## Laws in extrapolation", "", f"Fit on shots <= {cfg.fit_fraction:g} x the largest, scored on the rest, "
              "over every cell's curves:", "", *extrapolation_section(results)]
    (out / "report.md").write_text("\n".join(lines))
