"""The GINC data module: seeded, disjoint across ranks and workers, resumable, finite SFT amounts."""
import itertools
import re

import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.ginc_datamodule import BlockStream, DocumentBlocks, GincDataModule, ICLConfig, ICLPromptSet
from datamodules.world import WorldConfig, WorldConfigError
from tests.conftest import SMOOTH_WORLD, TINY_WORLD

WORLD = WorldConfig(**TINY_WORLD)


def _take(loader, n):
    return [b["input_ids"] for b in itertools.islice(iter(loader), n)]


def test_blocks_start_with_bos_and_repeat_for_a_seed():
    blocks = DocumentBlocks(WORLD, 32, 4, None, "pretrain")
    b = blocks.batch(3)
    assert b["input_ids"].shape == (4, 32) and (b["input_ids"][:, 0] == WORLD.bos_id).all()
    assert torch.equal(DocumentBlocks(WORLD, 32, 4, None, "pretrain").batch(3)["input_ids"], b["input_ids"])
    assert not torch.equal(blocks.batch(4)["input_ids"], b["input_ids"])


def test_ranks_and_workers_get_distinct_reproducible_batches():
    blocks = DocumentBlocks(WORLD, 16, 2, None, "pretrain")
    single = _take(DataLoader(BlockStream(blocks), batch_size=None), 6)
    rank0 = _take(DataLoader(BlockStream(blocks, rank=0, world_size=2), batch_size=None), 3)
    rank1 = _take(DataLoader(BlockStream(blocks, rank=1, world_size=2), batch_size=None), 3)
    # the two ranks split the single-process stream between them, without overlap
    assert all(torch.equal(a, b) for a, b in zip(rank0, single[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(rank1, single[1::2]))
    workers = _take(DataLoader(BlockStream(blocks), batch_size=None, num_workers=2), 6)
    assert all(torch.equal(a, b) for a, b in zip(workers, single))


def test_resume_continues_with_the_next_batch():
    blocks = DocumentBlocks(WORLD, 16, 2, None, "pretrain")
    full = _take(DataLoader(BlockStream(blocks), batch_size=None), 5)
    resumed = _take(DataLoader(BlockStream(blocks, start=3), batch_size=None), 2)
    assert torch.equal(resumed[0], full[3]) and torch.equal(resumed[1], full[4])


def test_finite_amount_revisits_the_same_documents_in_new_orders():
    blocks = DocumentBlocks(WORLD, 16, 5, [1, 0, 0], "sft", n_documents=10)
    ids = [blocks.doc_ids(i) for i in range(4)]
    epoch0, epoch1 = torch.cat(ids[:2]), torch.cat(ids[2:])
    assert sorted(epoch0.tolist()) == list(range(10)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert (blocks.batch(0)["tasks"] == 0).all()


def test_icl_prompt_set_shards_without_loss_or_overlap():
    icl = ICLConfig(k_values=[3, 5], prompts_per_task=6, batch_size=4)
    whole = ICLPromptSet(WORLD, icl, 48)
    parts = [ICLPromptSet(WORLD, icl, 48, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == sum(len(p) for p in parts) == 2 * 3 * 2
    key = lambda item: (item["k"], item["task"], item["input_ids"].numpy().tobytes())  # noqa: E731
    assert sorted(map(key, whole.items)) == sorted(key(i) for p in parts for i in p.items)
    assert {i["input_ids"].shape[1] for i in whole.items if i["k"] == 3} == {48}


def test_datamodule_loaders():
    dm = GincDataModule(world=WORLD, context_length=32, batch_size=4, val_documents=8,
                        icl={"k_values": [3], "prompts_per_task": 2})
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    val, icl = dm.val_dataloader()
    assert len(val) == 2 and len(icl) == 3
    sft = GincDataModule(world=WORLD, context_length=32, batch_size=4, train_weights=[0, 1, 0], train_documents=8,
                         train_stream="sft")
    assert (next(iter(sft.train_dataloader()))["tasks"] == 1).all()


def test_demonstration_rows_replace_a_share_of_pretraining_blocks_deterministically():
    from datamodules.sampling import GincSampler
    from datamodules.world import GincWorld, WorldConfig

    icl = dict(k_values=[3, 5], demo_format="sampled")
    plain = GincDataModule(world=SMOOTH_WORLD, context_length=48, batch_size=64, icl=icl).train_blocks().batch(3)
    mixed_dm = GincDataModule(world=SMOOTH_WORLD, context_length=48, batch_size=64, icl=icl, demo_rate=0.5)
    mixed = mixed_dm.train_blocks().batch(3)
    assert torch.equal(mixed["input_ids"], mixed_dm.train_blocks().batch(3)["input_ids"])  # a function of the index
    changed = (mixed["input_ids"] != plain["input_ids"]).any(1)
    assert 0.3 < changed.float().mean() < 0.7, changed.float().mean()
    assert torch.equal(mixed["input_ids"][~changed], plain["input_ids"][~changed])
    sampler = GincSampler(GincWorld.build(WorldConfig(**SMOOTH_WORLD)))
    row = int(changed.nonzero()[0])
    task = int(mixed["tasks"][row])
    doc_id = int(mixed_dm.train_blocks().doc_ids(3)[row])
    candidates = [sampler.icl_prompts(task, k, torch.tensor([doc_id + (1 << 40)]), 48 // (k + 1) + 1,
                                      "sampled").tokens[0, :48]
                  for k in (3, 5)]
    assert any(torch.equal(mixed["input_ids"][row], c) for c in candidates)
    with pytest.raises(WorldConfigError, match="demo_rate must be in"):
        GincDataModule(world=SMOOTH_WORLD, demo_rate=1.5)


@pytest.mark.parametrize(("icl", "message"), [
    ({"batch_size": 0}, "icl.batch_size must be >= 1, got 0"),
    ({"prompts_per_task": 0}, "icl.prompts_per_task must be >= 1"),
    ({"n_shots": 0}, "icl.n_shots must be >= 1"),
    ({"k_values": [3, 3]}, "icl.k_values must list each example length once"),
    ({"tasks": [7]}, "icl.tasks [7] must name tasks of the world"),
])
def test_icl_settings_that_cannot_be_are_named(icl, message):
    with pytest.raises(WorldConfigError, match=re.escape(message)):
        GincDataModule(context_length=64, icl=icl)
