"""One training run: the stage registry (pretrain, SFT, DPO), the `run` settings, run directories, the
Lightning CLI that builds and trains the model, the quickstart, and bad input as one line.

`train.py` is the command line over it; the ablation grid (`training/grid.py`) runs its cells through it.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from safe_io.files import inside
from datamodules.ginc_datamodule import GincDataModule
from safe_io.files import read_yaml_mapping
from datamodules.world import world_config, world_differences
from evaluation.ginc_curves import ideal_references
from evaluation.quickstart_report import analyse_quickstart
from contracts.run_artifacts import ARCH_KEYS, RunInfo, Source, read_source
from lightning_modules.callbacks import CurvesWriter, FinalExport, RunLogger, StepProgressBar
from models.gpt import (SPEC_FIELDS, GPTSpec, read_checkpoint, read_pretrained, resolve_device, resolve_spec,
                                  training_threads)
from lightning_modules.lm_module import CausalLMModule, icl_eval_of
from user_errors import MissingInput, UserError


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class RunConfigError(UserError):
    """A run setting is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class Stage:
    module: str  # class path of the LightningModule that trains it
    data: str  # class path of its LightningDataModule
    method: str  # the curves table's method column ("" for pretraining)
    needs_init: bool  # starts from a pretrained checkpoint (model.init_from)


GINC = "datamodules.ginc_datamodule.GincDataModule"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# A stage sets the classes of its run; a new kind of post-training is one more entry here
STAGES = {
    "pretrain": Stage("lightning_modules.lm_module.CausalLMModule", GINC, "", needs_init=False),
    "sft": Stage("lightning_modules.lm_module.CausalLMModule", GINC, "sft", needs_init=True),
    "dpo": Stage("lightning_modules.dpo.PreferenceModule", "datamodules.preference_datamodule.PreferenceDataModule", "dpo", needs_init=True),
}


@dataclass
class RunConfig:
    """stage: pretrain, sft or dpo. name: the run directory under root (default <model>-<stage>-<time>).
    direction/tasks: post-training favours (trains on `tasks` only) or disfavours (trains on all but
    `tasks`) and sets data.train_weights from the world's weights. checkpoint_every: steps between
    last.ckpt saves (default: at each validation). eval_at_start: validate before the first step.
    cpu_threads: torch's CPU threads for the run (default one: see models.gpt.training_threads)."""

    stage: str = "pretrain"
    name: str | None = None
    root: str = "runs"
    direction: str | None = None
    tasks: list[int] | None = None
    checkpoint_every: int | None = None
    eval_at_start: bool = True
    cpu_threads: int | None = None


def post_training_weights(world_weights: Sequence[float], direction: str, tasks: Sequence[int]) -> list[float]:
    """The SFT mixture: the world's weights kept on `tasks` (favor) or on every other task (disfavor)."""
    n = len(world_weights)
    if not tasks or any(not 0 <= t < n for t in tasks):
        raise RunConfigError(f"run.tasks {list(tasks or [])} must name tasks of the world (0..{n - 1})")
    keep = [(i in tasks) == (direction == "favor") for i in range(n)]
    return [float(w) if k else 0.0 for w, k in zip(world_weights, keep)]


def stage_of(argv: Sequence[str]) -> Stage:
    """The stage that `--run.stage`, `--run` (a file or inline YAML) and `run.stage` in `--config` files
    name (the last one wins, as in the parse itself); pretraining where none does."""
    options = [tuple(arg.split("=", 1)) if arg.startswith("--") and "=" in arg else (arg, value)
               for arg, value in zip(argv, [*argv[1:], ""])]
    name = "pretrain"
    for option, value in options:
        if option == "--run.stage":
            name = value
            continue
        if option in ("--config", "-c") and Path(value).is_file():
            config = read_yaml_mapping(Path(value), "config", RunConfigError)
            if not config:  # jsonargparse's own word for it is "Unexpected config:"
                raise RunConfigError(f"config {value} is empty; give the run's settings (run, model, data, trainer), as configs/tiny.yaml does")
            run = config.get("run")
        elif option == "--run":  # a file, or inline YAML such as --run '{stage: dpo, tasks: [0]}'
            run = read_yaml_mapping(Path(value), "config", RunConfigError) if Path(value).is_file() else _inline(value)
        else:
            continue
        if isinstance(run, dict):
            name = run.get("stage", name)
    if name not in STAGES:
        raise RunConfigError(f"unknown run.stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]


def _inline(text: str) -> object:
    """Inline YAML, or None where it does not parse (the parse itself reports that)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


# options whose value may be a YAML file of settings (jsonargparse reads a file given to any group)
CONFIG_OPTIONS = ("--config", "-c", "--model", "--data", "--run", "--trainer", "--model.optim", "--data.world", "--data.icl")


def check_config_paths(argv: Sequence[str]) -> None:
    """A config option given a directory is named as one (jsonargparse would say only that it is not a file)."""
    for arg, value in zip(argv, [*argv[1:], ""]):
        option, value = arg.split("=", 1) if arg.startswith("--") and "=" in arg else (arg, value)
        if option in CONFIG_OPTIONS and value and Path(value).is_dir():
            raise RunConfigError(f"{option} {value} is a directory; a config must be a YAML file (such as "
                                 f"{'configs/model/gpt2-2l.yaml' if option == '--model' else 'configs/tiny.yaml'})")


def with_stage_classes(argv: Sequence[str]) -> list[str]:
    """argv with the stage's module and datamodule classes set right after the subcommand, so that the
    configs and flags after it fill in their settings."""
    check_config_paths(argv)
    at = next((i for i, arg in enumerate(argv) if arg in SUBCOMMANDS), None)
    if at is None:  # --help, --version: nothing to set
        return list(argv)
    stage = stage_of(argv[at + 1:])
    return [*argv[:at + 1], "--model", stage.module, "--data", stage.data, *argv[at + 1:]]


def check_stage(run: RunConfig, stage: Stage, model: Namespace, data: Namespace) -> None:
    """The classes and the starting point fit the stage."""
    if (model.class_path, data.class_path) != (stage.module, stage.data):
        raise RunConfigError(f"stage {run.stage} trains {stage.module} on {stage.data}; drop the model or data class_path "
                             "your config sets, or add a stage for them to train.STAGES")
    if stage.needs_init and not model.init_args.init_from:
        raise RunConfigError(f"stage {run.stage} starts from a pretrained model: pass --model.init_from runs/NAME/checkpoints/last.ckpt (or runs/NAME/hf)")
    if not stage.needs_init and model.init_args.init_from:
        raise RunConfigError(f"stage {run.stage} trains from scratch; drop model.init_from or pick a post-training stage")


def settings(value: object, what: str) -> dict:
    """A group of parsed settings (a Namespace, or the plain dict jsonargparse falls back to when a value does
    not fit the group's dataclass) as a dict; None as no settings."""
    if value is None:
        return {}
    if isinstance(value, Namespace):
        return value.as_dict()
    if isinstance(value, dict):
        return dict(value)
    raise RunConfigError(f"{what} must be a mapping of settings, got {value!r}")


def inherit_pretrained(model: Namespace, data: Namespace, given_model: dict, given_data: dict) -> None:
    """A post-training run takes the architecture and the world of the run it starts from, over what its
    configs say. `given_model` and `given_data` are the settings its flags name (`flag_settings`): one
    that contradicts the pretrained model is refused, not silently replaced."""
    src = read_source(model.init_from)
    if src.path.is_dir():
        read_pretrained(src.path)  # broken weights stop here, before the run directory exists
    contradiction = pretrained_contradiction(src, given_model, given_data)
    if contradiction:
        raise RunConfigError(f"{contradiction} in the pretrained model {src.path}; drop the flag: post-training keeps "
                             "the world, context length and architecture of the model it starts from")
    for key in ARCH_KEYS:
        setattr(model, key, src.model.get(key))
    data.world, data.context_length = Namespace(**src.data["world"]), src.data["context_length"]


def pretrained_contradiction(src: Source, given_model: dict, given_data: dict) -> str | None:
    """'<setting> <value> here, <value>' for the first world, context or architecture setting a flag gives
    that differs from the pretrained model's; None where all agree."""
    theirs = world_config(src.data.get("world"))
    given_world = settings(given_data.get("world"), "data.world")
    if given_world:
        mine = world_config({**(src.data.get("world") or {}), **given_world}, "data.world.")
        for name, here, there in world_differences(mine, theirs):
            return f"data.world.{name} {shown(here)} here, {shown(there)}"
    context = given_data.get("context_length")
    if context is not None and context != src.data["context_length"]:
        return f"data.context_length {context} here, {src.data['context_length']}"
    there = source_spec(src)
    size = given_model.get("size")
    if size is not None and given_model.get("n_layer") is None:  # a named size is its depth; widths are overridden beside it
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


def source_spec(src: Source) -> GPTSpec:
    """The architecture a checkpoint or export was trained with."""
    return resolve_spec(src.model.get("size"), **{key: src.model.get(key) for key in SPEC_FIELDS})


def shown(value: object) -> str:
    """A setting's value in a message: weights to 4 digits, the rest as they are."""
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return str(value)


def resumed_contradiction(src: Source, run: RunConfig, spec: GPTSpec, model: Namespace, data: Namespace) -> str | None:
    """'<setting> <value> here, <value>' for the first way in which the run differs from the checkpoint it
    continues or validates: the module class, the world, the context length, the architecture."""
    their_module, my_module = src.model.get("_class_path"), STAGES[run.stage].module
    if their_module and their_module != my_module:
        stages = [name for name, other in STAGES.items() if other.module == their_module] or ["another"]
        return f"run.stage {run.stage} ({my_module}) here, a {' or '.join(stages)} run ({their_module})"
    world = world_config(settings(data.world, "data.world"), "data.world.")
    for name, here, there in world_differences(world, world_config(src.data.get("world"))):
        return f"data.world.{name} {shown(here)} here, {shown(there)}"
    if data.context_length != src.data["context_length"]:
        return f"data.context_length {data.context_length} here, {src.data['context_length']}"
    there = source_spec(src)
    for key in SPEC_FIELDS:
        if getattr(spec, key) != getattr(there, key):
            return f"model.{key} {getattr(spec, key)} here, {getattr(there, key)}"
    if model.vocab_size is not None and model.vocab_size != src.model.get("vocab_size"):
        return f"model.vocab_size {model.vocab_size} here, {src.model.get('vocab_size')}"
    return None


def check_checkpoint_matches(ckpt: Path, run: RunConfig, spec: GPTSpec, model: Namespace, data: Namespace) -> None:
    """--ckpt_path names a checkpoint of this run's world and model, or one line naming the first difference."""
    contradiction = resumed_contradiction(read_source(ckpt), run, spec, model, data)
    if contradiction:
        config = ckpt.resolve().parent.parent / "config.yaml"
        fix = f" (its run's config.yaml lists them: {config})" if config.is_file() else ""
        raise RunConfigError(f"{contradiction} in the checkpoint {ckpt}; --ckpt_path continues or validates a run with the "
                             f"world and model it was trained on: give the settings it was trained with{fix}")


def checkpoint_of(run: RunConfig, ckpt_path: str | None) -> Path | None:
    """The file --ckpt_path names (`last`: the named run's last.ckpt); `_run_directory` has checked it exists."""
    if ckpt_path is None:
        return None
    return Path(run.root) / run.name / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)


def post_training_mixture(run: RunConfig, stage: Stage, data: Namespace) -> None:
    """run.direction with run.tasks sets data.train_weights from the world's mixture."""
    if run.direction not in ("favor", "disfavor") or not stage.needs_init:
        raise RunConfigError(f"run.direction {run.direction!r} needs a post-training stage and one of favor, disfavor")
    if data.train_weights is not None:
        raise RunConfigError("give either run.direction with run.tasks or data.train_weights, not both")
    world = world_config(settings(data.world, "data.world"), "data.world.")
    data.train_weights = post_training_weights(world.weights, run.direction, run.tasks or [])


def check_schedule(run: RunConfig, trainer: Namespace) -> None:
    if run.checkpoint_every is not None and run.checkpoint_every < 1:
        raise RunConfigError(f"run.checkpoint_every must be >= 1 (training steps between last.ckpt saves), got "
                             f"{run.checkpoint_every}; leave it out to save at each validation")
    if trainer.max_steps is None or trainer.max_steps < 1:
        got = "" if trainer.max_steps is None else f", got {trainer.max_steps}"
        raise RunConfigError(f"set trainer.max_steps >= 1{got} (the GINC stream is endless, so it is the length of training)")


def run_directory(run: RunConfig, ckpt_path: str | None, model_label: str, subcommand: str) -> Path:
    """runs/NAME: new for a fresh run (refused if it has checkpoints), the run's own to resume it; validate
    and predict read a run and write their results beside it, in runs/NAME-validate-TIME."""
    run_dir = _run_directory(run, ckpt_path, model_label)
    if subcommand != "fit":
        return run_dir.parent / f"{run_dir.name}-{subcommand}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_dir


def _run_directory(run: RunConfig, ckpt_path: str | None, model_label: str) -> Path:
    root = Path(run.root)
    if ckpt_path == "last" and run.name is None:
        raise RunConfigError("--ckpt_path last needs --run.name NAME (the run to resume), or give the checkpoint's path")
    if ckpt_path not in (None, "last"):
        if Path(ckpt_path).is_dir():
            raise RunConfigError(f"ckpt_path {ckpt_path} is a directory; pass a checkpoint file such as runs/NAME/checkpoints/last.ckpt "
                                 "(an hf/ export starts post-training: --model.init_from)")
        if not Path(ckpt_path).is_file():
            raise MissingInput(f"ckpt_path {ckpt_path} does not exist; pass runs/NAME/checkpoints/last.ckpt or --run.name NAME --ckpt_path last")
        read_checkpoint(ckpt_path)
        return inside(root, run.name, "--run.name", "--run.root") if run.name else Path(ckpt_path).resolve().parent.parent
    name = run.name or f"{model_label}-{run.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = inside(root, name, "--run.name", "--run.root")
    if ckpt_path is None and (run_dir / "checkpoints").exists():
        raise RunConfigError(f"run directory {run_dir} already has checkpoints; pick another --run.name or resume it with --ckpt_path last")
    if ckpt_path == "last":
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise MissingInput(f"nothing to resume: {run_dir}/checkpoints/last.ckpt does not exist; check --run.name")
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # a broken file stops here, with one line
    return run_dir


def run_info(run: RunConfig, stage: Stage, spec: GPTSpec, data: Namespace) -> RunInfo:
    """The labels of the run's curve rows."""
    amount = data.train_documents or "stream"
    post = stage.needs_init
    return RunInfo(run=f"{spec.label}/{run.stage}" + (f"-{run.direction or 'mix'}-{amount}" if post else ""),
                   stage="posttrain" if post else "pretrain", method=stage.method, direction=run.direction or "",
                   amount=amount if post else "", layers=spec.n_layer, target=" ".join(map(str, run.tasks or [])))


def flag_settings(parser: object, argv: Sequence[str]) -> Namespace:
    """The settings the flags name themselves: argv parsed without its --config files and without defaults.
    A config file's world and model sections give way to a pretrained model's (the stage configs say so); a
    flag asks for its value, so post-training refuses one that the pretrained model contradicts."""
    flags, skip = [], False
    for arg in argv:
        if skip or arg in ("--config", "-c") or arg.startswith("--config="):
            skip = arg in ("--config", "-c")
            continue
        flags.append(arg)
    try:
        return parser.parse_args(flags, defaults=False)
    except (ArgumentError, ValueError):  # a flag that needs its config to parse: judge the configs' settings too
        return parser.parse_args(list(argv), defaults=False)


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        # what the data fixes in the model, from the instantiated datamodule
        for target, compute in (("vocab_size", lambda data: data.world.model_vocab_size), ("icl_eval", icl_eval_of)):
            parser.link_arguments("data", f"model.init_args.{target}", compute_fn=compute, apply_on="instantiate")
        # DPO's pairs; jsonargparse skips the link where the datamodule has no train_pairs (the other stages)
        parser.link_arguments("data.train_pairs", "model.init_args.train_pairs", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        argv = with_stage_classes(sys.argv[1:] if args is None else args)
        self.config = parser.parse_args(argv)
        subcommand = self.config.get("subcommand")
        starts_from = subcommand and self.config[subcommand].get("model.init_args.init_from")
        self.given = flag_settings(parser, argv).get(subcommand) if starts_from else None

    def _parse_ckpt_path(self) -> None:
        """Lightning would load a --ckpt_path file here (weights-only, so a broken one is a traceback) and put
        its model settings over the ones given, silently and only for a path (not for `last`). train.py keeps
        the settings given and checks in `before_instantiate_classes` that the checkpoint is readable and of
        the same world and model."""

    def given_settings(self, group: str) -> dict:
        given = self.given.get(f"{group}.init_args") if self.given is not None else None
        return settings(given, group)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run, model, data = cfg.run, cfg.model.init_args, cfg.data.init_args
        stage = STAGES[run.stage]
        check_stage(run, stage, cfg.model, cfg.data)
        if stage.needs_init:
            inherit_pretrained(model, data, self.given_settings("model"), self.given_settings("data"))
        else:
            world_config(settings(data.world, "data.world"), "data.world.")  # finite and in range, named by flag
        if run.direction is not None:
            post_training_mixture(run, stage, data)
        check_schedule(run, cfg.trainer)
        torch.set_num_threads(training_threads(run.cpu_threads))
        spec = resolve_spec(model.size, **{key: getattr(model, key) for key in SPEC_FIELDS})
        self.run_dir = run_directory(run, cfg.get("ckpt_path"), spec.label, self.subcommand)
        ckpt = checkpoint_of(run, cfg.get("ckpt_path"))
        if ckpt is not None:
            check_checkpoint_matches(ckpt, run, spec, model, data)
        self.run_info = run_info(run, stage, spec, data)

    def instantiate_trainer(self, **kwargs) -> object:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run = cfg.run
        # last.ckpt on its own schedule; best.ckpt only when a validation has just scored the weights it
        # saves (one callback for both saved step-225 weights with the step-200 score)
        ckpt = ModelCheckpoint(dirpath=self.run_dir / "checkpoints", save_top_k=0, save_last=True,
                               every_n_train_steps=run.checkpoint_every, enable_version_counter=False)
        best = ModelCheckpoint(dirpath=self.run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                               save_top_k=1, enable_version_counter=False)
        data = self.datamodule
        references = (lambda device: ideal_references(data, device)) if isinstance(data, GincDataModule) else None
        bar = [StepProgressBar(refresh_rate=cfg.trainer.get("log_every_n_steps") or 50)] if cfg.trainer.get("enable_progress_bar", True) is not False else []
        mine = [*bar, ckpt, best, CurvesWriter(self.run_dir / "curves.csv", self.run_info, references),
                FinalExport(self.run_dir, self.run_info, data.hparams), CtrlC()]
        trainer_cfg = cfg.trainer
        callbacks = [*(trainer_cfg.get("callbacks") or []), *mine]
        logger = trainer_cfg.get("logger")
        if logger is None or logger is True:
            # a resumed run logs again from its checkpoint's step: drop what an interrupted run logged after it
            resume = cfg.get("ckpt_path") if self.subcommand == "fit" else None
            if resume == "last":
                resume = self.run_dir / "checkpoints" / "last.ckpt"
            purge = {"purge_step": int(read_checkpoint(resume)["global_step"]) + 1} if resume else {}
            # hp_metric: the HParams view lists the run's hyperparameters with its latest validation loss
            logger = RunLogger(save_dir=self.run_dir.parent, name=self.run_dir.name, version="",
                               default_hp_metric=True, **purge)
        return super().instantiate_trainer(callbacks=callbacks, logger=logger, default_root_dir=self.run_dir, **kwargs)

    def before_fit(self) -> None:
        self.model.check_data(self.datamodule)
        cfg = self.config_init[self.subcommand]
        print(f"run directory: {self.run_dir}  (tensorboard --logdir {self.run_dir.parent})")
        if cfg.run.eval_at_start and cfg.get("ckpt_path") is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)


# the quickstart's post-training: (direction, documents), each document seen once in batches of 16
QUICKSTART_SFT = (("favor", 128), ("favor", 512), ("favor", 2048), ("disfavor", 512))


def run_quickstart(root: str = "runs", overrides: Sequence[str] = ()) -> None:
    """Pretrain a small GPT-2 on the small gradual world with demonstrations in its data, SFT it to favour
    task 0 at three amounts and to disfavour it at one, and print each model's ICL curve beside both ideal
    learners, task 0's fitted prior along the way, and when the suppressed tasks re-emerge
    (configs/small-gradual.yaml, configs/small-demos.yaml, configs/quickstart*.yaml). `overrides`: train.py
    flags for every run (the tests shorten it so)."""
    began = time.perf_counter()
    on_gpu = resolve_device("auto") == "cuda"
    world = [a for c in ("small-gradual", "small-demos", "quickstart") for a in ("--config", str(CONFIGS / f"{c}.yaml"))]
    common = ["--run.root", root, *(["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"] if on_gpu else []),
              *overrides]
    name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    pre = cli_main(["fit", *world, "--run.name", f"{name}/pretrain", *common])
    posts = {}
    for direction, amount in QUICKSTART_SFT:
        steps = str(amount // 16)
        label = f"after SFT-{direction.replace('favor', 'favour')} {amount}"
        posts[label] = cli_main(
            ["fit", *world, "--config", str(CONFIGS / "quickstart-sft.yaml"), "--run.direction", direction,
             "--data.train_documents", str(amount), "--trainer.max_steps", steps, "--trainer.val_check_interval", steps,
             "--model.init_from", str(pre.run_dir / "checkpoints" / "last.ckpt"),
             "--run.name", f"{name}/sft-{direction}-{amount}", *common])
    loss = {key: pre.trainer.callback_metrics[key].item() for key in ("val/loss", "val/excess_loss")}
    favoured = next(iter(posts.values())).config_init["fit"].run.tasks
    out = pre.run_dir.parent
    print(analyse_quickstart({"pretrained": pre.run_dir, **{label: run.run_dir for label, run in posts.items()}},
                             pre.datamodule, favoured, min(pre.datamodule.icl.k_values), loss, out / "analysis"))
    print(f"\nquickstart took {time.perf_counter() - began:.0f} s on {'GPU' if on_gpu else 'CPU'}; runs and analysis "
          f"(curves.csv, shift/, reader_prior.csv) in {out} (tensorboard --logdir {root})")


HELP = f"""Train GPT-2 on the GINC world. `python train.py` with no arguments runs the quickstart (a small
pretraining and SFT run on the CPU or GPU, then ICL curves beside both ideal learners). Otherwise:
`python train.py fit --config configs/pretrain.yaml [--run.stage {{{','.join(STAGES)}}}] ...`. Stages:
pretrain (from scratch), sft and dpo (from --model.init_from, favouring or disfavouring --run.tasks).
`python train.py fit --help` lists every option with its default; the model's own options (size, n_embd,
optim.lr, ...) are listed by `python train.py fit --model.help CausalLMModule`."""


def cli_main(args: Sequence[str] | None) -> TrainCLI:
    """The CLI on `args`, or on the command line itself when None. A bad flag is a UserError of one line,
    and a setting a class refused is that class's own UserError; anything else keeps its traceback."""
    try:
        return _cli(args)
    except UserError:
        raise
    except (ArgumentError, ValueError) as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise cause from None
        if isinstance(exc, ArgumentError):
            raise UserError(f"{flag_error(str(exc))} (`python train.py fit --help` lists every option)") from exc
        raise


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a class raised while jsonargparse built it (jsonargparse wraps it in its Union check),
    or None where there is none."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    return cause


def _cli(args: Sequence[str] | None, cli: type[TrainCLI] = TrainCLI) -> TrainCLI:
    return cli(CausalLMModule, GincDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    args=None if args is None else list(args),
                    # a bad flag raises, so main() can say it in one line instead of printing the whole usage
                    parser_kwargs={"description": HELP, "default_env": False, "exit_on_error": False},
                    # the module's optimizer is --model.optim (AdamW with warmup and cosine decay); Lightning's
                    # generic --optimizer/--lr_scheduler would be built before the model has its parameters
                    auto_configure_optimizers=False,
                    seed_everything_default=0,  # same seed, same initial weights: runs compare and resume exactly
                    trainer_defaults={"use_distributed_sampler": False},  # the datamodule shards by rank itself
                    save_config_kwargs={"overwrite": True})


class _Parsed(Exception):
    pass


@functools.cache
def train_parser() -> object:
    """train.py's argument parser, built as cli_main builds it, stopped before it parses: to check a flag list
    (a grid's cells) without building or training anything."""

    class ParserOnly(TrainCLI):
        def parse_arguments(self, parser: object, args: object) -> None:
            raise _Parsed(parser)

    try:
        _cli([], ParserOnly)
    except _Parsed as got:
        return got.args[0]
    raise RuntimeError("TrainCLI no longer parses through parse_arguments")


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def flag_error(message: str) -> str:
    """jsonargparse's report of a bad flag or config value, on one line: the key and, for a model or data
    setting, the reason its class gave (not the list of every type the key could have been)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if _UNION_ERROR in message:
        start = next((i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path")), None)
        if start is not None:
            reason = []
            for line in lines[start + 1:]:
                if line.startswith(("- ", "Given value")):
                    break
                reason.append(line)
            lines = [lines[0].rstrip(":") + ":", *reason]
    return " ".join(lines)


class _NoTips(logging.Filter):
    """Drop Lightning's advertisement for a cloud logger from every run's output, and its Ctrl-C notice
    (train.py says itself in one line what was kept and how to resume)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "Detected KeyboardInterrupt" not in message


class CtrlC(Callback):
    """Ctrl-C that is never lost. Python drops a KeyboardInterrupt raised while a finalizer or weakref
    callback runs (it prints "Exception ignored" and goes on), and a run then trained on; `watch()`
    installs a SIGINT handler that also records the request, and this callback raises it again at the
    next training or validation step, where Lightning stops the run cleanly."""

    requested = False

    @classmethod
    def watch(cls) -> None:
        """Before a run: forget an earlier Ctrl-C, and take over SIGINT if Python's own handler has it."""
        cls.requested = False
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # ignored (a background job), someone else's, or already ours: leave it
        def on_sigint(signum: int, frame: object) -> None:
            cls.requested = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        previous = sys.unraisablehook

        def quiet(unraisable: object) -> None:  # a swallowed Ctrl-C is raised again: no report of it
            if not isinstance(unraisable.exc_value, KeyboardInterrupt):
                previous(unraisable)

        sys.unraisablehook = quiet

    def _check(self, *args: object) -> None:
        if CtrlC.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = _check


def quiet_lightning() -> None:
    """Drop the log lines no user of train.py can act on; TF32 for what runs outside bf16 autocast on GPUs."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())
    # Lightning's pytree helper uses a torch API that torch deprecated; it warns in every run
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    torch.set_float32_matmul_precision("high")
