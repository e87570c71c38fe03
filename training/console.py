"""What a training run shows and how it stops: Ctrl-C that is never lost, and no log lines a user cannot
act on."""
from __future__ import annotations

import logging
import signal
import sys
import warnings

import torch
from lightning.pytorch.callbacks import Callback


class _NoTips(logging.Filter):
    """Drop Lightning's advertisement for a cloud logger from every run's output, and its Ctrl-C notice
    (train.py says itself in one line what was kept and how to resume)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and "Detected KeyboardInterrupt" not in message


class CtrlC(Callback):
    """Ctrl-C that is never lost. Python drops a KeyboardInterrupt raised while a finalizer or weakref
    callback runs (it prints "Exception ignored" and goes on), and a run then trained on; `watch()`
    installs a SIGINT handler that also records the request, and this callback raises it again at the
    next training or validation step, where Lightning stops the run cleanly."""

    requested = False

    @classmethod
    def watch(cls) -> None:
        """Before a run: forget an earlier Ctrl-C, and take over SIGINT if Python's own handler has it."""
        cls.requested = False
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # ignored (a background job), someone else's, or already ours: leave it
        def on_sigint(signum: int, frame: object) -> None:
            cls.requested = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        previous = sys.unraisablehook

        def quiet(unraisable: object) -> None:  # a swallowed Ctrl-C is raised again: no report of it
            if not isinstance(unraisable.exc_value, KeyboardInterrupt):
                previous(unraisable)

        sys.unraisablehook = quiet

    def _check(self, *args: object) -> None:
        if CtrlC.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = _check


def quiet_lightning() -> None:
    """Drop the log lines no user of train.py can act on; TF32 for what runs outside bf16 autocast on GPUs."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())
    # Lightning's pytree helper uses a torch API that torch deprecated; it warns in every run
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    torch.set_float32_matmul_precision("high")
