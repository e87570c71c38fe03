"""What a training run leaves behind for evaluation, and how it is read back.

A run's checkpoints hold the module's and the datamodule's hyperparameters and the run's `RunInfo`;
its HF export (<run>/hf) holds the weights, a tokenizer, and `ginc_data.json` with the datamodule
settings, the RunInfo and the step. `read_source` reads either into one `Source`, so curves measured
later carry the run's own labels, and post-training starts from the pretrained run's architecture
and world.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from datamodules.ginc_datamodule import GincDataModule
from datamodules.world import world_config, world_tokenizer
from models.gpt import SPEC_FIELDS, read_checkpoint, spec_of
from safe_io.files import EXPORT_DATA_FILE, atomic_dir
from user_errors import MissingInput, UserError

RUN_INFO_KEY = "run_info"  # in a checkpoint, and in DATA_FILE
DATA_FILE = EXPORT_DATA_FILE  # beside an HF export: the datamodule settings it was trained on, its RunInfo and step
ARCH_KEYS = ("size", *SPEC_FIELDS, "vocab_size")  # the model's flags that fix its architecture
_DATA_KEYS = tuple(inspect.signature(GincDataModule.__init__).parameters)[1:]


def plain(value: object) -> object:
    """Dataclasses (e.g. WorldConfig) and numpy scalars inside hyperparameters -> JSON/YAML-friendly values."""
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


@dataclass
class RunInfo:
    """What a run's curve rows carry besides the contract's columns."""

    run: str  # curves-table label, e.g. gpt2-4l/pretrain, gpt2-4l/sft-favor-500
    stage: str  # pretrain | posttrain
    method: str  # "" for pretraining, else sft (dpo, ...)
    direction: str  # favor | disfavor | "" (pretraining)
    amount: int | str  # post-training documents, "" for pretraining
    layers: int
    target: str  # favoured/disfavoured tasks, space separated

    def columns(self, step: int) -> dict[str, object]:
        return {"step": step, "stage": self.stage, "method": self.method, "direction": self.direction,
                "amount": self.amount, "layers": self.layers, "target": self.target}


@dataclass
class Source:
    """What a checkpoint or HF export of a run says about itself."""

    path: Path
    model: dict  # the module's hyperparameters: ARCH_KEYS at least
    data: dict  # the GincDataModule arguments it was trained with
    info: RunInfo | None  # labels of its curve rows
    step: int

    @property
    def label(self) -> str:
        """The run's curves-table label, or the file's name for a source without RunInfo."""
        return self.info.run if self.info else self.path.stem

    def columns(self) -> dict[str, object]:
        """The extra columns of its curve rows."""
        return self.info.columns(self.step) if self.info else {"step": self.step}


def write_export(run_dir: Path, gpt: GPT2LMHeadModel, data_hparams: dict, info: RunInfo, step: int) -> Path:
    """Write <run_dir>/hf: the model by `save_pretrained`, the world's tokenizer and DATA_FILE; swapped in
    whole, so a reader never sees half an export."""
    path = run_dir / "hf"
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in every run's output
    with atomic_dir(path) as tmp:
        gpt.save_pretrained(tmp)
        # token ids: emissions, then PAD and BOS (WorldConfig.model_vocab_size = vocab_size + 2)
        world_tokenizer(gpt.config.vocab_size - 2).save_pretrained(tmp)
        export = {"data": plain(dict(data_hparams)), RUN_INFO_KEY: asdict(info), "step": step}
        (tmp / DATA_FILE).write_text(json.dumps(export, indent=1))
    return path


# the checkpoint key that names the LightningModule class of the run that wrote it
MODULE_CLASS_KEY = "module_class"


def read_source(path: str | Path) -> Source:
    """A run's checkpoint (.ckpt) or HF export directory, or one clear error that names the file at fault."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / DATA_FILE).is_file():
            raise MissingInput(f"{path} is not an HF export of a run (needs config.json and {DATA_FILE}); "
                               "point at a run's hf/ directory or a .ckpt")
        config = _read_json(path / "config.json")
        try:
            config = GPT2Config.from_dict(config)
            model = {"size": None, **asdict(spec_of(config)), "vocab_size": config.vocab_size}
        except (TypeError, ValueError, AttributeError) as exc:
            raise _broken(path / "config.json",
                          f"not a GPT-2 config: {type(exc).__name__}: {_first_line(exc)}") from None
        meta = _read_json(path / DATA_FILE)
        where = path / DATA_FILE
        data, info, step = meta.get("data"), meta.get(RUN_INFO_KEY), meta.get("step", 0)
    elif path.is_file():
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict) or "datamodule_hyper_parameters" not in ckpt:
            raise UserError(f"{path} was not written by train.py (no GINC datamodule settings inside); "
                            "use a run's checkpoint")
        where, model, data = path, ckpt.get("hyper_parameters"), ckpt["datamodule_hyper_parameters"]
        if not isinstance(model, dict):
            raise _broken(path, "its model settings (hyper_parameters) are not a mapping")
        model, info, step = plain(dict(model)), ckpt.get(RUN_INFO_KEY), ckpt.get("global_step", 0)
        model.setdefault("_class_path", ckpt.get(MODULE_CLASS_KEY))  # older checkpoints keep it in their settings
    else:
        raise MissingInput(f"checkpoint {path} does not exist; pass a run's checkpoints/last.ckpt (or best.ckpt) "
                           "or its hf/ directory")
    if not isinstance(data, dict) or not isinstance(data.get("context_length"), int):
        raise _broken(where, "it does not record the data settings the run was trained on "
                             "(data: world, context_length, ...)")
    data = {k: v for k, v in plain(dict(data)).items() if k in _DATA_KEYS}
    try:
        world_config(data.get("world"), "data.world.")
    except UserError as exc:
        raise _broken(where, f"the world it records is not one: {exc}") from None
    if info:
        try:
            info = RunInfo(**info)
        except TypeError as exc:
            raise _broken(where, f"its run labels ({RUN_INFO_KEY}) do not fit: {_first_line(exc)}") from None
    else:
        info = None
    if not isinstance(step, int) or isinstance(step, bool):
        raise _broken(where, f"its step is {step!r}, not a whole number")
    return Source(path, model, data, info, step)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:120]


def _broken(path: Path, why: str) -> UserError:
    return UserError(f"{path} cannot be read back: {why}; export the run again (train.py writes it) "
                     "or pass another checkpoint")


def _read_json(path: Path) -> dict:
    """A JSON object from a file of an export, or one line naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise _broken(path, f"it cannot be opened ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise _broken(path, f"it is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise _broken(path, f"it holds a JSON {type(value).__name__}, not an object")
    return value
