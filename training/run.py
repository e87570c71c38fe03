"""One training run: `train(config) -> RunResult`. It checks the settings, makes the run directory, builds
the data, the model and the trainer, and trains (or validates). `train.py`, the quickstart and the
ablation grid all start runs through it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from contracts.run_artifacts import RunInfo
from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import world_config
from evaluation.ginc_curves import ideal_references
from lightning_modules.callbacks import CurvesWriter, FinalExport, RunLogger, StepProgressBar
from lightning_modules.lm_module import data_arguments
from models.gpt import GPTSpec, read_checkpoint, training_threads
from training.checks import (
    check_checkpoint_matches,
    check_schedule,
    check_stage,
    checkpoint_of,
    group,
    inherit_pretrained,
    model_spec,
    post_training_mixture,
    run_directory,
)
from training.config import SUBCOMMANDS, RunConfig, RunConfigError, Stage, TrainConfig
from training.console import CtrlC
from training.options import parse, resolve, settings_parser
from user_errors import UserError


@dataclass
class RunResult:
    """What a finished run left: its directory (config.yaml, checkpoints/, curves.csv, hf/, logs), the
    labels of its curve rows, its last logged metrics, and the datamodule it ran on."""

    run_dir: Path
    config: TrainConfig
    info: RunInfo
    metrics: dict[str, float]
    datamodule: L.LightningDataModule

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


def train(config: TrainConfig, subcommand: str = "fit") -> RunResult:
    """Train (`fit`) or score (`validate`) one run. Bad settings raise a one-line UserError before anything
    is written."""
    if subcommand not in SUBCOMMANDS:
        raise RunConfigError(f"unknown subcommand {subcommand!r}; choose one of {', '.join(SUBCOMMANDS)}")
    stage = config.stage
    settings = resolve(config)
    run = config.run
    plain = {"model": settings.model.as_dict(), "data": settings.data.as_dict()}
    check_stage(run, stage, plain["model"], plain["data"])
    if stage.needs_init:
        inherit_pretrained(plain["model"]["init_args"], plain["data"]["init_args"], config.model.init_args,
                           config.data.init_args)
    else:
        # finite and in range, named
        world_config(group(plain["data"]["init_args"]["world"], "data.world"), "data.world.")
    if run.direction is not None:
        post_training_mixture(run, stage, plain["data"]["init_args"])
    check_schedule(run, settings.trainer.as_dict())
    settings = parse(lambda parser: parser.parse_object(plain, cfg_base=settings))
    model_args, data_args = settings.model.init_args.as_dict(), settings.data.init_args.as_dict()
    torch.set_num_threads(training_threads(run.cpu_threads))
    spec = model_spec(model_args)
    run_dir = run_directory(run, config.ckpt_path, spec.label, subcommand)
    ckpt = checkpoint_of(run, config.ckpt_path)
    if ckpt is not None:
        check_checkpoint_matches(ckpt, run, spec, model_args, data_args)
    info = run_info(run, stage, spec, data_args)

    L.seed_everything(settings.seed_everything, workers=True)
    datamodule = build(settings.data.as_dict())
    module = build(settings.model.as_dict(), **module_arguments(datamodule))
    trainer_only = settings.clone()
    trainer_only.model = trainer_only.data = None
    # callbacks or a logger it names
    options = dict(parse(lambda parser: parser.instantiate_classes(trainer_only)).trainer)
    options["callbacks"] = [*(options.get("callbacks") or []), *run_callbacks(run, run_dir, info, datamodule, options),
                            SaveConfigCallback(settings_parser(), settings, overwrite=True)]
    options["logger"] = run_logger(options.get("logger"), run_dir, ckpt if subcommand == "fit" else None)
    options["default_root_dir"] = run_dir
    trainer = L.Trainer(**options)
    module.check_data(datamodule)
    if subcommand == "fit":
        print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
        if run.eval_at_start and config.ckpt_path is None:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    else:
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    return RunResult(run_dir, config, info, metrics, datamodule)


def build(section: dict, **linked: object) -> object:
    """An instance of a model: or data: section's class from its plain settings (so that the hyperparameters
    a checkpoint saves are plain values), with what the data fixes in the model passed in."""
    module, name = section["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    try:
        given = {key: value for key, value in section["init_args"].items() if value is not None or key not in linked}
        return cls(**{**linked, **given})  # a value given stays, so that the module can refuse one the data contradicts
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise RunConfigError(f"{section['class_path']} refuses its settings: {exc}") from None


def module_arguments(data: L.LightningDataModule) -> dict:
    """What the data fixes in the model: its vocabulary and ICL evaluation, and DPO's pairs."""
    linked = data_arguments(data) if isinstance(data, GincDataModule) else {}
    if hasattr(data, "train_pairs"):
        linked["train_pairs"] = data.train_pairs
    return linked


def run_info(run: RunConfig, stage: Stage, spec: GPTSpec, data: dict) -> RunInfo:
    """The labels of the run's curve rows."""
    amount = data.get("train_documents") or "stream"
    post = stage.needs_init
    return RunInfo(run=f"{spec.label}/{run.stage}" + (f"-{run.direction or 'mix'}-{amount}" if post else ""),
                   stage="posttrain" if post else "pretrain", method=stage.method, direction=run.direction or "",
                   amount=amount if post else "", layers=spec.n_layer, target=" ".join(map(str, run.tasks or [])))


def run_callbacks(run: RunConfig, run_dir: Path, info: RunInfo, data: L.LightningDataModule,
                  trainer: dict) -> list[L.Callback]:
    """The run's own callbacks: progress, last.ckpt on its schedule, best.ckpt, the curves table, the HF export
    at the end, and Ctrl-C."""
    # last.ckpt on its own schedule; best.ckpt only when a validation has just scored the weights it
    # saves (one callback for both saved step-225 weights with the step-200 score)
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                           every_n_train_steps=run.checkpoint_every, enable_version_counter=False)
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_top_k=1, enable_version_counter=False)
    references = (lambda device: ideal_references(data, device)) if isinstance(data, GincDataModule) else None
    bar = ([StepProgressBar(refresh_rate=trainer.get("log_every_n_steps") or 50)]
           if trainer.get("enable_progress_bar", True) is not False else [])
    return [*bar, last, best, CurvesWriter(run_dir / "curves.csv", info, references),
            FinalExport(run_dir, info, data.hparams), CtrlC()]


def run_logger(logger: object, run_dir: Path, resume: Path | None) -> object:
    """TensorBoard in the run directory unless the trainer settings name another logger (or none)."""
    if logger is not None and logger is not True:
        return logger
    # a resumed run logs again from its checkpoint's step: drop what an interrupted run logged after it
    purge = {"purge_step": int(read_checkpoint(resume)["global_step"]) + 1} if resume else {}
    # hp_metric: the HParams view lists the run's hyperparameters with its latest validation loss
    return RunLogger(save_dir=run_dir.parent, name=run_dir.name, version="", default_hp_metric=True, **purge)
