"""How the three scripts end: the one place that turns what a run raised into a message and an exit status.

- a `UserError` (bad input): its message as one `error: ...` line on stderr, status 2;
- Ctrl-C: one line saying what was kept and how to resume, status 130;
- stdout closed by its reader (`python train.py --help | head -1`): quiet, status 141, as a pipe's writer;
- anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from . import UserError

BAD_INPUT = 2
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process that Ctrl-C ended
BROKEN_PIPE = 141  # 128 + SIGPIPE


def exit_status(main: Callable[[], int | None], on_interrupt: str) -> int:
    """Run a script's `main` and return its exit status: its own (None is 0), or BAD_INPUT or INTERRUPTED.

    `on_interrupt` completes the line printed after Ctrl-C: "error: interrupted; <on_interrupt>".
    """
    try:
        return main() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return BAD_INPUT
    except (KeyboardInterrupt, SystemExit) as exc:
        # Lightning answers Ctrl-C in a running stage by tearing down and calling sys.exit(1); any other
        # SystemExit (--help, an explicit exit) is the script's own
        if isinstance(exc, SystemExit) and not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        print(f"error: interrupted; {on_interrupt}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except BrokenPipeError:
        # what is still buffered for stdout goes nowhere, so that flushing it at exit raises nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
