"""The causal-LM module: the learning-rate schedule, and a tiny GPT-2 that learns the world and ICL."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from datamodules.ginc_datamodule import GincDataModule
from lightning_modules.lm_module import CausalLMModule, OptimConfig, adamw_with_schedule, data_arguments

# the quickstart's world: one token per hidden state, near-deterministic property moves
WORLD = dict(n_tasks=3, n_entities=5, n_properties=5, vocab_size=30, distinct_emissions=True, property_temperature=0.01)


def test_warmup_then_cosine_to_the_floor_and_no_decay_on_vectors():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.5)
    opt = adamw_with_schedule(model, cfg, total_steps=14, fused=False)
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        optimizer.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lrs[14:] == pytest.approx([0.1] * 6)  # the floor after total_steps
    decays = {p.dim(): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {2: 0.5, 1: 0.0}


@pytest.mark.slow
def test_tiny_model_learns_the_world_and_in_context(single_thread):
    torch.manual_seed(0)
    data = GincDataModule(world=WORLD, context_length=64, batch_size=16, val_documents=32,
                          icl=dict(k_values=[2], prompts_per_task=32, batch_size=32))
    module = CausalLMModule("gpt2-2l", n_embd=64, n_head=4, n_positions=64, compile=False,
                            optim=OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.0), **data_arguments(data))
    trainer = L.Trainer(max_steps=400, val_check_interval=400, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", use_distributed_sampler=False)
    first = trainer.validate(module, data, verbose=False)[0]
    before = first["val/loss"]
    start = module.last_curve_rows
    trainer.fit(module, data)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    after = metrics["val/loss"]
    assert after < 0.5 * before, (before, after)
    # the excess over the document reader's loss (the world's floor) shrinks towards 0 and stays above it
    floor = after - metrics["val/excess_loss"]
    assert floor == pytest.approx(before - first["val/excess_loss"], rel=1e-5)
    assert 0 < metrics["val/excess_loss"] < 0.2 * first["val/excess_loss"], metrics
    assert metrics["val/excess_loss_task"] >= metrics["val/excess_loss"] - 1e-6  # the true task's floor is lower

    rows = module.last_curve_rows
    n = max(r["shots"] for r in rows)

    def acc(rows: list[dict], shots: range) -> float:
        return sum(r["acc"] for r in rows if r["shots"] in shots) / sum(r["shots"] in shots for r in rows)

    zero, many = acc(rows, range(1)), acc(rows, range(n - 4, n + 1))
    assert many > zero + 0.15, (zero, many)
    assert many > acc(start, range(n - 4, n + 1)) + 0.3  # learnt, not there at initialisation
