"""The ICL curve as a torchmetrics Metric: sums per (k, task, shots), kept and synced on the device.

Only the hidden states at the positions that predict a label go through the LM head, so an evaluation
batch never materialises (or ships to the CPU) logits for the whole prompt. The metric's state is a
few [K, M, N] sum tensors reduced with `sum` across DDP ranks; `curve_rows` turns them into rows of
the curves table. The same metric accumulates the exact Bayesian learner (its log-probabilities and
hits), so model and ideal curves come from one code path.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from transformers import GPT2LMHeadModel

from contracts.curves_table import curve_row


def label_scores(model: GPT2LMHeadModel, input_ids: torch.Tensor, label_pos: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability [b, n] of each label given its prefix, and whether it is the top-1 token [b, n]."""
    hidden = model.transformer(input_ids=input_ids).last_hidden_state
    predicting = (label_pos - 1)[..., None].expand(-1, -1, hidden.shape[-1])  # the output at pos-1 predicts pos
    logp = model.lm_head(hidden.gather(1, predicting)).float().log_softmax(-1)  # [b, n, V]
    return logp.gather(-1, labels[..., None]).squeeze(-1), logp.argmax(-1) == labels


class ICLCurveMetric(Metric):
    """Sums of label probability, NLL, top-1 hits and prompt counts per (k, task, shots)."""

    full_state_update = False

    def __init__(self, k_values: Sequence[int], n_tasks: int, max_shots: int) -> None:
        super().__init__()
        self.k_values = list(k_values)
        shape = (len(self.k_values), n_tasks, max_shots)
        for name in ("prob", "nll", "hits", "count", "undefined"):
            # float64: sums over thousands of prompts stay exact enough that rank splits agree
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, k: int, task: int, label_logp: torch.Tensor, hit: torch.Tensor,
               defined: torch.Tensor | None = None) -> None:
        """One batch of prompts of one (k, task): label_logp and hit are [b, n] (n <= max_shots). Where
        `defined` [b, n] is False (a predictor with no prediction there), the point is only counted as such."""
        i, n = self.k_values.index(k), label_logp.shape[1]
        keep = torch.ones_like(hit, dtype=torch.bool) if defined is None else defined
        logp = torch.where(keep, label_logp.double(), 0.0)
        self.prob[i, task, :n] += torch.where(keep, logp.exp(), 0.0).sum(0)
        self.nll[i, task, :n] -= logp.sum(0)
        self.hits[i, task, :n] += (hit & keep).double().sum(0)
        self.count[i, task, :n] += keep.double().sum(0)
        self.undefined[i, task, :n] += (~keep).double().sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"prob": self.prob, "nll": self.nll, "hits": self.hits, "count": self.count, "undefined": self.undefined}


def curve_rows(sums: dict[str, torch.Tensor], k_values: Sequence[int], run: str, undefined_column: bool = False,
               **extra: object) -> list[dict[str, object]]:
    """Rows of the curves table (means over prompts) for every (k, task, shots) that saw a prompt with a
    defined prediction; `undefined_column` adds the count of prompts that had none."""
    count, undefined = sums["count"].cpu(), sums["undefined"].cpu()
    prob, nll, hits = (sums[name].cpu() / count.clamp_min(1) for name in ("prob", "nll", "hits"))
    rows = []
    for i, t, s in count.nonzero().tolist():
        rows.append(curve_row(run, k_values[i], t, s, prob[i, t, s].item(), nll[i, t, s].item(), hits[i, t, s].item(),
                              int(count[i, t, s]),
                              **({"undefined": int(undefined[i, t, s])} if undefined_column else {}),
                              **extra))
    return rows
