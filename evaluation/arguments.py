"""The options of evaluate.py and ablate.py, read off typed functions and parsed by jsonargparse.

A command is a function. Each of its parameters is an option spelled with dashes (`data_config` is
`--data-config`), and a parameter whose type is a config dataclass stands for that dataclass's fields,
each an option of its own (a field's metadata "flag" spells it otherwise, as FitConfig's `fractions` is
`--fit-fraction`). The annotation says how a value is read: a list or tuple takes one or more values
(`--k 3 5`), a bool that defaults to False is a switch, a Literal is a choice. The default is the one
written in the signature or the dataclass, and the help text is the docstring's `Args:` entry.

A value that cannot be used is refused as a `UserError` naming the option and the help, before the
command runs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import docstring_parser
from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace

from user_errors import UserError

# Larger counts and seeds are typos, not requests: tables hold 32-bit integers, and the work would never end.
MOST = 2**31 - 1
# Whole numbers are counts from 1 (prompts, starts, batch sizes, k, iterations: 0 makes no sense), except
# these, which may be 0: seeds, indices and steps, and counts where 0 means "automatic" or "none".
FROM_ZERO = {"seed", "task", "step", "workers", "resample_starts", "stop_after"}


class WholeNumber:
    """A reader of an integer from `least` to MOST, refused with what it must be (a count of 0 that would write
    an empty table, a negative seed that numpy cannot use)."""

    def __init__(self, least: int) -> None:
        self.least = least

    def __repr__(self) -> str:  # how --help names it
        return f"whole number >= {self.least}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one >= {self.least}") from None
        if value < self.least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {self.least}")
        if value > MOST:
            raise argparse.ArgumentTypeError(f"{value} is beyond {MOST}; give a whole number from {self.least} "
                                             f"to {MOST}")
        return value


class Number:
    """A reader of a real number (each is checked against its range where it is used)."""

    def __repr__(self) -> str:
        return "number"

    def __call__(self, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a command: where its value goes (`param`, and `field` of that parameter's dataclass)."""

    dest: str
    param: str
    field: str | None
    hint: Any
    default: Any
    help: str | None


def _options(fn: Callable) -> list[Option]:
    """The options of a command function, its dataclass parameters spread into their fields."""
    hints = typing.get_type_hints(fn)
    docs = _docs(fn)
    out = []
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            field_hints, field_docs = typing.get_type_hints(hint), _docs(hint)
            for f in dataclasses.fields(hint):
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                dest = f.metadata.get("flag", f.name).replace("-", "_")
                out.append(Option(dest, name, f.name, field_hints[f.name], default, field_docs.get(f.name)))
        else:
            out.append(Option(name, name, None, hint, param.default, docs.get(name)))
    return out


def _docs(obj: object) -> dict[str, str]:
    """The `Args:` entries of a function's docstring, or of a class's and its bases' (a subclass's first)."""
    docs: dict[str, str] = {}
    for owner in reversed(getattr(obj, "__mro__", (obj,))):
        docs.update({p.arg_name: " ".join(p.description.split())
                     for p in docstring_parser.parse(owner.__doc__ or "").params if p.description})
    return docs


def _given(hint: Any) -> Any:
    """X of `X | None`: an option of that type is read the same way, and None is its default."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _add(parser: ArgumentParser, option: Option) -> None:
    """`option` as an argparse argument: its reader, how many values it takes, its choices and its default."""
    hint, required = _given(option.hint), option.default in (inspect.Parameter.empty, dataclasses.MISSING)
    kwargs: dict[str, Any] = {"dest": option.dest, "help": option.help}
    args = typing.get_args(hint)
    if hint is bool:
        if required or option.default:
            raise TypeError(f"{option.dest}: a switch must default to False")
        parser.add_argument(flag(option.dest), action="store_true", **kwargs)
        return
    if typing.get_origin(hint) in (list, tuple, Sequence):
        kwargs["nargs"] = "+"
        hint = args[0]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        kwargs["choices"] = args  # of text: argparse keeps the text it was given
    elif hint is int:
        kwargs["type"] = WholeNumber(0 if option.dest in FROM_ZERO else 1)
    elif hint is float:
        kwargs["type"] = Number()
    elif hint is not str:
        kwargs["type"] = hint
    if required:
        kwargs["required"] = True
    else:
        kwargs["default"] = list(option.default) if isinstance(option.default, tuple) else option.default
    parser.add_argument(flag(option.dest), **kwargs)


class Help(DefaultHelpFormatter):
    """jsonargparse's help, naming a type plainly (Path, not <class 'Path'>) and leaving out a default of None
    or False: the option's own text says what leaving it out does."""

    def _get_type_str(self, action: argparse.Action) -> str | None:
        text = super()._get_type_str(action)
        return text and re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            action = copy.copy(action)
            action.default = argparse.SUPPRESS
        return super()._get_help_string(action)


def command_parser(fn: Callable, prog: str) -> ArgumentParser:
    """A parser of `fn`'s options; its description is `fn`'s docstring without the `Args:` section."""
    doc = docstring_parser.parse(fn.__doc__ or "")
    description = "\n\n".join(d for d in (doc.short_description, doc.long_description) if d)
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, formatter_class=Help)
    for option in _options(fn):
        _add(parser, option)
    return parser


def call(fn: Callable, values: Namespace) -> Any:
    """Call `fn` with the parsed values: its dataclass parameters built from their fields' options, each
    list read for a tuple as a tuple."""
    kwargs: dict[str, Any] = {}
    fields: dict[str, dict[str, Any]] = {}
    for option in _options(fn):
        value = values[option.dest]
        if isinstance(value, list) and typing.get_origin(_given(option.hint)) is not list:
            value = tuple(value)
        if option.field is None:
            kwargs[option.param] = value
        else:
            fields.setdefault(option.param, {})[option.field] = value
    hints = typing.get_type_hints(fn)
    kwargs.update({param: hints[param](**given) for param, given in fields.items()})
    return fn(**kwargs)


def one_line(error: argparse.ArgumentError, prog: str) -> UserError:
    """argparse's and jsonargparse's refusal as one line that names the option and the help."""
    message = " ".join(str(error).split())
    required = "the following arguments are required: "
    if message.startswith(required):  # jsonargparse names them by key (fit.out); the user typed flags
        names = message[len(required):].split(", ")
        message = required + ", ".join(flag(name.rsplit(".", 1)[-1]) for name in names)
    # a value jsonargparse refused is named by its key (`Parser key "starts"`) too
    message = re.sub(r'Parser key "([^"]+)"', lambda key: flag(key.group(1).rsplit(".", 1)[-1]), message)
    return UserError(f"{prog}: {message} (`python {prog} --help` lists the options)")


def parse(parser: ArgumentParser, argv: Sequence[str], prog: str) -> Namespace:
    """The options of `argv`, or a one-line UserError."""
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise one_line(exc, prog) from None


def run_command(fn: Callable, argv: Sequence[str] | None, prog: str) -> Any:
    """Parse `argv` (None: the command line) into `fn`'s options and call it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return call(fn, parse(command_parser(fn, prog), argv, prog))


def run_commands(commands: Sequence[Callable], argv: Sequence[str] | None, prog: str) -> Any:
    """Parse `argv` (None: the command line) as one of `commands`, each a sub-command named after its function
    with dashes, and call it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog=prog, exit_on_error=False, formatter_class=Help)
    subcommands = parser.add_subcommands(dest="command")
    by_name = {fn.__name__.replace("_", "-"): fn for fn in commands}
    if not argv:
        raise UserError(f"{prog}: give a sub-command, one of {', '.join(by_name)} (`python {prog} --help` lists them)")
    for name, fn in by_name.items():
        sub = command_parser(fn, f"{prog} {name}")
        subcommands.add_subcommand(name, sub, help=sub.description.split("\n")[0])
    given = next((a for a in argv if a in by_name), None)
    values = parse(parser, argv, f"{prog} {given}" if given else prog)
    return call(by_name[values.command], values[values.command])
