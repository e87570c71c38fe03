"""GPT-2 variants built from a config (never downloaded): the named sizes of the design, or any other.

Named sizes `gpt2-{1,2,3,4,8,12,16}l` have d=768, 12 heads and a 1024-token context; every field can
be overridden (`n_layer`, `n_embd`, `n_head`, `n_positions`), which is how small CPU models are made.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from user_errors import UserError

NAMED_LAYERS = (1, 2, 3, 4, 8, 12, 16)


class ModelConfigError(UserError):
    """A model setting is unknown or inconsistent; the message names it and the fix."""


@dataclass(frozen=True)
class GPTSpec:
    n_layer: int = 4
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    dropout: float = 0.0  # the GINC stream never repeats a document, so no regulariser is needed

    @property
    def label(self) -> str:
        """Short name for run labels: `gpt2-4l`, or `gpt2-2l-d64` off the named width."""
        return f"gpt2-{self.n_layer}l" + ("" if self.n_embd == 768 else f"-d{self.n_embd}")


SPEC_FIELDS = tuple(f.name for f in fields(GPTSpec))  # the architecture, as the model's flags name it
NAMED_SIZES = {f"gpt2-{n}l": GPTSpec(n_layer=n) for n in NAMED_LAYERS}


def resolve_spec(size: str | None, **overrides: int | float | None) -> GPTSpec:
    """The named size (None: GPTSpec's defaults) with the given fields overridden (None keeps its value)."""
    if size is not None and size not in NAMED_SIZES:
        raise ModelConfigError(f"unknown model size {size!r}; choose one of {', '.join(NAMED_SIZES)} "
                               "(and override n_layer/n_embd/... for others)")
    spec = replace(NAMED_SIZES[size] if size else GPTSpec(), **{k: v for k, v in overrides.items() if v is not None})
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        if getattr(spec, name) < 1:
            raise ModelConfigError(f"{name} must be >= 1, got {getattr(spec, name)}")
    if spec.n_embd % spec.n_head:
        raise ModelConfigError(f"n_embd {spec.n_embd} is not divisible by n_head {spec.n_head}; "
                               "pick a head count that divides it")
    if not 0.0 <= spec.dropout < 1.0:
        raise ModelConfigError(f"dropout must be in [0, 1), got {spec.dropout}")
    return spec


def build_gpt(spec: GPTSpec, vocab_size: int, bos_id: int, pad_id: int) -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel with SDPA attention."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=bos_id,
        eos_token_id=bos_id,  # documents have no end token; BOS starts the next one
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # left unset, HF warns on every forward: a graph break under torch.compile
    return model


def spec_of(config: GPT2Config) -> GPTSpec:
    """The spec a GPT-2 config was built from (`build_gpt`'s inverse)."""
    return GPTSpec(n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head, n_positions=config.n_positions,
                   dropout=config.resid_pdrop)


def resolve_device(name: str) -> str:
    """`auto` -> cuda where a GPU is visible, else cpu; any other name is checked against this torch build
    and machine (one line naming what is there, instead of torch's assertion deep inside)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise UserError(f"--device {name}: this machine's torch sees {count} CUDA device(s)"
                             + ("" if torch.version.cuda else " (a CPU-only build)") + "; use --device cpu or auto")
    elif device.type not in ("cpu", "meta") and not getattr(torch, device.type, None):
        raise UserError(f"--device {name}: this torch build has no {device.type} backend; use --device cpu or auto")
    return name


def training_threads(requested: int | None = None) -> int:
    """CPU threads for training: `requested`, or one. The models a CPU trains here are small, so a second
    thread buys little on an idle machine, and on a shared one threads that wait for each other while
    another job holds a core made training many times slower (benchmarks/train_threads.py)."""
    if requested is not None and requested < 1:
        raise UserError(f"run.cpu_threads must be >= 1, got {requested}; leave it out for one thread")
    return requested or 1


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py (they hold config objects, so not weights-only), or one clear error."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ModelConfigError(f"{path} is not a readable checkpoint (not a file torch.save writes); "
                               "pass a checkpoints/last.ckpt written by train.py, or the run's hf/ directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways (zip, pickle, EOF, ...)
        raise ModelConfigError(f"{path} is not a readable checkpoint "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); "
                               "pass a checkpoints/last.ckpt written by train.py, or the run's hf/ directory") from None


def read_pretrained(path: str | Path) -> GPT2LMHeadModel:
    """A run's hf/ export, or one clear error when its files are broken."""
    try:
        return GPT2LMHeadModel.from_pretrained(path)
    except Exception as exc:  # a corrupt safetensors or config file
        raise ModelConfigError(f"{path} is not a loadable HF export "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:80]}); "
                               "export it again or pass the run's checkpoints/last.ckpt") from None
