"""The argument parser of evaluate.py and ablate.py: argparse, with a bad flag reported on one line."""
from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one `error:` line that names the fix, without the usage block above it.
    Sub-command parsers are of the same class, so they report the same way."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (`python {self.prog} --help` lists the options)\n")
