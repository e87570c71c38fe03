"""The parser of a training run's settings (jsonargparse, as Lightning's own CLI builds it): it types and
checks every setting of the run, model, data and trainer, fills in their defaults and builds the classes.
`train()` resolves a TrainConfig through it; `train.py` parses its flags with it."""
from __future__ import annotations

import functools
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser

from training.config import STAGES, RunConfig, TrainConfig
from user_errors import UserError

HELP = f"""Train GPT-2 on the GINC world. `python train.py` with no arguments runs the quickstart (a small
pretraining and SFT run on the CPU or GPU, then ICL curves beside both ideal learners). Otherwise:
`python train.py fit --config configs/pretrain.yaml [--run.stage {{{','.join(STAGES)}}}] ...`. Stages:
pretrain (from scratch), sft and dpo (from --model.init_from, favouring or disfavouring --run.tasks).
`python train.py fit --help` lists every option with its default; the model's own options (size, n_embd,
optim.lr, ...) are listed by `python train.py fit --model.help CausalLMModule`."""

LINKED = ("icl_eval", "train_pairs")
# the datamodule shards by rank itself
TRAINER_DEFAULTS = {"use_distributed_sampler": False}


@functools.cache
def settings_parser() -> LightningArgumentParser:
    """The settings of one run: run, model (any LightningModule, CausalLMModule unless a class_path or the
    stage names another), data (likewise), trainer, seed_everything and ckpt_path, with a --config option."""
    from datamodules.ginc_datamodule import GincDataModule  # the parser needs the classes; importing them is slow
    from lightning_modules.lm_module import CausalLMModule

    parser = LightningArgumentParser(description=HELP, default_env=False, exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file of settings (repeat to layer several)")
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})
    # what the data fixes in the model is passed in by train() (training.run.module_arguments), not a setting
    parser.add_subclass_arguments(CausalLMModule, "model", required=False, fail_untyped=False, skip=set(LINKED))
    parser.add_subclass_arguments(GincDataModule, "data", required=False, fail_untyped=False)
    parser.add_class_arguments(RunConfig, "run")
    parser.add_argument("--seed_everything", type=int, default=0,
                        help="seed of the run: same seed, same initial weights, so runs compare and resume exactly")
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="a checkpoint to continue (fit) or score (validate); `last`: the named run's own "
                             "last.ckpt")
    return parser


def resolve(config: TrainConfig) -> Namespace:
    """The config's settings checked and typed, every default filled in (the stage's classes where the config
    names none). A setting a class refuses is that class's own UserError; any other bad setting is one line."""
    return parse(lambda parser: parser.parse_object(config.as_settings()))


def parse(call: Any) -> Namespace:
    """`call(parser)` with jsonargparse's errors as one-line UserErrors."""
    try:
        return call(settings_parser())
    except UserError:
        raise
    except (ArgumentError, ValueError) as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise cause from None
        if isinstance(exc, ArgumentError):
            raise UserError(f"{one_line(str(exc))} (`python train.py fit --help` lists every setting)") from exc
        raise


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a class raised while jsonargparse built it (jsonargparse wraps it in its Union check),
    or None where there is none."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    return cause


_UNION_ERROR = "Does not validate against any of the Union subtypes"


def one_line(message: str) -> str:
    """jsonargparse's report of a bad setting on one line: the key and, for a model or data setting, the
    reason its class gave (not the list of every type the key could have been)."""
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
