"""`train.py`'s command line: `fit` or `validate` with the flags and --config files of a run's settings,
read into a TrainConfig (the settings they name, nothing filled in), which `train()` runs."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from training.config import SUBCOMMANDS, RunConfigError, TrainConfig
from training.options import HELP, parse, resolve, settings_parser

# options whose value may be a YAML file of settings (jsonargparse reads a file given to any group)
CONFIG_OPTIONS = ("--config", "-c", "--model", "--data", "--run", "--trainer", "--model.optim", "--data.world",
                  "--data.icl")
PRINT_CONFIG = "--print_config"


def read_command(argv: Sequence[str]) -> tuple[str, TrainConfig, bool]:
    """(subcommand, the config the flags name, whether to print the resolved config instead of running)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: train.py {{{','.join(SUBCOMMANDS)}}} [--config FILE] "
              f"[--run.* --model.* --data.* --trainer.* ...]\n\n{HELP}")
        raise SystemExit(0)
    subcommand, options = argv[0], list(argv[1:])
    if subcommand not in SUBCOMMANDS:
        raise RunConfigError(f"unknown subcommand {subcommand!r}; choose one of {', '.join(SUBCOMMANDS)} "
                             "(`python train.py --help`)")
    show = PRINT_CONFIG in options
    return subcommand, config_of(o for o in options if o != PRINT_CONFIG), show


def config_of(options: Iterable[str]) -> TrainConfig:
    """The TrainConfig that train.py's flags and --config files name (nothing filled in)."""
    options = list(options)
    check_config_paths(options)
    configs, flags = split_configs(options)
    under = TrainConfig.from_files(*configs) if configs else TrainConfig()
    # the flags of a model or data class the configs name need that class to parse
    classes = [arg for group, section in under.sections().items()
               for arg in (f"--{group}.class_path", section.class_path)]
    given = parse(lambda parser: parser.parse_args([*classes, *flags], defaults=False))
    settings = {key: value for key, value in given.as_dict().items() if key != "config" and not key.startswith("__")}
    return TrainConfig.from_files(*configs, overrides=settings)


def split_configs(options: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config files, in order; the other flags)."""
    configs, flags, take = [], [], False
    for arg in options:
        if take:
            configs.append(arg)
            take = False
        elif arg in ("--config", "-c"):
            take = True
        elif arg.startswith("--config="):
            configs.append(arg.split("=", 1)[1])
        else:
            flags.append(arg)
    return configs, flags


def print_config(config: TrainConfig) -> None:
    """The run's settings, every default filled in and the stage's classes named, as YAML."""
    print(settings_parser().dump(resolve(config), skip_none=False), end="")


def check_config_paths(options: Sequence[str]) -> None:
    """A config option given a directory is named as one (jsonargparse would say only that it is not a file),
    and a --config file that is not there as missing."""
    for arg, value in zip(options, [*options[1:], ""]):
        option, value = arg.split("=", 1) if arg.startswith("--") and "=" in arg else (arg, value)
        if option in CONFIG_OPTIONS and value and Path(value).is_dir():
            raise RunConfigError(f"{option} {value} is a directory; a config must be a YAML file (such as "
                                 f"{'configs/model/gpt2-2l.yaml' if option == '--model' else 'configs/tiny.yaml'})")
        if option in ("--config", "-c") and value and not Path(value).exists():
            raise RunConfigError(f"--config {value}: File does not exist; check the path "
                                 "(`python train.py fit --help` lists every option)")
