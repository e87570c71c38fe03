"""The grid checked whole before anything is created or trained (AblationConfig.load): every cell's
train.py flags parsed as train.py parses them, the world and tasks of each size, a given pretrained model
against the grid's world and size, and the cells already in the grid's directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
import zipfile
from pathlib import Path

from training.grid.cells import ASKED, Cell, cell_args, cell_steps, cells_of, pretrained_of, recorded, stale_cells
from user_errors import UserError

if typing.TYPE_CHECKING:
    from training.grid.config import AblationConfig


class AblationConfigError(UserError):
    """The ablation YAML is wrong; the message names the setting and the fix."""


def check_cells(cfg: AblationConfig, path: Path) -> None:
    """Every cell's train.py flags through train.py's own parser, without building or training anything:
    the overrides and the base configs' content parse, they leave the settings the grid sets itself alone,
    the world and each size resolve, the tasks are tasks of that world, and a given pretrained model is
    loadable and of the grid's world and size. Cells whose flags differ only in what the amount sets are
    parsed once (a grid of 28 cells: 5 parses)."""
    from datamodules.world import world_config
    from models.gpt import SPEC_FIELDS, resolve_spec
    from training.checks import post_training_mixture
    from training.config import STAGES

    out, seen = Path(cfg.root) / cfg.name, set()
    for size in cfg.sizes:
        pre = Cell(size, "pretrain")
        settings = _parse_cell(cfg, pre, out, path, seen)
        model, data = settings.model.init_args, settings.data.init_args
        with _in_cell(path, pre, cfg):
            given = data.world or {}
            world = world_config(given if isinstance(given, dict) else vars(given), "data.world.")
            spec = resolve_spec(model.size, **{key: getattr(model, key) for key in SPEC_FIELDS})
            if size not in cfg.pretrained:
                _check_run(settings, STAGES["pretrain"])
        if size in cfg.pretrained:
            world = _given_model(path, size, cfg.pretrained[size], world, spec, data.context_length)
        outside = [t for t in cfg.tasks if t >= world.n_tasks]
        if outside:
            raise AblationConfigError(f"{path}: tasks {cfg.tasks}: {outside} not in the world {size} is pretrained "
                                      f"on, which has {world.n_tasks} tasks (0..{world.n_tasks - 1}); pick tasks of "
                                      "that world, or give it more (data.world.n_tasks in base_configs)")
        for method in cfg.methods:
            for direction in cfg.directions:
                cell = Cell(size, method, direction, max(cfg.amounts))
                settings = _parse_cell(cfg, cell, out, path, seen)
                if settings is None:
                    continue  # the same flags as a cell parsed already, but for what the amount sets
                stage = STAGES[method]
                with _in_cell(path, cell, cfg):
                    run = _check_run(settings, stage)
                    data = {**settings.data.init_args.as_dict(),
                            "world": dataclasses.asdict(world)}  # the pretrained model's
                    post_training_mixture(run, stage, data)


def _check_run(settings: object, stage: object) -> object:
    """A cell's resolved settings through train()'s stage and schedule checks; its RunConfig."""
    from training.checks import check_schedule, check_stage
    from training.config import RunConfig

    run = RunConfig(**settings.run.as_dict())
    check_stage(run, stage, settings.model.as_dict(), settings.data.as_dict())
    check_schedule(run, settings.trainer.as_dict())
    return run


# the flags whose values differ between the cells of one (size, method, direction): what the amount sets, and names
_PER_CELL = ("--run.name", "--model.init_from", "--data.train_documents", "--trainer.max_steps",
             "--trainer.val_check_interval")


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


def _parse_cell(cfg: AblationConfig, cell: Cell, out: Path, path: Path, seen: set) -> object:
    """A cell's train.py flags parsed as train.py parses them (its settings, defaults filled in, `run` as the
    RunConfig), or None where the same flags but for _PER_CELL were parsed already; the settings the grid
    sets itself must keep the grid's values."""
    from jsonargparse import ArgumentError

    from training.cli import config_of
    from training.options import resolve

    flags = cell_args(cfg, cell, out, pretrained_of(cfg, out, cell.size))
    key = tuple("*" if before in _PER_CELL else arg for before, arg in zip(["", *flags], flags))
    if cell.method != "pretrain" and key in seen:
        return None
    seen.add(key)
    with _in_cell(path, cell, cfg):
        try:
            config = config_of(flags[1:])  # flags[0] is the subcommand, fit
            settings = resolve(config)
        except UserError as exc:
            if isinstance(exc.__cause__, ArgumentError):  # a flag jsonargparse refused: its innermost reason
                raise UserError(f"train.py refuses its flags: {_flag_reason(str(exc.__cause__))}") from None
            raise
    owned = {"run.root": (str(out), "root and name"), "run.name": (cell.name, "its size, method, direction and amount"),
             "run.stage": ("pretrain" if cell.method == "pretrain" else cell.method, "methods"),
             "trainer.max_steps": (cell_steps(cfg, cell), "pretrain_steps" if cell.method == "pretrain"
                                   else "amounts x epochs / batch_size")}
    if cell.method != "pretrain":
        owned |= {"run.direction": (cell.direction, "directions"), "run.tasks": (list(cfg.tasks), "tasks"),
                  "model.init_args.init_from": (str(pretrained_of(cfg, out, cell.size)),
                                                "pretrained, or the pretraining"),
                  "data.init_args.train_documents": (cell.amount, "amounts"),
                  "data.init_args.batch_size": (cfg.batch_size, "batch_size")}
    for key, (value, source) in owned.items():
        if settings.get(key) != value:
            raise AblationConfigError(f"{path}: cell {cell.name}: {_sources(cfg, cell)} set "
                                      f"{key.replace('init_args.', '')} to {settings.get(key)!r}, which the grid sets "
                                      f"itself ({value!r}, from {source}); drop it there")
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

    from contracts.run_artifacts import read_source
    from datamodules.world import world_config, world_differences
    from models.gpt import read_pretrained
    from training.checks import source_spec

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
    differ += [f"{k} {getattr(their_spec, k)} (grid: {getattr(spec, k)})"
               for k in ("n_layer", "n_embd", "n_head", "n_positions") if getattr(their_spec, k) != getattr(spec, k)]
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
            raise AblationConfigError(f"{path}: {cell_dir} holds no record of ablate.py's ({ASKED}), so it is not a "
                                      "cell this grid started and is neither deleted nor reused; move it away, or "
                                      "give the grid a new name")
