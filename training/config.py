"""What a training run is asked to do, as typed objects: the stage registry, the `run` settings and
`TrainConfig`, which `train()` takes and `train.py`, the quickstart and the grid build."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safe_io.files import read_yaml_mapping
from user_errors import UserError


class RunConfigError(UserError):
    """A run setting is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class Stage:
    module: str  # class path of the LightningModule that trains it
    data: str  # class path of its LightningDataModule
    method: str  # the curves table's method column ("" for pretraining)
    needs_init: bool  # starts from a pretrained checkpoint (model.init_from)


LM_MODULE = "lightning_modules.lm_module.CausalLMModule"
GINC = "datamodules.ginc_datamodule.GincDataModule"
# A stage sets the classes of its run; a new kind of post-training is one more entry here
STAGES = {
    "pretrain": Stage(LM_MODULE, GINC, "", needs_init=False),
    "sft": Stage(LM_MODULE, GINC, "sft", needs_init=True),
    "dpo": Stage("lightning_modules.dpo.PreferenceModule", "datamodules.preference_datamodule.PreferenceDataModule",
                 "dpo", needs_init=True),
}
# the classes a run gets when nothing names its classes: a stage replaces them with its own
BASE_CLASSES = {"model": LM_MODULE, "data": GINC}
SUBCOMMANDS = ("fit", "validate")


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


@dataclass
class ClassConfig:
    """A class and the constructor settings given for it, as a Lightning config's model: and data: sections
    hold them. class_path None: the stage's class. Settings left out take the class's defaults (and, after
    pretraining, the pretrained model's world and architecture)."""

    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """One training run: the settings given for each part (run, model, data, trainer), the seed, and the
    checkpoint it continues (ckpt_path: a file, or `last` for the named run's own). `configs`: YAML files
    whose model and data sections lie under `model` and `data`; where a run starts from a pretrained model,
    their world and architecture give way to the model's, while a contradicting `model` or `data` setting
    is refused (`from_files` folds the files' run, trainer and seed in directly)."""

    configs: list[str] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    model: ClassConfig = field(default_factory=ClassConfig)
    data: ClassConfig = field(default_factory=ClassConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    seed_everything: int = 0
    ckpt_path: str | None = None

    @property
    def stage(self) -> Stage:
        if self.run.stage not in STAGES:
            raise RunConfigError(f"unknown run.stage {self.run.stage!r}; choose one of {', '.join(STAGES)}")
        return STAGES[self.run.stage]

    def sections(self) -> dict[str, ClassConfig]:
        """The model and data sections: the config files' under the settings given, the classes those name,
        else the stage's."""
        files = read_layers(self.configs)
        stage = self.stage
        own = {"model": stage.module, "data": stage.data}
        out = {}
        for group, given in (("model", self.model), ("data", self.data)):
            under = class_config(files.get(group), group, "config")
            path = given.class_path or under.class_path
            out[group] = ClassConfig(own[group] if path in (None, BASE_CLASSES[group]) else path,
                                     layered(under.init_args, given.init_args))
        return out

    def as_settings(self) -> dict[str, Any]:
        """The config as one nested mapping, the stage's classes filled in (a Lightning config's layout)."""
        return {"run": asdict(self.run), "seed_everything": self.seed_everything, "ckpt_path": self.ckpt_path,
                **{group: asdict(section) for group, section in self.sections().items()}, "trainer": dict(self.trainer)}

    def to_json(self) -> str:
        """The config as canonical JSON (`from_settings` reads it back): equal configs give equal text."""
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], what: str = "config") -> TrainConfig:
        """A TrainConfig from a nested mapping of settings (a YAML config's layout); unknown sections refused."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise RunConfigError(f"{what} has unknown section(s) {', '.join(unknown)}; the sections are "
                                 "configs, run, model, data, trainer, seed_everything and ckpt_path")
        run = settings.get("run") or {}
        bad = sorted(set(run) - {f.name for f in fields(RunConfig)})
        if bad:
            raise RunConfigError(f"{what}: unknown run setting(s) {', '.join(bad)}; the run settings are "
                                 f"{', '.join(f.name for f in fields(RunConfig))}")
        return cls(configs=[str(c) for c in settings.get("configs") or []], run=RunConfig(**run),
                   model=class_config(settings.get("model"), "model", what),
                   data=class_config(settings.get("data"), "data", what),
                   trainer=dict(settings.get("trainer") or {}), seed_everything=settings.get("seed_everything", 0),
                   ckpt_path=settings.get("ckpt_path"))

    @classmethod
    def from_files(cls, *paths: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """YAML configs layered in order (a later one's settings replace an earlier one's), then `overrides`:
        the settings asked for by name (a post-training run refuses one its pretrained model contradicts)."""
        files = read_layers(paths)
        given = nested(overrides or {})
        folded = {key: value for key, value in layered(files, given).items() if key not in ("model", "data")}
        return cls.from_settings({**folded, "configs": list(paths), "model": given.get("model"),
                                  "data": given.get("data")},
                                 "config " + ", ".join(map(str, paths)))


def read_layers(paths: Sequence[str | Path]) -> dict[str, Any]:
    """YAML configs layered in order, their model and data sections in class_path / init_args form."""
    merged: dict[str, Any] = {}
    for path in paths:
        config = read_yaml_mapping(Path(path), "config", RunConfigError)
        if not config:
            raise RunConfigError(f"config {path} is empty; give the run's settings (run, model, data, trainer), as "
                                 "configs/tiny.yaml does")
        merged = layered(merged, nested(config))
    return merged


def class_config(value: object, group: str, what: str) -> ClassConfig:
    """A model: or data: section, flat (settings only) or as class_path with init_args."""
    if value is None:
        return ClassConfig()
    if not isinstance(value, Mapping):
        raise RunConfigError(f"{what}: {group} must be a mapping of settings, got {value!r}")
    value = {k: v for k, v in value.items() if not str(k).startswith("__")}  # a parser's own keys (__path__)
    if "class_path" in value or "init_args" in value:
        return ClassConfig(value.get("class_path"), dict(value.get("init_args") or {}))
    return ClassConfig(None, dict(value))


def layered(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        mine = out.get(key)
        out[key] = layered(mine, value) if isinstance(value, Mapping) and isinstance(mine, Mapping) else value
    return out


def nested(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A config's model and data sections in class_path / init_args form, so that layers of either form merge."""
    out = dict(settings)
    for group in ("model", "data"):
        if isinstance(out.get(group), Mapping):
            section = class_config(out[group], group, "config")
            out[group] = {"init_args": section.init_args,
                          **({"class_path": section.class_path} if section.class_path else {})}
    return out
