"""The settings of an ablation grid, from one YAML (AblationConfig), and their checks: each setting against
its range when it is read, then the grid whole (checks.py) before anything is created or trained.
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from safe_io.files import inside, read_yaml_mapping
from training.grid.checks import AblationConfigError, check_cells, check_finished
from user_errors import MissingInput, UserError

METHODS = ("sft", "dpo")
DIRECTIONS = ("favor", "disfavor")


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
    def load(cls, path: Path) -> AblationConfig:
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
            raise AblationConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                                      f"known: {', '.join(sorted(known))}")
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
        check_cells(cfg, path)
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
                    "methods": f"a method ({', '.join(METHODS)})",
                    "directions": f"a direction ({', '.join(DIRECTIONS)})",
                    "amounts": "an amount > 0 (documents or pairs; 0 = the pretrained model itself)"}
        for what, example in examples.items():
            if not getattr(self, what):
                raise AblationConfigError(f"{path}: {what} is empty, so the grid has no cells; list at least {example}")
        for size in self.sizes:  # a size names the directory of its cells: a known name only, never a path
            if size not in NAMED_SIZES:
                raise AblationConfigError(f"{path}: unknown model size {size!r} in sizes; choose from "
                                          f"{', '.join(NAMED_SIZES)} (set n_embd, n_head, ... in base_configs for "
                                          "other widths)")
        for method in [*self.methods, *self.method_overrides]:
            if method not in METHODS:
                raise AblationConfigError(f"{path}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        for direction in self.directions:
            if direction not in DIRECTIONS:
                raise AblationConfigError(f"{path}: unknown direction {direction!r}; "
                                          f"choose from {', '.join(DIRECTIONS)}")
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
                                   (self.pretrain_steps, "pretrain_steps", 1),
                                   (self.evals_per_cell, "evals_per_cell", 1),
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
                raise AblationConfigError(f"{path}: slurm.{key} is {value!r}, which is not "
                                          f"{_describe(SLURM_KEYS[key])}")
            least = 0 if key == "gpus_per_cell" else 1
            if SLURM_KEYS[key] is int and value < least:
                raise AblationConfigError(f"{path}: slurm.{key} must be >= {least}, got {value}")
            if SLURM_KEYS[key] is str and not value.strip():
                raise AblationConfigError(f"{path}: slurm.{key} is empty; give a name or leave the setting out")
        for flag in self.slurm.get("sbatch", []):
            if not SBATCH_FLAG.fullmatch(flag):
                raise AblationConfigError(f"{path}: slurm.sbatch flag {flag!r} is not of the form --name=value "
                                          "(e.g. --qos=normal)")

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
