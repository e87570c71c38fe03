"""Preference pairs of the GINC world for DPO/IPO: chosen documents from one mixture, rejected from another.

The chosen mixture is the SFT one, `train_weights`, so one pair of settings serves both methods:
favouring tasks f (train_weights on f) prefers documents of f over documents of the other tasks, and
disfavouring f (train_weights on the others) prefers the others over f. The rejected mixture is the
world's weights on the tasks the chosen mixture leaves out, or `rejected_weights` when given.
Pairs stream exactly like the pretraining blocks (same seeding, rank/worker sharding and resume), and
`train_documents` is the amount: that many pairs, revisited in a new seeded order every epoch.
Validation is GincDataModule's, unchanged.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datamodules.ginc_datamodule import DocumentBlocks, GincDataModule
from datamodules.world import WorldConfig, WorldConfigError, check_weights


class PairBlocks(DocumentBlocks):
    """Batches of pairs: chosen_ids, rejected_ids [B, length] (BOS + a document each), their tasks, and pair_ids.

    Pair i is the same whichever rank, worker or batch draws it; `length` is the pair length, BOS included.
    """

    def __init__(self, world: WorldConfig, length: int, batch_size: int, chosen: np.ndarray, rejected: np.ndarray,
                 stream: str, n_pairs: int | None) -> None:
        super().__init__(world, length, batch_size, chosen, stream, n_pairs)
        self.rejected = rejected

    def pairs(self, pair_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pairs `pair_ids` of this stream (also how DPO scores every pair once with the reference)."""
        chosen, rejected = self.sampler.preference_pairs(pair_ids, self.context_length - 1, self.weights, self.rejected,
                                                         self.stream)
        bos = torch.full((pair_ids.shape[0], 1), self.world.bos_id, dtype=torch.long)
        return {"chosen_ids": torch.cat([bos, chosen.tokens], 1), "rejected_ids": torch.cat([bos, rejected.tokens], 1),
                "chosen_tasks": chosen.tasks, "rejected_tasks": rejected.tasks, "pair_ids": pair_ids}

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        return self.pairs(self.doc_ids(batch_index))


class PreferenceDataModule(GincDataModule):
    """GincDataModule whose training batches are preference pairs (batch_size pairs per batch).

    train_weights: the chosen mixture (required; train.py sets it from run.direction and run.tasks).
    rejected_weights: the rejected mixture (None: the world's weights on the tasks not chosen).
    train_documents: the number of pairs (None: every pair is new). pair_length: tokens of each
    sequence, BOS included (None: the context length). Other arguments are GincDataModule's.
    """

    def __init__(self, rejected_weights: list[float] | None = None, pair_length: int | None = None,
                 train_stream: str = "preference", **kwargs: Any) -> None:
        super().__init__(train_stream=train_stream, **kwargs)
        self.pair_length = self.context_length if pair_length is None else pair_length
        if not 2 <= self.pair_length <= self.context_length:
            raise WorldConfigError(f"pair_length must be in [2, context_length={self.context_length}] "
                                   f"(BOS plus at least one token), got {pair_length}")
        self.chosen_weights, self.rejected_weights = preference_mixtures(self.world, self.train_weights,
                                                                         rejected_weights)

    def train_blocks(self) -> PairBlocks:
        return PairBlocks(self.world, self.pair_length, self.batch_size, self.chosen_weights, self.rejected_weights,
                          self.train_stream, self.train_documents)

    @property
    def train_pairs(self) -> PairBlocks:
        """The pairs training draws from, for the preference module (which scores them once with its reference)."""
        return self.train_blocks()


def preference_mixtures(world: WorldConfig, chosen: object, rejected: object) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) mixtures, normalised; the two must put weight on disjoint sets of tasks."""
    if chosen is None:
        raise WorldConfigError("preference data needs a chosen mixture: pass --run.direction favor|disfavor "
                               "with --run.tasks [..], or data.train_weights")
    chosen = check_weights(chosen, world.n_tasks, "train_weights (the chosen mixture)")
    if rejected is None:
        rest = np.where(chosen > 0, 0.0, np.asarray(world.weights))
        if rest.sum() <= 0:
            raise WorldConfigError("the chosen mixture covers every task the world samples, so nothing is left "
                                   "to reject; favour fewer tasks or give data.rejected_weights")
        rejected = rest
    rejected = check_weights(rejected, world.n_tasks, "rejected_weights")
    both = np.flatnonzero((chosen > 0) & (rejected > 0)).tolist()
    if both:
        raise WorldConfigError(f"task(s) {both} are both chosen and rejected (favoured set overlaps the "
                               "disfavoured set); make data.train_weights and data.rejected_weights disjoint")
    return chosen, rejected
