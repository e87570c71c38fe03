"""The argument parser of evaluate.py and ablate.py: argparse, with a bad flag reported on one line."""
from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one `error:` line that names the fix, without the usage block above it.
    Sub-command parsers are of the same class, so they report the same way."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (`python {self.prog} --help` lists the options)\n")


# Larger counts and seeds are typos, not requests: tables hold 32-bit integers, and the work would never end.
MOST = 2**31 - 1


def whole_number(least: int):
    """An argparse type: an integer from least to MOST, refused with what it must be (a count of 0 that would write
    an empty table, a negative seed that numpy cannot use)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one >= {least}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        if value > MOST:
            raise argparse.ArgumentTypeError(f"{value} is beyond {MOST}; give a whole number from {least} to {MOST}")
        return value

    parse.__name__ = f"whole number >= {least}"
    return parse


COUNT = whole_number(1)  # prompts, starts, batch sizes, k, iterations: 0 makes no sense
INDEX = whole_number(0)  # seeds, tasks, steps, worker counts (0: automatic)
