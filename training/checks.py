"""The checks and resolutions a run's settings go through before anything is built or written: the stage's
starting point, the world and architecture a post-training run takes from its pretrained model, the
post-training mixture, the schedule, and a checkpoint to continue. All work on plain mappings of settings
(a Lightning config's layout, defaults filled in)."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contracts.run_artifacts import ARCH_KEYS, Source, read_source
from datamodules.world import world_config, world_differences
from models.gpt import SPEC_FIELDS, GPTSpec, read_checkpoint, read_pretrained, resolve_spec
from safe_io.files import inside
from training.config import STAGES, RunConfig, RunConfigError, Stage
from user_errors import MissingInput

Settings = dict[str, Any]


def post_training_weights(world_weights: Sequence[float], direction: str, tasks: Sequence[int]) -> list[float]:
    """The SFT mixture: the world's weights kept on `tasks` (favor) or on every other task (disfavor)."""
    n = len(world_weights)
    if not tasks or any(not 0 <= t < n for t in tasks):
        raise RunConfigError(f"run.tasks {list(tasks or [])} must name tasks of the world (0..{n - 1})")
    keep = [(i in tasks) == (direction == "favor") for i in range(n)]
    return [float(w) if k else 0.0 for w, k in zip(world_weights, keep)]


def check_stage(run: RunConfig, stage: Stage, model: Settings, data: Settings) -> None:
    """The classes and the starting point fit the stage."""
    if (model["class_path"], data["class_path"]) != (stage.module, stage.data):
        raise RunConfigError(f"stage {run.stage} trains {stage.module} on {stage.data}; drop the model or data "
                             "class_path your config sets, or add a stage for them to training.config.STAGES")
    init_from = model["init_args"].get("init_from")
    if stage.needs_init and not init_from:
        raise RunConfigError(f"stage {run.stage} starts from a pretrained model: set model.init_from to "
                             "runs/NAME/checkpoints/last.ckpt (or runs/NAME/hf)")
    if not stage.needs_init and init_from:
        raise RunConfigError(f"stage {run.stage} trains from scratch; "
                             "drop model.init_from or pick a post-training stage")


def inherit_pretrained(model: Settings, data: Settings, given_model: Mapping[str, Any],
                       given_data: Mapping[str, Any]) -> None:
    """A post-training run takes the architecture and the world of the run it starts from. `given_model` and
    `given_data` are the settings its config names: one that contradicts the pretrained model is refused,
    not silently replaced."""
    src = read_source(model["init_from"])
    if src.path.is_dir():
        read_pretrained(src.path)  # broken weights stop here, before the run directory exists
    contradiction = pretrained_contradiction(src, given_model, given_data)
    if contradiction:
        raise RunConfigError(f"{contradiction} in the pretrained model {src.path}; drop the setting: post-training "
                             "keeps the world, context length and architecture of the model it starts from")
    for key in ARCH_KEYS:
        model[key] = src.model.get(key)
    data["world"], data["context_length"] = dict(src.data["world"]), src.data["context_length"]


def pretrained_contradiction(src: Source, given_model: Mapping[str, Any], given_data: Mapping[str, Any]) -> str | None:
    """'<setting> <value> here, <value>' for the first world, context or architecture setting given that
    differs from the pretrained model's; None where all agree."""
    theirs = world_config(src.data.get("world"))
    given_world = group(given_data.get("world"), "data.world")
    if given_world:
        mine = world_config({**(src.data.get("world") or {}), **given_world}, "data.world.")
        for name, here, there in world_differences(mine, theirs):
            return f"data.world.{name} {shown(here)} here, {shown(there)}"
    context = given_data.get("context_length")
    if context is not None and context != src.data["context_length"]:
        return f"data.context_length {context} here, {src.data['context_length']}"
    there = source_spec(src)
    size = given_model.get("size")
    # a named size is its depth; widths are overridden beside it
    if size is not None and given_model.get("n_layer") is None:
        depth = resolve_spec(size).n_layer
        if depth != there.n_layer:
            return f"model.size {size} gives n_layer {depth} here, {there.n_layer}"
    for key in SPEC_FIELDS:
        value = given_model.get(key)
        if value is not None and value != getattr(there, key):
            return f"model.{key} {value} here, {getattr(there, key)}"
    vocab = given_model.get("vocab_size")
    if vocab is not None and vocab != src.model.get("vocab_size"):
        return f"model.vocab_size {vocab} here, {src.model.get('vocab_size')}"
    return None


def group(value: object, what: str) -> Settings:
    """A group of settings as a dict (None: no settings); anything but a mapping is refused, naming it."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise RunConfigError(f"{what} must be a mapping of settings, got {value!r}")


def source_spec(src: Source) -> GPTSpec:
    """The architecture a checkpoint or export was trained with."""
    return resolve_spec(src.model.get("size"), **{key: src.model.get(key) for key in SPEC_FIELDS})


def model_spec(model: Settings) -> GPTSpec:
    """The architecture a model section's settings resolve to."""
    return resolve_spec(model.get("size"), **{key: model.get(key) for key in SPEC_FIELDS})


def shown(value: object) -> str:
    """A setting's value in a message: weights to 4 digits, the rest as they are."""
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def resumed_contradiction(src: Source, run: RunConfig, spec: GPTSpec, model: Settings, data: Settings) -> str | None:
    """'<setting> <value> here, <value>' for the first way in which the run differs from the checkpoint it
    continues or validates: the module class, the world, the context length, the architecture."""
    their_module, my_module = src.model.get("_class_path"), STAGES[run.stage].module
    if their_module and their_module != my_module:
        stages = [name for name, other in STAGES.items() if other.module == their_module] or ["another"]
        return f"run.stage {run.stage} ({my_module}) here, a {' or '.join(stages)} run ({their_module})"
    world = world_config(group(data["world"], "data.world"), "data.world.")
    for name, here, there in world_differences(world, world_config(src.data.get("world"))):
        return f"data.world.{name} {shown(here)} here, {shown(there)}"
    if data["context_length"] != src.data["context_length"]:
        return f"data.context_length {data['context_length']} here, {src.data['context_length']}"
    there = source_spec(src)
    for key in SPEC_FIELDS:
        if getattr(spec, key) != getattr(there, key):
            return f"model.{key} {getattr(spec, key)} here, {getattr(there, key)}"
    vocab = model.get("vocab_size")
    if vocab is not None and vocab != src.model.get("vocab_size"):
        return f"model.vocab_size {vocab} here, {src.model.get('vocab_size')}"
    return None


def check_checkpoint_matches(ckpt: Path, run: RunConfig, spec: GPTSpec, model: Settings, data: Settings) -> None:
    """ckpt_path names a checkpoint of this run's world and model, or one line naming the first difference."""
    contradiction = resumed_contradiction(read_source(ckpt), run, spec, model, data)
    if contradiction:
        config = ckpt.resolve().parent.parent / "config.yaml"
        fix = f" (its run's config.yaml lists them: {config})" if config.is_file() else ""
        raise RunConfigError(f"{contradiction} in the checkpoint {ckpt}; ckpt_path continues or validates a run with "
                             f"the world and model it was trained on: give the settings it was trained with{fix}")


def checkpoint_of(run: RunConfig, ckpt_path: str | None) -> Path | None:
    """The file ckpt_path names (`last`: the named run's last.ckpt); `run_directory` has checked it exists."""
    if ckpt_path is None:
        return None
    return Path(run.root) / run.name / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)


def post_training_mixture(run: RunConfig, stage: Stage, data: Settings) -> None:
    """run.direction with run.tasks sets data.train_weights from the world's mixture."""
    if run.direction not in ("favor", "disfavor") or not stage.needs_init:
        raise RunConfigError(f"run.direction {run.direction!r} needs a post-training stage and one of favor, disfavor")
    if data.get("train_weights") is not None:
        raise RunConfigError("give either run.direction with run.tasks or data.train_weights, not both")
    world = world_config(group(data["world"], "data.world"), "data.world.")
    data["train_weights"] = post_training_weights(world.weights, run.direction, run.tasks or [])


def check_schedule(run: RunConfig, trainer: Settings) -> None:
    if run.checkpoint_every is not None and run.checkpoint_every < 1:
        raise RunConfigError(f"run.checkpoint_every must be >= 1 (training steps between last.ckpt saves), got "
                             f"{run.checkpoint_every}; leave it out to save at each validation")
    steps = trainer.get("max_steps")
    if steps is None or steps < 1:
        got = "" if steps is None else f", got {steps}"
        raise RunConfigError(f"set trainer.max_steps >= 1{got} (the GINC stream is endless, so it is the length of "
                             "training)")


def run_directory(run: RunConfig, ckpt_path: str | None, model_label: str, subcommand: str) -> Path:
    """runs/NAME: new for a fresh run (refused if it has checkpoints), the run's own to resume it; validate
    reads a run and writes its results beside it, in runs/NAME-validate-TIME."""
    run_dir = _run_directory(run, ckpt_path, model_label)
    if subcommand != "fit":
        return run_dir.parent / f"{run_dir.name}-{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_dir


def _run_directory(run: RunConfig, ckpt_path: str | None, model_label: str) -> Path:
    root = Path(run.root)
    if ckpt_path == "last" and run.name is None:
        raise RunConfigError("ckpt_path last needs run.name NAME (the run to resume), or give the checkpoint's path")
    if ckpt_path not in (None, "last"):
        if Path(ckpt_path).is_dir():
            raise RunConfigError(f"ckpt_path {ckpt_path} is a directory; pass a checkpoint file such as "
                                 "runs/NAME/checkpoints/last.ckpt (an hf/ export starts post-training: "
                                 "model.init_from)")
        if not Path(ckpt_path).is_file():
            raise MissingInput(f"ckpt_path {ckpt_path} does not exist; pass runs/NAME/checkpoints/last.ckpt, "
                               "or run.name NAME with ckpt_path last")
        read_checkpoint(ckpt_path)
        return inside(root, run.name, "run.name", "run.root") if run.name else Path(ckpt_path).resolve().parent.parent
    name = run.name or f"{model_label}-{run.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = inside(root, name, "run.name", "run.root")
    if ckpt_path is None and (run_dir / "checkpoints").exists():
        raise RunConfigError(f"run directory {run_dir} already has checkpoints; pick another run.name or resume it "
                             "with ckpt_path last")
    if ckpt_path == "last":
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise MissingInput(f"nothing to resume: {run_dir}/checkpoints/last.ckpt does not exist; check run.name")
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # a broken file stops here, with one line
    return run_dir
