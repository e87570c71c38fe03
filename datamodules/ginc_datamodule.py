"""LightningDataModule of the GINC world: pretraining/SFT blocks, validation blocks and ICL prompts.

Training data is streamed: each batch is generated when it is needed from its global index (about 30 ms
on one CPU core for 32 x 1024 tokens, see docs/guide.md), so there is nothing to store, any mixture can
be asked for, and a run resumed at batch b continues with exactly batch b. Rank r of W takes global
batches r, r + W, ...; worker w of a loader takes every num_workers-th of those, and the loader
interleaves them back in order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.document_reader import DocumentReader
from datamodules.rng import stream_key, uniform
from datamodules.sampling import GincSampler, shots_for_context
from datamodules.world import GincWorld, WorldConfig, WorldConfigError, check_weights, world_config


@dataclass
class ICLConfig:
    k_values: list[int] = field(default_factory=lambda: [3, 5, 8, 10])
    prompts_per_task: int = 64  # prompts for each (k, task)
    n_shots: int | None = None  # None -> as many as fill the context
    tasks: list[int] | None = None  # None -> every task
    batch_size: int = 16  # prompts per evaluation batch
    # "label": a demonstration shows its target as its k-th token; "sampled": it shows the HMM's own next
    # emission and the target (the most likely next emission) is scored there, as in the reference code
    demo_format: str = "label"

    def __post_init__(self) -> None:
        """Counts of 0 used to surface as "range() arg 3 must not be zero" or pass silently (n_shots 0 fell
        back to filling the context); each is refused here with the setting's name."""
        for name, value in (("prompts_per_task", self.prompts_per_task), ("batch_size", self.batch_size)):
            if value < 1:
                raise WorldConfigError(f"icl.{name} must be >= 1, got {value}")
        if self.n_shots is not None and self.n_shots < 1:
            raise WorldConfigError(f"icl.n_shots must be >= 1 (or null: as many as fill the context), "
                                   f"got {self.n_shots}")
        if not self.k_values or len(set(self.k_values)) != len(self.k_values):
            raise WorldConfigError(f"icl.k_values must list each example length once, got {self.k_values}")
        if self.tasks is not None and (not self.tasks or any(t < 0 for t in self.tasks)):
            raise WorldConfigError(f"icl.tasks must be task indices >= 0 (or null: every task), got {self.tasks}")


def _as_world(world: WorldConfig | dict | None) -> WorldConfig:
    """A world given as settings is checked setting by setting (an unknown key, a string, nan), not passed
    on as keywords for a TypeError to surface deep inside."""
    return world_config(world, "world.")


def _as_icl(icl: ICLConfig | dict | None) -> ICLConfig:
    if icl is None:
        return ICLConfig()
    return icl if isinstance(icl, ICLConfig) else ICLConfig(**icl)


_TRAIN_PROMPT_OFFSET = 1 << 40


@dataclass
class DemoRows:
    """Pretraining blocks that are ICL prompts instead of documents."""

    rate: float
    k_values: list[int]
    demo_format: str = "label"


class DocumentBlocks:
    """Blocks of BOS + (context_length - 1) tokens, each a fresh document of a stream.

    With `n_documents` set, the stream is a finite set of documents (an SFT amount) revisited in a
    new seeded order each epoch; otherwise every block is a new document. With `demo` set, a share
    `demo.rate` of the blocks are ICL prompts instead (the block's own task, a k from `demo.k_values`,
    the block filled with demonstrations), so that pretraining shows the prompt format.
    """

    def __init__(self, world: WorldConfig, context_length: int, batch_size: int, weights: object, stream: str,
                 n_documents: int | None = None, demo: DemoRows | None = None) -> None:
        self.world, self.context_length, self.batch_size = world, context_length, batch_size
        self.weights = check_weights(world.weights if weights is None else weights, world.n_tasks, "train weights")
        self.stream, self.n_documents, self.demo = stream, n_documents, demo
        self._sampler: GincSampler | None = None

    @property
    def sampler(self) -> GincSampler:
        if self._sampler is None:  # built lazily, inside each worker process
            self._sampler = GincSampler(GincWorld.build(self.world))
        return self._sampler

    def doc_ids(self, batch_index: int) -> torch.Tensor:
        pos = torch.arange(batch_index * self.batch_size, (batch_index + 1) * self.batch_size)
        if self.n_documents is None:
            return pos
        epoch, slot = pos // self.n_documents, pos % self.n_documents
        ids = torch.empty_like(pos)
        for e in epoch.unique().tolist():  # one seeded permutation per epoch touched by this batch
            g = torch.Generator().manual_seed(stream_key(self.world.seed, "order", self.stream, e))
            perm = torch.randperm(self.n_documents, generator=g)
            ids[epoch == e] = perm[slot[epoch == e]]
        return ids

    def batch(self, batch_index: int) -> dict[str, torch.Tensor]:
        ids = self.doc_ids(batch_index)
        docs = self.sampler.documents(ids, self.context_length - 1, self.weights, self.stream)
        bos = torch.full((self.batch_size, 1), self.world.bos_id, dtype=torch.long)
        tokens = torch.cat([bos, docs.tokens], 1)
        if self.demo is not None and self.demo.rate > 0:
            self._put_demonstrations(tokens, ids, docs.tasks)
        return {"input_ids": tokens, "tasks": docs.tasks}

    def _put_demonstrations(self, tokens: torch.Tensor, ids: torch.Tensor, tasks: torch.Tensor) -> None:
        """Replace the blocks drawn for demonstrations (a hash of their id) by ICL prompts of their task."""
        demo, L = self.demo, self.context_length
        key = stream_key(self.world.seed, "demo-rows", self.stream)
        picked = uniform(key, ids, -1) < demo.rate
        ks = torch.as_tensor(demo.k_values)[(uniform(key, ids, -2) * len(demo.k_values)).long()]
        for task, k in {(int(t), int(k)) for t, k in zip(tasks[picked], ks[picked])}:
            rows = picked & (tasks == task) & (ks == k)
            # prompt ids far above any evaluation prompt's, so training never shows an evaluation prompt
            prompts = self.sampler.icl_prompts(task, k, ids[rows] + _TRAIN_PROMPT_OFFSET, L // (k + 1) + 1,
                                               demo.demo_format)
            tokens[rows] = prompts.tokens[:, :L]


class BlockStream(IterableDataset):
    """Endless stream of training batches, from global batch `start` on, sharded over ranks and workers."""

    def __init__(self, blocks: DocumentBlocks, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.blocks, self.start, self.rank, self.world_size = blocks, start, rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + worker
        while True:
            yield self.blocks.batch(step * self.world_size + self.rank)
            step += n_workers


class ICLPromptSet(Dataset):
    """Evaluation prompts: one item = a batch of prompts of one (k, task), this rank's share only."""

    def __init__(self, world: WorldConfig, icl: ICLConfig, context_length: int, rank: int = 0,
                 world_size: int = 1) -> None:
        sampler = GincSampler(GincWorld.build(world))
        tasks = icl.tasks if icl.tasks is not None else list(range(world.n_tasks))
        items = []
        for k in icl.k_values:
            n_shots = icl.n_shots or shots_for_context(context_length, k)
            if n_shots * (k + 1) > context_length:
                raise WorldConfigError(f"{n_shots} shots of k={k} need {n_shots * (k + 1)} tokens, "
                                       f"more than context_length {context_length}; lower icl.n_shots")
            for task in tasks:
                for lo in range(0, icl.prompts_per_task, icl.batch_size):
                    ids = torch.arange(lo, min(lo + icl.batch_size, icl.prompts_per_task))
                    items.append((k, task, ids, n_shots))
        self.items = []
        for k, task, ids, n_shots in items[rank::world_size]:
            p = sampler.icl_prompts(task, k, ids, n_shots, icl.demo_format)
            self.items.append({"input_ids": p.tokens, "label_pos": p.label_pos, "labels": p.labels, "k": k,
                               "task": task})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def with_floor(batch: dict[str, torch.Tensor], reader: DocumentReader) -> dict[str, torch.Tensor]:
    """A validation batch with the floor of its loss: the document reader's mean NLL per token (what a
    model that learned the world exactly would score) and that of each document's true task alone."""
    out = reader.read(batch["input_ids"])
    own = out.task_log_prob.gather(-1, batch["tasks"][:, None, None].expand(-1, out.task_log_prob.shape[1], 1))
    return {**batch, "floor": -out.log_prob[:, 1:].mean(), "task_floor": -own[:, 1:].mean()}


class GincDataModule(L.LightningDataModule):
    """Pretraining (or SFT, with other `train_weights` and an amount) plus validation loss and ICL prompts.

    Validation dataloader 0 is held-out blocks (loss); dataloader 1 is the ICL prompts.
    """

    def __init__(
        self,
        world: WorldConfig | dict | None = None,
        context_length: int = 1024,
        batch_size: int = 32,
        train_weights: list[float] | None = None,
        train_documents: int | None = None,
        train_stream: str = "pretrain",
        val_documents: int = 256,
        icl: ICLConfig | dict | None = None,
        num_workers: int = 0,
        demo_rate: float = 0.0,
    ) -> None:
        """demo_rate: the share of training blocks that are ICL prompts (in icl.demo_format, k from
        icl.k_values, the block's own task) instead of documents; validation blocks stay documents."""
        super().__init__()
        self.world = _as_world(world)
        self.icl = _as_icl(icl)
        if context_length < 2:
            raise WorldConfigError(f"context_length must be >= 2, got {context_length}")
        if batch_size < 1:
            raise WorldConfigError(f"batch_size must be >= 1, got {batch_size}")
        if train_documents is not None and train_documents < 1:
            raise WorldConfigError(f"train_documents must be >= 1 (or null for an endless stream), "
                                   f"got {train_documents}")
        for k in self.icl.k_values:
            shots_for_context(context_length, k)  # checks k and that one example fits
        if self.icl.tasks is not None and max(self.icl.tasks) >= self.world.n_tasks:
            raise WorldConfigError(f"icl.tasks {self.icl.tasks} must name tasks of the world "
                                   f"(0..{self.world.n_tasks - 1})")
        self.context_length, self.batch_size = context_length, batch_size
        self.train_weights = (None if train_weights is None
                              else list(check_weights(train_weights, self.world.n_tasks, "train_weights")))
        self.train_documents, self.train_stream = train_documents, train_stream
        self.val_documents, self.num_workers = val_documents, num_workers
        if not 0.0 <= demo_rate <= 1.0:
            raise WorldConfigError(f"demo_rate must be in [0, 1] (a share of training blocks), got {demo_rate}")
        self.demo_rate = demo_rate
        self._val_items: dict[tuple[int, int], list[dict]] = {}  # validation blocks with their floor, per shard
        self.save_hyperparameters()

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _start_batch(self) -> int:
        """Batches this rank already trained on (non-zero when a run resumes from a checkpoint)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def train_blocks(self) -> DocumentBlocks:
        demo = DemoRows(self.demo_rate, self.icl.k_values, self.icl.demo_format) if self.demo_rate > 0 else None
        return DocumentBlocks(self.world, self.context_length, self.batch_size, self.train_weights, self.train_stream,
                              self.train_documents, demo)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        stream = BlockStream(self.train_blocks(), self._start_batch(), rank, world_size)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world_size = self._rank()
        if (rank, world_size) not in self._val_items:  # a run validates before fit, then during it: build once
            n_batches = math.ceil(self.val_documents / self.batch_size)
            val = DocumentBlocks(self.world, self.context_length, self.batch_size, self.train_weights, "val")
            reader = DocumentReader(GincWorld.build(self.world), val.weights)
            self._val_items[rank, world_size] = [with_floor(val.batch(i), reader)
                                                 for i in range(rank, n_batches, world_size)]
        return [DataLoader(self._val_items[rank, world_size], batch_size=None), self.icl_dataloader()]

    def icl_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        return DataLoader(ICLPromptSet(self.world, self.icl, self.context_length, rank, world_size), batch_size=None)
