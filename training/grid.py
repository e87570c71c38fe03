"""The post-training ablation grid: its YAML settings (checked at load), its cells, and the runner that
trains them through `training.run`, measures their curves and writes the fits, shift reports and report.md.

`ablate.py` is the command line over it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
import traceback
import types
import typing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from safe_io.files import inside
from safe_io.files import read_yaml_mapping
from user_errors import MissingInput, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("sft", "dpo")
DIRECTIONS = ("favor", "disfavor")


class AblationConfigError(UserError):
    """The ablation YAML is wrong; the message names the setting and the fix."""


# the `slurm:` section of a grid: what each cell's job asks for; sbatch: more flags, as --name=value
SLURM_KEYS: dict[str, object] = {"partition": str, "account": str, "gpus_per_cell": int, "cpus_per_cell": int,
                                 "mem_gb": int, "time_min": int, "sbatch": list[str]}
SBATCH_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_-]*=\S.*")


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
        """The grid of a YAML, checked whole before anything is created or trained: its settings (validate),
        every cell's train.py flags as train.py parses them, the given checkpoints against the grid's world
        and sizes (check_cells), and the cells already in its directory (check_finished)."""
        if path.is_dir():
            raise AblationConfigError(f"ablation config {path} is a directory; pass a grid YAML, e.g. "
                                      "configs/ablations/tiny.yaml")
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
        cfg.check_cells(path)
        check_finished(cfg, path)
        return cfg

    def validate(self, path: Path) -> None:
        """The YAML's own settings, each against its range; nothing is read but the files it names."""
        from models.gpt import NAMED_SIZES

        self._validate_slurm(path)
        try:
            inside(self.root, self.name, f"{path}: name", f"{path}: root")
        except UserError as exc:
            raise AblationConfigError(str(exc)) from None
        examples = {"sizes": f"a model size, e.g. [gpt2-1l] (known: {', '.join(NAMED_SIZES)})",
                    "methods": f"a method ({', '.join(METHODS)})", "directions": f"a direction ({', '.join(DIRECTIONS)})",
                    "amounts": "an amount > 0 (documents or pairs; 0 = the pretrained model itself)"}
        for what, example in examples.items():
            if not getattr(self, what):
                raise AblationConfigError(f"{path}: {what} is empty, so the grid has no cells; list at least {example}")
        for size in self.sizes:  # a size names the directory of its cells: a known name only, never a path
            if size not in NAMED_SIZES:
                raise AblationConfigError(f"{path}: unknown model size {size!r} in sizes; choose from "
                                          f"{', '.join(NAMED_SIZES)} (set n_embd, n_head, ... in base_configs for other widths)")
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
        if any(a < 0 for a in self.amounts):
            raise AblationConfigError(f"{path}: amounts must be >= 0 (0 = the pretrained model), got {self.amounts}")
        if not any(a > 0 for a in self.amounts):
            raise AblationConfigError(f"{path}: amounts {self.amounts} has no amount > 0, so nothing is post-trained; "
                                      f"add {examples['amounts']}")
        for value, what, least in ((self.epochs, "epochs", 1), (self.batch_size, "batch_size", 1),
                                   (self.pretrain_steps, "pretrain_steps", 1), (self.evals_per_cell, "evals_per_cell", 1),
                                   (self.reader_prompts, "reader_prompts", 1), (self.gap_prompts, "gap_prompts", 2)):
            if value < least:
                raise AblationConfigError(f"{path}: {what} must be >= {least}, got {value}")
        for size, ckpt in self.pretrained.items():
            if size not in self.sizes:
                raise AblationConfigError(f"{path}: pretrained names size {size!r}, which is not in sizes {self.sizes}")
            if not Path(ckpt).exists():
                raise MissingInput(f"{path}: pretrained checkpoint {ckpt} for {size} does not exist; pass a run's "
                                   "checkpoints/last.ckpt or its hf/ directory")
        for cfg in self.base_configs:
            if Path(cfg).is_dir():
                raise AblationConfigError(f"{path}: base config {cfg} is a directory; list train.py config files "
                                          "(YAML) in base_configs")
            if not Path(cfg).is_file():
                raise MissingInput(f"{path}: base config {cfg} does not exist")

    def _validate_slurm(self, path: Path) -> None:
        """The slurm: section: known keys of the right types, counts >= 1 (GPUs >= 0), sbatch flags as --name=value."""
        for key, value in self.slurm.items():
            if key not in SLURM_KEYS:
                raise AblationConfigError(f"{path}: unknown slurm setting {key!r}; known: {', '.join(SLURM_KEYS)}")
            if not _is_a(value, SLURM_KEYS[key]):
                raise AblationConfigError(f"{path}: slurm.{key} is {value!r}, which is not {_describe(SLURM_KEYS[key])}")
            least = 0 if key == "gpus_per_cell" else 1
            if SLURM_KEYS[key] is int and value < least:
                raise AblationConfigError(f"{path}: slurm.{key} must be >= {least}, got {value}")
            if SLURM_KEYS[key] is str and not value.strip():
                raise AblationConfigError(f"{path}: slurm.{key} is empty; give a name or leave the setting out")
        for flag in self.slurm.get("sbatch", []):
            if not SBATCH_FLAG.fullmatch(flag):
                raise AblationConfigError(f"{path}: slurm.sbatch flag {flag!r} is not of the form --name=value "
                                          "(e.g. --qos=normal)")

    def check_cells(self, path: Path) -> None:
        """Every cell's train.py flags through train.py's own parser, without building or training anything:
        the overrides and the base configs' content parse, they leave the settings the grid sets itself alone,
        the world and each size resolve, the tasks are tasks of that world, and a given pretrained model is
        loadable and of the grid's world and size. Cells whose flags differ only in what the amount sets are
        parsed once (a grid of 28 cells: 5 parses)."""
        from datamodules.world import world_config
        from models.gpt import SPEC_FIELDS, resolve_spec
        from training import run as train

        out, parser, seen = Path(self.root) / self.name, train.train_parser(), set()
        for size in self.sizes:
            pre = Cell(size, "pretrain")
            settings = _parse_cell(parser, self, pre, out, path, seen)
            model, data = settings.model.init_args, settings.data.init_args
            with _in_cell(path, pre, self):
                given = data.world or {}
                world = world_config(given if isinstance(given, dict) else vars(given), "data.world.")
                spec = resolve_spec(model.size, **{key: getattr(model, key) for key in SPEC_FIELDS})
                if size not in self.pretrained:
                    train.check_stage(settings.run, train.STAGES["pretrain"], settings.model, settings.data)
                    train.check_schedule(settings.run, settings.trainer)
            if size in self.pretrained:
                world = _given_model(path, size, self.pretrained[size], world, spec, data.context_length)
            outside = [t for t in self.tasks if t >= world.n_tasks]
            if outside:
                raise AblationConfigError(f"{path}: tasks {self.tasks}: {outside} not in the world {size} is pretrained "
                                          f"on, which has {world.n_tasks} tasks (0..{world.n_tasks - 1}); pick tasks of "
                                          "that world, or give it more (data.world.n_tasks in base_configs)")
            for method in self.methods:
                for direction in self.directions:
                    cell = Cell(size, method, direction, max(self.amounts))
                    settings = _parse_cell(parser, self, cell, out, path, seen)
                    if settings is None:
                        continue  # the same flags as a cell parsed already, but for what the amount sets
                    stage = train.STAGES[method]
                    with _in_cell(path, cell, self):
                        train.check_stage(settings.run, stage, settings.model, settings.data)
                        train.check_schedule(settings.run, settings.trainer)
                        data = settings.data.init_args.clone()
                        data.world = type(data)(**dataclasses.asdict(world))  # the pretrained model's, as train.py takes it
                        train.post_training_mixture(settings.run, stage, data)

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


def cell_steps(cfg: AblationConfig, cell: Cell) -> int:
    """A cell's training steps: pretrain_steps, or its amount seen `epochs` times in batches of batch_size."""
    return cfg.pretrain_steps if cell.method == "pretrain" else max(1, math.ceil(cell.amount * cfg.epochs / cfg.batch_size))


def cell_args(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> list[str]:
    """train.py flags of one cell: the stage's config, then the grid's base configs, then the cell's settings."""
    base = [a for c in cfg.base_configs for a in ("--config", c)]
    steps = cell_steps(cfg, cell)
    if cell.method == "pretrain":
        args = ["--config", str(CONFIGS / "pretrain.yaml"), *base, "--run.stage", "pretrain", "--model.size", cell.size]
        extra = cfg.pretrain_overrides
    else:
        args = ["--config", str(CONFIGS / f"{cell.method}-{cell.direction}.yaml"), *base, "--run.stage", cell.method,
                "--run.direction", cell.direction, "--run.tasks", str(list(cfg.tasks)), "--model.init_from", str(pretrained),
                "--data.train_documents", str(cell.amount), "--data.batch_size", str(cfg.batch_size)]
        extra = [*cfg.posttrain_overrides, *cfg.method_overrides.get(cell.method, [])]
    interval = max(1, steps // cfg.evals_per_cell)
    return ["fit", *args, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(interval),
            "--run.root", str(out), "--run.name", cell.name, "--run.eval_at_start", "false", *cfg.overrides, *extra]


# the flags whose values differ between the cells of one (size, method, direction): what the amount sets, and names
_PER_CELL = ("--run.name", "--model.init_from", "--data.train_documents", "--trainer.max_steps", "--trainer.val_check_interval")


def _sources(cfg: AblationConfig, cell: Cell) -> str:
    """The YAML settings a cell's flags come from, to name in an error."""
    own = "pretrain_overrides" if cell.method == "pretrain" else \
        "posttrain_overrides" + (f", method_overrides.{cell.method}" if cell.method in cfg.method_overrides else "")
    return f"base_configs, overrides or {own}"


@contextlib.contextmanager
def _in_cell(path: Path, cell: Cell, cfg: AblationConfig) -> typing.Iterator[None]:
    """A setting train.py refuses for a cell, said as the grid's error: the cell, the reason, where to fix it."""
    try:
        yield
    except UserError as exc:
        raise AblationConfigError(f"{path}: cell {cell.name}: {exc} (fix {_sources(cfg, cell)})") from None


def _parse_cell(parser: object, cfg: AblationConfig, cell: Cell, out: Path, path: Path, seen: set) -> object:
    """A cell's train.py flags parsed as train.py parses them (its fit settings), or None where the same flags
    but for _PER_CELL were parsed already; the settings the grid sets itself must keep the grid's values."""
    from jsonargparse import ArgumentError

    from training import run as train

    flags = cell_args(cfg, cell, out, pretrained_of(cfg, out, cell.size))
    key = tuple("*" if before in _PER_CELL else arg for before, arg in zip(["", *flags], flags))
    if cell.method != "pretrain" and key in seen:
        return None
    seen.add(key)
    with _in_cell(path, cell, cfg):
        try:
            settings = parser.parse_args(train.with_stage_classes(flags))["fit"]
        except (ArgumentError, ValueError) as exc:
            cause = train.user_error_in(exc)
            if cause is not None:
                raise cause from None
            raise UserError(f"train.py refuses its flags: {_flag_reason(str(exc))}") from None
    owned = {"run.root": (str(out), "root and name"), "run.name": (cell.name, "its size, method, direction and amount"),
             "run.stage": ("pretrain" if cell.method == "pretrain" else cell.method, "methods"),
             "trainer.max_steps": (cell_steps(cfg, cell), "pretrain_steps" if cell.method == "pretrain"
                                   else "amounts x epochs / batch_size")}
    if cell.method != "pretrain":
        owned |= {"run.direction": (cell.direction, "directions"), "run.tasks": (list(cfg.tasks), "tasks"),
                  "model.init_args.init_from": (str(pretrained_of(cfg, out, cell.size)), "pretrained, or the pretraining"),
                  "data.init_args.train_documents": (cell.amount, "amounts"),
                  "data.init_args.batch_size": (cfg.batch_size, "batch_size")}
    for key, (value, source) in owned.items():
        if settings.get(key) != value:
            raise AblationConfigError(f"{path}: cell {cell.name}: {_sources(cfg, cell)} set {key.replace('init_args.', '')} "
                                      f"to {settings.get(key)!r}, which the grid sets itself ({value!r}, from {source}); "
                                      "drop it there")
    return settings


def _flag_reason(message: str) -> str:
    """jsonargparse's report of a refused flag as 'model.optim.lr: <the innermost reason>', however deep the
    classes it went through (their Union lists left out)."""
    keys, reason = [], None
    for line in (line.strip() for line in message.splitlines() if line.strip()):
        key = re.match(r'(?:- )?Parser key "([^"]+)":\s*(.*)$', line)
        if key:
            keys.append(key.group(1))
            if key.group(2):
                reason = key.group(2)
                break
        elif not line.startswith(("Does not validate", "Subtypes:", "Errors:", "- Problem with given class_path")):
            reason = line.removeprefix("- ")
            break
    return f"{'.'.join(keys)}: {reason}" if keys and reason else " ".join(message.split())


def _given_model(path: Path, size: str, ckpt: str, world: object, spec: object, context_length: int) -> object:
    """The world of a `pretrained:` model, refused unless it loads and was trained on the world, context and
    architecture that the grid's base configs give `size`."""
    import torch

    from datamodules.world import world_config, world_differences
    from contracts.run_artifacts import read_source
    from models.gpt import read_pretrained
    from training.run import source_spec

    what = f"{path}: pretrained checkpoint {ckpt} for {size}"
    if not Path(ckpt).is_dir():
        unreadable = None if zipfile.is_zipfile(ckpt) else "it is not a file torch.save writes"
        try:  # read here too, so that the reason is whole
            torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True) if unreadable is None else None
        except Exception as exc:
            unreadable = _reason(exc)
        if unreadable:
            raise AblationConfigError(f"{what} is not a checkpoint train.py wrote ({unreadable}); pass a run's "
                                      "checkpoints/last.ckpt or its hf/ directory")
    try:
        source = read_source(ckpt)
        if source.path.is_dir():
            read_pretrained(source.path)
        theirs = world_config(source.data["world"])
        their_spec = source_spec(source)
        their_context = source.data["context_length"]
    except UserError as exc:
        raise AblationConfigError(f"{what}: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise AblationConfigError(f"{what} does not record the world it was trained on ({_reason(exc)}); pass a "
                                  "checkpoint or hf/ export written by train.py") from None
    differ = [f"world.{name} {there} (grid: {here})" for name, here, there in world_differences(world, theirs)]
    differ += [f"{k} {getattr(their_spec, k)} (grid: {getattr(spec, k)})" for k in ("n_layer", "n_embd", "n_head", "n_positions")
               if getattr(their_spec, k) != getattr(spec, k)]
    differ += [f"context_length {their_context} (grid: {context_length})"] if their_context != context_length else []
    if differ:
        raise AblationConfigError(f"{what} is another model than the grid's base configs give {size}: it has "
                                  f"{', '.join(differ)}; pass a checkpoint of this world and size, or set base_configs "
                                  "and overrides to the checkpoint's")
    return theirs


def _reason(exc: BaseException) -> str:
    """An exception as 'Type: its first line', shortened at a word, never mid-word."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if len(line) > 100:
        line = line[:100].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def run_cell(cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> str:
    """Train one cell in this process unless it is done; returns 'done', 'skipped' or 'failed: <reason>'."""
    from training import run as train  # heavy imports (torch, lightning) only when there is training to do

    cell_dir = inside(out, cell.name, "cell", "the grid's directory")
    if (cell_dir / "DONE").is_file():
        return "skipped"
    record = cell_record(cfg, cell, out, pretrained)  # what DONE records: a resumed cell asks the same as a fresh one
    flags = args = record["flags"]
    if cell_dir.exists() and not (cell_dir / ASKED).is_file():  # not made by ablate.py: never deleted or resumed
        return f"failed: {cell_dir} holds no record of ablate.py's ({ASKED}); move it away and rerun"
    if (cell_dir / "checkpoints" / "last.ckpt").is_file() and recorded(cell_dir) == record:
        args = [*flags, "--ckpt_path", "last"]  # interrupted after a checkpoint: continue from it
    elif cell_dir.exists():
        shutil.rmtree(cell_dir)  # ours, interrupted before its first checkpoint or asked something else: start again
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / ASKED).write_text(json.dumps(record) + "\n")
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
    (cell_dir / "DONE").write_text(f"{time.perf_counter() - began:.1f} s\n{DONE_ARGS}{json.dumps(record)}\n")
    return "done"


def _cell_worker(gpus: object, driver: int, start_method: str) -> None:
    """A worker process of `--parallel`: tied to its driver first (it dies with it, kill -9 included, and so
    does what it forks), it takes one GPU id from the queue (None: no pinning) before torch starts, and
    trains cell after cell, so imports and reference curves are paid once per worker. Its processes (a
    DataLoader's workers) start as the driver's would (fork on Linux), not as it was started itself
    (spawn): a cell trains as in one process, and what it forks is tied to it."""
    from training.processes import die_with_parent

    die_with_parent(driver)
    multiprocessing.set_start_method(start_method, force=True)
    gpu = gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


DONE_ARGS = "asked: "  # DONE's line with the record of what the cell was asked (cell_record), as JSON
ASKED = "ASKED"  # the same record, written when a cell starts: it marks the directory as ablate.py's


def pretrained_of(cfg: AblationConfig, out: Path, size: str) -> Path:
    """The model a size's cells post-train: the given checkpoint, or the grid's own pretraining export."""
    return Path(cfg.pretrained[size]) if size in cfg.pretrained else out / size / "pretrain" / "hf"


def cells_of(cfg: AblationConfig) -> list[Cell]:
    """Every cell to train, in order: each size's pretraining (unless given), then its post-training cells."""
    return [cell for size in cfg.sizes
            for cell in ([] if size in cfg.pretrained else [Cell(size, "pretrain")])
            + [Cell(size, m, d, a) for m in cfg.methods for d in cfg.directions for a in cfg.amounts if a > 0]]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asked_of(cfg: AblationConfig, cell: Cell, out: Path) -> dict[str, object]:
    """What the grid asks of a cell: its train.py flags, and the content (sha256) of every file they name
    (the stage's config, the base configs, a config given in the overrides), so that a config edited in
    place asks something else. The model it starts from is cell_record's."""
    flags = cell_args(cfg, cell, out, pretrained_of(cfg, out, cell.size))
    named = {value for flag, value in zip(flags, flags[1:]) if flag in ("--config", "-c")}
    named |= {value for value in flags if value.endswith((".yaml", ".yml", ".json"))}  # a config given as a flag's value
    files = {value: _file_hash(Path(value)) for value in sorted(named) if Path(value).is_file()}
    return {"flags": flags, "files": files}


def asked_flags(cfg: AblationConfig, out: Path) -> dict[str, dict[str, object]]:
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
    stale, asked = [], asked_flags(cfg, out)
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


def check_finished(cfg: AblationConfig, path: Path) -> None:
    """The grid's directory before anything runs: a finished or interrupted cell under other settings stops
    the grid (saying what to remove), and so does a cell's directory that ablate.py did not make (a rerun
    would delete or resume it)."""
    out = Path(cfg.root) / cfg.name
    stale = stale_cells(cfg, out)
    if stale:
        remove = []
        for size in cfg.sizes:
            mine = [name for name in stale if name.split("/")[0] == size]
            remove += [out / size] if f"{size}/pretrain" in mine else [out / name for name in mine]
        shown = " ".join(map(str, remove[:4])) + (f" (and {len(remove) - 4} more)" if len(remove) > 4 else "")
        unrecorded = any(recorded(out / name) is None for name in stale)
        raise AblationConfigError(
            f"{out}: cell {stale[0]}" + (f" and {len(stale) - 1} more" if len(stale) > 1 else "") + " finished under "
            "other settings (their config files' content, flags or pretrained model differ from what the grid asks "
            "now" + ("; or an older ablate.py recorded them without their configs' content" if unrecorded else "")
            + f"); remove {shown} to train them again (a pretraining's cells go with it), or give the grid a new name")
    for cell in cells_of(cfg):
        cell_dir = out / cell.name
        existing = next(p for p in (cell_dir, *cell_dir.parents) if p.exists())
        if not existing.is_dir():
            raise AblationConfigError(f"{path}: {existing} is a file where cell {cell.name} trains; move it away")
        if cell_dir.is_dir() and not (cell_dir / "DONE").is_file() and not (cell_dir / ASKED).is_file():
            raise AblationConfigError(f"{path}: {cell_dir} holds no record of ablate.py's ({ASKED}), so it is not a cell "
                                      "this grid started and is neither deleted nor reused; move it away, or give the "
                                      "grid a new name")


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
    """`parallel` spawn worker processes, each on a GPU of its own when there are that many; None for 1.
    The workers die with this process (training/processes.py); when it leaves the pool early (an error,
    Ctrl-C) they are killed at once, running cells included, which a rerun resumes from their last
    checkpoint. `parallel` must be sane already (worker_count)."""
    if parallel <= 1:
        yield None
        return
    import torch

    from training.processes import stop_processes

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


POOL_ANALYSES = 2  # report_grid runs the law fits and the reader tables in the pool


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
                try:
                    running[pool.submit(run_cell, cfg, cell, out, pretrained)] = cell
                except BrokenProcessPool:  # a worker was killed (out of memory, say): its cells failed above
                    status[cell.name] = "failed: not started, a worker process died (see the other failed cells); rerun to train it"
                    continue
                trained += 1
        if stop_after is not None and trained >= stop_after and queue and not running:
            print(f"[ablate] stopped after {trained} trained cells (--stop-after); rerun to finish", flush=True)
            return True
        if running:
            time.sleep(0.5)
    return False


def true_priors(model: Path) -> list[float] | None:
    """The pretraining mixture, to set beside the fitted priors in the shift report, when it is not uniform."""
    from contracts.run_artifacts import read_source

    weights = (read_source(model).data.get("world") or {}).get("weights")
    if not weights or max(weights) - min(weights) < 1e-9:
        return None
    return [float(w) for w in weights]


def has_prior(model: Path) -> bool:
    """Whether the KL to a model's ideal learner (auto) is finite for some prior: always for the exact
    learner, which scores the prompts' labels only; for the document reader, which reads whole prompts and
    documents, only where the world has property_smoothing > 0."""
    from evaluation.ginc_curves import ideal_learner
    from contracts.run_artifacts import read_source

    data = read_source(model).data
    return (ideal_learner("auto", float(data.get("demo_rate", 0.0))) == "exact"
            or float((data.get("world") or {}).get("property_smoothing", 0.0)) > 0)


def run_grid(cfg: AblationConfig, stop_after: int | None = None, parallel: int = 1, launcher: str = "local",
             wait: bool = True) -> int:
    """Run (or resume) the grid, `parallel` cells at a time or as SLURM jobs (see train_cells); write
    curves.csv, fits/, shift/ and report.md. Returns the number of failed cells."""
    from training import slurm
    from training.processes import children_die_with_me, grid_lock

    out = Path(cfg.root) / cfg.name
    if launcher == "slurm":
        slurm.require_submitit()
    with grid_lock(out):  # one driver per grid; SLURM jobs train their cells without it
        check_finished(cfg, out)  # again under the lock: another driver may have trained since the grid was loaded
        if launcher == "local":
            queued = slurm.queued_cells(out)
            if queued:
                name, job = next(iter(queued.items()))
                raise UserError(f"{out}: " + (f"cell {name} is a SLURM job" if len(queued) == 1 else
                                               f"cells {name} and {len(queued) - 1} more are SLURM jobs")
                                + f" still queued or running (job {job}); wait for them with `--launcher slurm`, "
                                  "or scancel them, then rerun")
            children_die_with_me()  # a DataLoader's workers forked here die with this process
            parallel = worker_count(cfg, out, stop_after, parallel)
        with worker_pool(parallel if launcher == "local" else 1) as pool:
            status, stopped = train_cells(cfg, out, stop_after, parallel, pool, launcher, wait)
            if stopped:
                return sum(s.startswith("failed") for s in status.values())
            broken = pool is not None and getattr(pool, "_broken", False)  # a worker died: analyse here
            return report_grid(cfg, out, status, None if broken else pool)


def report_grid(cfg: AblationConfig, out: Path, status: dict[str, str], pool: ProcessPoolExecutor | None) -> int:
    """Measure the curves of every trained model, write curves.csv and the fits, shift reports, reader
    tables and report.md; the fits and reader tables run in the pool's workers while this process
    fits the shifts (which start processes of their own for large tables). Returns how many cells and
    analyses failed."""
    from analysis.report import summary_table
    from contracts.curves_table import read_curves, write_curves
    from evaluation.ginc_curves import checkpoint_curve_rows
    from evaluation.grid_findings import range_comparisons
    from evaluation.reports import fit_table, shift_table
    from contracts.run_artifacts import read_source

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
    from safe_io.files import write_rows
    from datamodules.ginc_datamodule import GincDataModule
    from evaluation.ginc_curves import ideal_references
    from evaluation.grid_report import learner_curves_figure
    from evaluation.reader_gap import reader_gap_rows
    from evaluation.reader_prior import reader_prior_rows
    from contracts.run_artifacts import read_source

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
