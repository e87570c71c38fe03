"""The causal-LM LightningModule: pretraining on the GINC mixture and SFT from a pretrained checkpoint.

SFT is the same module started from `init_from` and fed another mixture by the datamodule. What the
data fixes, the vocabulary and the shape of the ICL evaluation, is given when the module is built
(train.py links it from the datamodule; `data_arguments` gives it from Python) and kept in the
hyperparameters, so a checkpoint rebuilds on its own. The model is built in `configure_model`. The
training step never waits for the device: losses are logged as tensors, throughput from shapes and the
wall clock. `adamw_with_schedule` and the ICL validation are meant for other modules too (DPO).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from transformers import GPT2LMHeadModel

from contracts.run_artifacts import MODULE_CLASS_KEY
from datamodules.ginc_datamodule import GincDataModule
from datamodules.sampling import shots_for_context
from lightning_modules.icl_metric import ICLCurveMetric, curve_rows, label_scores
from models.gpt import GPTSpec, ModelConfigError, build_gpt, read_checkpoint, read_pretrained, resolve_spec
from user_errors import MissingInput, UserError


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100
    total_steps: int | None = None  # length of the cosine decay; None -> trainer.max_steps
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio

    def __post_init__(self) -> None:
        """Refused here, before the run starts: a negative lr used to train until it diverged."""
        checks = [(self.lr > 0, "lr", "> 0"), (self.weight_decay >= 0, "weight_decay", ">= 0"),
                  (0 <= self.beta1 < 1, "beta1", "in [0, 1)"), (0 <= self.beta2 < 1, "beta2", "in [0, 1)"),
                  (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
                  (self.total_steps is None or self.total_steps >= 1, "total_steps", ">= 1 (or null)"),
                  (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")]
        for ok, name, rule in checks:
            if not ok:
                raise ModelConfigError(f"model.optim.{name} = {getattr(self, name)} must be {rule}")


def adamw_with_schedule(model: nn.Module, cfg: OptimConfig, total_steps: int, fused: bool) -> dict:
    """AdamW (no decay on biases and norms) with linear warmup then cosine decay, stepped every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_gpt_weights(model: GPT2LMHeadModel, source: str | Path) -> None:
    """Copy weights from a Lightning checkpoint of this module or an HF export directory."""
    source = Path(source)
    if source.is_dir():
        state = read_pretrained(source).state_dict()
    else:
        ckpt = read_checkpoint(source)
        state = {k.removeprefix("gpt."): v for k, v in ckpt["state_dict"].items() if k.startswith("gpt.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelConfigError(f"{source} holds a different model than configured ({str(exc).splitlines()[0]}); "
                               "use its size") from None


class ICLEval(TypedDict):
    """What the ICL validation scores: prompts of each length in k_values, of n_tasks tasks, up to max_shots
    demonstrations. A plain dict, so checkpoints that keep it load weights-only."""

    k_values: list[int]
    n_tasks: int
    max_shots: int


def icl_eval_of(data: GincDataModule) -> ICLEval:
    icl = data.icl
    shots = [icl.n_shots or shots_for_context(data.context_length, k) for k in icl.k_values]
    return ICLEval(k_values=list(icl.k_values), n_tasks=data.world.n_tasks, max_shots=max(shots))


def data_arguments(data: GincDataModule) -> dict:
    """The module's arguments that the data fixes (train.py links the same from its datamodule)."""
    return {"vocab_size": data.world.model_vocab_size, "icl_eval": icl_eval_of(data)}


class NonFiniteError(UserError):
    """Training diverged: the message says when and what to change."""


def diverged(what: str, step: int) -> NonFiniteError:
    return NonFiniteError(f"{what} became non-finite by step {step}; lower --model.optim.lr or set "
                          "--trainer.gradient_clip_val 1.0 (the last checkpoint is from before it)")


def check_finite_weights(state: dict[str, torch.Tensor], step: int) -> None:
    """Refuse to save or export weights that are not all finite."""
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise diverged("the weights", step)


class CausalLMModule(L.LightningModule):
    """GPT-2 trained on next-token prediction; validation gives the loss and the ICL curves."""

    # constructor arguments that are data, not settings: kept out of the hyperparameters (and checkpoints)
    data_only: tuple[str, ...] = ()

    def __init__(
        self,
        size: str | None = "gpt2-4l",
        n_layer: int | None = None,
        n_embd: int | None = None,
        n_head: int | None = None,
        n_positions: int | None = None,
        dropout: float | None = None,
        vocab_size: int | None = None,
        optim: OptimConfig | None = None,
        compile: bool | None = None,
        init_from: str | None = None,
        log_shots: list[int] | None = None,
        icl_eval: ICLEval | None = None,
    ) -> None:
        """size: a named GPT-2 size (null: GPTSpec's defaults), fields overridden by n_layer.. dropout.
        vocab_size: the world's model_vocab_size. compile: torch.compile the model (None = only on GPU).
        init_from: checkpoint or HF export to start from (SFT). log_shots: shot counts whose ICL accuracy
        is logged as scalars (the last one always is). icl_eval: the ICL prompts validation scores (None:
        none). train.py sets vocab_size and icl_eval from the datamodule; `data_arguments(data)` gives both."""
        super().__init__()
        self.spec: GPTSpec = resolve_spec(size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                                          dropout=dropout)
        if init_from is not None and not Path(init_from).exists():
            raise MissingInput(f"init_from checkpoint {init_from} does not exist; "
                               "pass the path of a pretraining run's checkpoint or HF export")
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.save_hyperparameters(ignore=list(self.data_only))
        self.gpt: GPT2LMHeadModel | None = None
        self.icl = None if icl_eval is None else ICLCurveMetric(**icl_eval)
        self.last_curve_rows: list[dict] = []
        self._tokens, self._clock = 0, time.perf_counter()

    # ---- construction -------------------------------------------------------------------------
    def check_data(self, data: GincDataModule) -> None:
        """Raise before training when the data does not fit the model (train.py calls it before fit)."""
        if data.context_length > self.spec.n_positions:
            raise ModelConfigError(f"data.context_length {data.context_length} exceeds the model's "
                                   f"n_positions {self.spec.n_positions}; raise model.n_positions or lower the context")
        vocab = self.hparams.vocab_size
        if vocab is not None and vocab != data.world.model_vocab_size:
            raise ModelConfigError(f"model.vocab_size {vocab} differs from the world's {data.world.model_vocab_size} "
                                   "(vocab_size + PAD + BOS); leave it null")

    def configure_model(self) -> None:
        if self.gpt is not None:
            return
        vocab = self.hparams.vocab_size
        if vocab is None:
            raise ModelConfigError("the vocabulary is unknown: build the module with vocab_size, "
                                   "the world's model_vocab_size (data_arguments(data) gives it)")
        self.gpt = build_gpt(self.spec, vocab, bos_id=vocab - 1, pad_id=vocab - 2)  # world ids: PAD = V, BOS = V + 1
        if self.hparams.init_from is not None:
            load_gpt_weights(self.gpt, self.hparams.init_from)
        if self.compiles():
            self.gpt.compile()  # in place: parameter names (and checkpoints) stay those of the plain model

    def compiles(self) -> bool:
        """Whether configure_model compiles the model: as asked, or by default where it was built on a GPU
        (a trainer builds it on its device; loading a checkpoint builds it on the CPU)."""
        compile_ = self.hparams.compile
        return bool(compile_) or (compile_ is None and self.gpt.device.type == "cuda")

    # ---- training -----------------------------------------------------------------------------
    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal-LM loss of a batch of blocks, and their token ids."""
        ids = batch["input_ids"]
        return self.gpt(input_ids=ids, labels=ids).loss, ids

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, ids = self.model_step(batch)
        self.log("train/loss", loss)  # a device tensor: read only when the logger flushes
        self.guard_loss(loss)
        self.log_rates(ids.numel())
        return loss

    def guard_loss(self, loss: torch.Tensor) -> None:
        """Every stage's divergence check of its training loss. It runs when the logger reads the loss
        anyway, so a GPU never waits for it on other steps; the weight check at every save catches the rest."""
        if self.log_flush_step() and not bool(torch.isfinite(loss)):
            raise diverged(f"the training loss ({loss.item()})", self.global_step + 1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never write non-finite weights over the last good checkpoint; name the module's class (a resumed run
        is checked to be of the same kind)."""
        check_finite_weights(checkpoint["state_dict"], self.global_step)
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    def log_flush_step(self) -> bool:
        """Whether the logger writes this step's values."""
        return self.trainer is not None and (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def log_rates(self, n_tokens: int) -> None:
        """Count this step's tokens; log lr and tokens/s when the logger flushes."""
        self._tokens += n_tokens
        # self.log turns a Python float into a device tensor, a blocking host-to-device copy:
        # floats only when the logger flushes
        if self.log_flush_step():
            self.log("lr", self.lr_schedulers().get_last_lr()[0])
            now = time.perf_counter()
            self.log("train/tokens_per_s", self._tokens * self.trainer.world_size / (now - self._clock))
            self._tokens, self._clock = 0, now

    def configure_optimizers(self) -> dict:
        total = self.optim.total_steps or self.trainer.max_steps
        if total is None or total < 1:
            raise ModelConfigError("the learning-rate decay needs a length: set trainer.max_steps "
                                   "(the data stream is endless) or model.optim.total_steps")
        return adamw_with_schedule(self.gpt, self.optim, total, fused=self.device.type == "cuda")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, without its refusal to clip for a fused optimizer under bf16-mixed.

        The refusal guards fp16, whose loss scaler a fused optimizer undoes inside its step; bf16 has no
        scaler, so the gradients are plain and clip as they are (with the GPU's fused AdamW and the
        configs' gradient_clip_val, Lightning would stop at the first step). They clip as Lightning's
        base precision does: all the optimizer's parameters, by norm unless asked by value.
        """
        plugin = self.trainer.precision_plugin
        if not (gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ---- validation: loss on held-out blocks (loader 0) and ICL curves (loader 1) ---------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            # held-out documents: the causal-LM loss in every subclass, whatever its training loss (DPO's)
            loss, ids = CausalLMModule.model_step(self, batch)
            if not bool(torch.isfinite(loss)):  # validation is rare enough to read the loss every batch
                raise diverged(f"the validation loss ({loss.item()})", self.global_step)
            self.log("val/loss", loss, add_dataloader_idx=False, sync_dist=True, batch_size=ids.shape[0])
            self.log("hp_metric", loss, add_dataloader_idx=False, sync_dist=True, batch_size=ids.shape[0])
            if "floor" in batch:  # how far the model is from having learned the world's documents
                for name, floor in (("val/excess_loss", batch["floor"]), ("val/excess_loss_task", batch["task_floor"])):
                    self.log(name, loss.float() - floor.float(), add_dataloader_idx=False, sync_dist=True,
                             batch_size=ids.shape[0])
        elif self.icl is None:
            raise ModelConfigError("the data gives ICL prompts but the module has no icl_eval: "
                                   "build it with data_arguments(data)")
        else:
            logp, hit = label_scores(self.gpt, batch["input_ids"], batch["label_pos"], batch["labels"])
            self.icl.update(batch["k"], batch["task"], logp, hit)

    def on_validation_epoch_start(self) -> None:
        # sums from zero, made in this evaluation's mode: trainer.validate runs in inference mode and
        # validation inside fit does not, and a tensor made in the one cannot be updated in place in the other
        if self.icl is not None:
            self.icl.reset()

    def on_validation_epoch_end(self) -> None:
        # an evaluation's scalars at the step its curves and images carry (the steps taken), not
        # Lightning's default for validation inside training, one less
        self.log("step", float(self.global_step), add_dataloader_idx=False, rank_zero_only=True)
        if self.icl is None:
            return
        rows = curve_rows(self.icl.compute(), self.icl.k_values, run="")
        self.last_curve_rows = [] if self.trainer.sanity_checking else rows
        for r in self._rows_to_log(rows):
            self.log(f"icl/acc_k{r['k']}_task{r['task']}_shots{r['shots']}", r["acc"], add_dataloader_idx=False,
                     rank_zero_only=True)

    def _rows_to_log(self, rows: list[dict]) -> list[dict]:
        last: dict[tuple, int] = {}
        for r in rows:
            last[r["k"], r["task"]] = max(last.get((r["k"], r["task"]), 0), r["shots"])
        wanted = set(self.hparams.log_shots if self.hparams.log_shots is not None else [0, 1, 4, 16])
        return [r for r in rows if r["shots"] in wanted or r["shots"] == last[(r["k"], r["task"])]]
