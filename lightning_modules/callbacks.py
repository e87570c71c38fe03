"""Callbacks of a training run: the curves table per evaluation, ICL images in TensorBoard, the HF export.

The run's `RunInfo` (what its curve rows carry besides the contract's columns) is stored in every
checkpoint and export, so curves measured later from them get the same labels (contracts.run_artifacts).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from contracts.curves_table import write_curves
from contracts.run_artifacts import RUN_INFO_KEY, RunInfo, write_export
from lightning_modules.lm_module import check_finite_weights
from models.gpt import read_checkpoint


class RunLogger(TensorBoardLogger):
    """TensorBoard with hp_metric declared for the HParams view, but without the -1 placeholder that
    Lightning writes into the hp_metric chart at step 0 each time a stage starts (three points at step
    0 in a run that evaluates before it trains: -1, the first loss, -1 again)."""

    _declaring = False

    def log_hyperparams(self, *args, **kwargs) -> None:
        self._declaring = True
        try:
            super().log_hyperparams(*args, **kwargs)
        finally:
            self._declaring = False

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self._declaring:
            metrics = {k: v for k, v in metrics.items() if k != "hp_metric"}
        if metrics:
            super().log_metrics(metrics, step)


class CurvesWriter(L.Callback):
    """After every validation: append the ICL curves to the run's curves.csv and draw them in TensorBoard,
    beside reference curves (e.g. the ideal learners') that `references(device)` computes once, on the
    first validation that draws."""

    def __init__(self, path: str | Path, info: RunInfo,
                 references: Callable[[object], dict[str, list[dict]]] | None = None) -> None:
        self.path, self.info, self.references = Path(path), info, references
        self._reference_rows: dict[str, list[dict]] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = getattr(pl_module, "last_curve_rows", [])
        if trainer.sanity_checking or not rows or not trainer.is_global_zero:
            return
        step = trainer.global_step
        # replace: a run resumed from before an evaluation it already wrote evaluates that step again
        write_curves([{**r, "run": self.info.run, **self.info.columns(step)} for r in rows], self.path, append=True,
                     replace=True)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if loggers and self._reference_rows is None:
            self._reference_rows = self.references(pl_module.device) if self.references else {}
        for logger in loggers:
            for k in sorted({r["k"] for r in rows}):
                figure = curve_figure(rows, k, self.info.run, self._reference_rows)
                logger.experiment.add_figure(f"icl_curves/k{k}", figure, step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_INFO_KEY] = asdict(self.info)


def curve_figure(rows: list[dict], k: int, title: str, references: dict[str, list[dict]] | None = None) -> Figure:
    """Accuracy (and probability, dashed) of the label against shots, one colour per task; each
    reference curve set drawn in black as its accuracy averaged over tasks."""
    fig = Figure(figsize=(5.6, 3.2))  # no pyplot: nothing global to set at import
    ax = fig.subplots()
    for task in sorted({r["task"] for r in rows if r["k"] == k}):
        pts = sorted((r["shots"], r["acc"], r["prob"]) for r in rows if r["k"] == k and r["task"] == task)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"task {task}")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color=line.get_color(), alpha=0.6)
    for (name, ref), style in zip((references or {}).items(), (":", "-.", "--")):
        by_shots: dict[int, list[float]] = {}
        for r in ref:
            if r["k"] == k:
                by_shots.setdefault(int(r["shots"]), []).append(float(r["acc"]))
        shots = sorted(by_shots)
        ax.plot(shots, [sum(by_shots[s]) / len(by_shots[s]) for s in shots], ls=style, color="k", lw=1.2,
                label=f"{name} (mean)")
    ax.set(xlabel="shots", ylabel="accuracy (prob dashed)", title=f"{title}, k={k}", ylim=(0, 1.02))
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.subplots_adjust(right=0.7)  # room for the legend beside the axes
    return fig


class StepProgressBar(TQDMProgressBar):
    """The GINC stream is endless, so epochs mean nothing: the bar counts optimizer steps up to max_steps
    (from where a resumed run stands) and shows the training loss and tokens/s. It refreshes every
    `refresh_rate` steps, when the logger reads those values anyway."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: object) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.train_progress_bar is not None and self.is_enabled and (step % self.refresh_rate == 0
                                                                        or step == trainer.max_steps):
            self.train_progress_bar.n = step
            shown = {name: f"{trainer.callback_metrics[key].item():{fmt}}" for name, key, fmt in
                     (("loss", "train/loss", ".3f"), ("tok/s", "train/tokens_per_s", ".3g"))
                     if key in trainer.callback_metrics}
            self.train_progress_bar.set_postfix(shown)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}


class FinalExport(L.Callback):
    """At the end of training: last.ckpt holds the final step, and `save_pretrained` writes <run>/hf with
    the GINC data settings (`data_hparams`, the datamodule's hyperparameters) and run info beside it (what
    `evaluate.py curves` needs)."""

    def __init__(self, run_dir: str | Path, info: RunInfo, data_hparams: dict) -> None:
        self.run_dir, self.info, self.data_hparams = Path(run_dir), info, data_hparams

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = self.run_dir / "checkpoints" / "last.ckpt"
        # periodic saves (every_n_train_steps) need not fall on the last step: rank 0 reads the step last.ckpt
        # holds (its tensors stay on disk), and every rank joins the save
        if trainer.checkpoint_callback is not None:
            behind = trainer.is_global_zero and (not last.is_file()
                                                 or read_checkpoint(last)["global_step"] != trainer.global_step)
            if trainer.strategy.broadcast(behind):
                trainer.save_checkpoint(last, weights_only=False)  # full, to resume
        if trainer.is_global_zero:
            check_finite_weights(pl_module.gpt.state_dict(), trainer.global_step)  # a diverged run exports nothing
            write_export(self.run_dir, pl_module.gpt, self.data_hparams, self.info, trainer.global_step)
