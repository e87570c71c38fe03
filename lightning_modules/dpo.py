"""Preference post-training (DPO, IPO) of a pretrained GPT-2 on GINC preference pairs.

The losses are pure functions of summed sequence log-probabilities, so they are tested alone. The
module is the causal-LM module with another training step: the policy starts from `init_from`, and a
frozen copy of that checkpoint is the reference. Validation (held-out loss and the ICL curves) is the
causal-LM module's, unchanged, so DPO and SFT runs produce comparable curve tables.

The reference log-probabilities of a finite set of pairs (`train_pairs`, given when the module is
built) are computed once, at the start of fit, whenever the run revisits the pairs: measured on one
CPU core at tiny sizes, the reference forward adds 15-55% to a training step, and a cache pays that
once per pair instead of once per visit. The reference then runs only on logging steps, for the KL to
the reference, which needs its full next-token distributions. Endless streams, runs shorter than one
pass and modules built without their pairs use the reference live.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from datamodules.ginc_datamodule import GincDataModule
from datamodules.preference_datamodule import PairBlocks, PreferenceDataModule
from lightning_modules.lm_module import CausalLMModule
from models.gpt import ModelConfigError
from user_errors import UserError


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023): mean of -log sigmoid(beta * h), h = chosen log-ratio
    minus rejected log-ratio.

    Returns (loss, chosen rewards, rejected rewards); a reward is beta * log(policy / reference) [B].
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   beta)
    return -F.logsigmoid(beta * (chosen - rejected)).mean(), beta * chosen, beta * rejected


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): mean of (h - 1 / (2 beta))^2, which stops pushing once the margin h reaches 1/(2 beta).

    Returns (loss, chosen rewards, rejected rewards) as `dpo_loss` does.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   beta)
    return (chosen - rejected - 1 / (2 * beta)).square().mean(), beta * chosen, beta * rejected


def _log_ratios(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(policy / reference) of the chosen and the rejected sequences, in float32 (bf16 sums lose the margin)."""
    if not beta > 0:
        raise UserError(f"beta must be > 0, got {beta}; DPO/IPO need a positive KL strength (default 0.1)")
    return pc.float() - rc.float(), pr.float() - rr.float()


LOSS_FUNCTIONS = {"dpo": dpo_loss, "ipo": ipo_loss}


def next_token_log_probs(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-distributions [B, T-1, V] (float32) of tokens 1.. given their prefixes."""
    return model(input_ids=input_ids[:, :-1]).logits.float().log_softmax(-1)


def target_logps(log_probs: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed log-probability [B] of each sequence's tokens after the prompt (the BOS at position 0)."""
    return log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1).sum(-1)


def sequence_logps(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(document | BOS) [B]: the sum of the token log-probabilities after the BOS."""
    return target_logps(next_token_log_probs(model, input_ids), input_ids)


def mean_token_kl(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) of the next-token distributions, averaged over positions and sequences."""
    return (policy_log_probs.exp() * (policy_log_probs - ref_log_probs)).sum(-1).mean()


class PreferenceModule(CausalLMModule):
    """GPT-2 post-trained on preference pairs by DPO or IPO against a frozen copy of its starting checkpoint.

    beta: strength of the KL anchor to the reference (> 0). loss: dpo (sigmoid) or ipo.
    cache_reference: compute the reference log-probabilities of every pair once, at the start of fit
    (None: when the run revisits its finite set of pairs; True needs a finite data.train_documents).
    train_pairs: the pairs training draws from (the preference datamodule's `train_pairs`; train.py links them).
    Every other argument is CausalLMModule's; training needs init_from (the pretrained checkpoint).
    """

    data_only = ("train_pairs",)

    def __init__(self, beta: float = 0.1, loss: str = "dpo", cache_reference: bool | None = None,
                 train_pairs: PairBlocks | None = None, **kwargs: Any) -> None:
        if not beta > 0:
            raise ModelConfigError(f"model.beta must be > 0, got {beta}; "
                                   "it is the KL strength of DPO/IPO (default 0.1)")
        if loss not in LOSS_FUNCTIONS:
            raise ModelConfigError(f"unknown model.loss {loss!r}; choose one of {', '.join(LOSS_FUNCTIONS)}")
        if cache_reference and (train_pairs is None or train_pairs.n_documents is None):
            raise ModelConfigError("model.cache_reference needs a finite set of pairs: set data.train_documents "
                                   "(or leave cache_reference null)")
        super().__init__(**kwargs)
        self.train_pairs = train_pairs
        self.reference: GPT2LMHeadModel | None = None
        # [2, pairs]: reference log p of each chosen / rejected document
        self.reference_cache: torch.Tensor | None = None

    def check_data(self, data: GincDataModule) -> None:
        super().check_data(data)
        if not isinstance(data, PreferenceDataModule):
            raise ModelConfigError("PreferenceModule trains on preference pairs: set data.class_path to "
                                   "datamodules.preference_datamodule.PreferenceDataModule")

    def setup(self, stage: str) -> None:
        # checked here, not in __init__, so evaluation can load a checkpoint without it
        if stage == "fit" and self.hparams.init_from is None:
            raise ModelConfigError("preference training starts from a pretrained model: "
                                   "pass --model.init_from runs/NAME/checkpoints/last.ckpt (or runs/NAME/hf)")

    def configure_model(self) -> None:
        if self.reference is not None:
            return
        super().configure_model()
        # the reference is the starting point; on resume the checkpoint later overwrites the policy only
        self.reference = GPT2LMHeadModel(self.gpt.config)
        self.reference.load_state_dict(self.gpt.state_dict())
        self.reference.requires_grad_(False).eval()
        if self.compiles():  # as the policy is (on GPU by default)
            self.reference.compile()

    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # Lightning switches every submodule to train mode; the reference keeps no dropout
        return self

    # ---- reference log-probabilities: live, or once per pair -----------------------------------
    def on_fit_start(self) -> None:
        self.reference_cache = self._precompute_reference(self.train_pairs) if self._revisits_pairs() else None

    def _revisits_pairs(self) -> bool:
        pairs = self.train_pairs
        if self.hparams.cache_reference is not None or pairs is None or pairs.n_documents is None:
            return bool(self.hparams.cache_reference)
        t = self.trainer
        pairs_seen = t.max_steps * t.accumulate_grad_batches * pairs.batch_size * t.world_size
        return t.max_steps < 0 or pairs_seen > pairs.n_documents

    @torch.no_grad()
    def _precompute_reference(self, pairs: PairBlocks) -> torch.Tensor:
        """Each rank scores an equal slice of the pairs (the last one padded by repeats), then all ranks gather them."""
        n, world = pairs.n_documents, self.trainer.world_size
        per_rank = math.ceil(n / world)
        mine = (self.global_rank * per_rank + torch.arange(per_rank)).clamp(max=n - 1)
        parts = []
        with self.trainer.precision_plugin.forward_context():  # the same autocast as a training step's forward
            for ids in mine.split(pairs.batch_size):
                pair = pairs.pairs(ids)
                both = torch.cat([pair["chosen_ids"], pair["rejected_ids"]]).to(self.device)
                parts.append(sequence_logps(self.reference, both).view(2, -1))
        gathered = self.all_gather(torch.cat(parts, 1)).reshape(-1, 2, per_rank)  # [world, 2, per_rank]
        return gathered.permute(1, 0, 2).reshape(2, -1)[:, :n].contiguous()

    def _reference(self, ids: torch.Tensor, pair_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log p of each sequence [2B] and, when a forward ran, its next-token log-distributions (for the KL).

        With the cache, the reference runs only on logging steps, where the KL is wanted.
        """
        ref = None
        if self.reference_cache is None or self.log_flush_step():
            with torch.no_grad():
                ref = next_token_log_probs(self.reference, ids)
        logps = (target_logps(ref, ids) if self.reference_cache is None
                 else self.reference_cache[:, pair_ids].reshape(-1))
        return logps, ref

    # ---- training (validation is the causal-LM module's) --------------------------------------
    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The preference loss of a batch of pairs, and the statistics logged beside it (the KL to the
        reference on the steps where the reference ran)."""
        n = batch["chosen_ids"].shape[0]
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # one forward for both halves
        policy = next_token_log_probs(self.gpt, ids)
        p = target_logps(policy, ids)
        r, ref = self._reference(ids, batch["pair_ids"])
        loss, chosen, rejected = LOSS_FUNCTIONS[self.hparams.loss](p[:n], p[n:], r[:n], r[n:], self.hparams.beta)
        stats = {"reward_acc": (chosen > rejected).float().mean(), "reward_chosen": chosen.mean(),
                 "reward_rejected": rejected.mean(), "margin": (chosen - rejected).mean()}
        if ref is not None:
            stats["kl"] = mean_token_kl(policy.detach(), ref)
        return loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, stats = self.model_step(batch)
        self.log_dict({"train/loss": loss, **{f"train/{name}": value for name, value in stats.items()}})
        self.guard_loss(loss)
        self.log_rates(2 * batch["chosen_ids"].numel())  # both halves of every pair
        return loss

    # the reference is rebuilt from init_from, so checkpoints hold the policy only (and stay loadable as a causal LM)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("reference.")}
        super().on_save_checkpoint(checkpoint)  # the weight check every stage gets

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.reference is not None:
            checkpoint["state_dict"].update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
