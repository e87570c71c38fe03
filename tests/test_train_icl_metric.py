"""The ICL curve metric: label scores equal the full-logit computation; sums, rows and DDP sync are right."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.ginc_datamodule import ICLConfig, ICLPromptSet
from datamodules.world import WorldConfig
from lightning_modules.icl_metric import ICLCurveMetric, curve_rows, label_scores
from models.gpt import build_gpt, resolve_spec
from tests.conftest import TINY_WORLD

WORLD = WorldConfig(**TINY_WORLD)
ICL = ICLConfig(k_values=[2, 3], prompts_per_task=6, batch_size=4)
CONTEXT = 32


def tiny_gpt(seed: int = 0):
    torch.manual_seed(seed)
    spec = resolve_spec("gpt2-1l", n_embd=32, n_head=2, n_positions=CONTEXT)
    return build_gpt(spec, WORLD.model_vocab_size, WORLD.bos_id, WORLD.pad_id).eval()


def metric_rows(rank: int = 0, world_size: int = 1) -> list[dict]:
    model, metric = tiny_gpt(), ICLCurveMetric(ICL.k_values, WORLD.n_tasks, CONTEXT // 3)
    with torch.no_grad():
        for item in ICLPromptSet(WORLD, ICL, CONTEXT, rank, world_size):
            metric.update(item["k"], item["task"],
                          *label_scores(model, item["input_ids"], item["label_pos"], item["labels"]))
    return curve_rows(metric.compute(), ICL.k_values, run="m")


def test_label_scores_match_full_logits():
    model = tiny_gpt()
    item = ICLPromptSet(WORLD, ICL, CONTEXT)[0]
    with torch.no_grad():
        logp, hit = label_scores(model, item["input_ids"], item["label_pos"], item["labels"])
        full = model(item["input_ids"]).logits.log_softmax(-1)  # [b, L, V]
    rows = torch.arange(len(item["labels"]))[:, None]
    at = full[rows, item["label_pos"] - 1]  # the position before a label predicts it
    torch.testing.assert_close(logp, at.gather(-1, item["labels"][..., None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(hit, at.argmax(-1) == item["labels"])


def test_rows_are_means_per_k_task_shots():
    metric = ICLCurveMetric([2, 5], n_tasks=2, max_shots=4)
    metric.update(5, 1, torch.log(torch.tensor([[0.5, 0.25], [0.25, 0.25]])),
                  torch.tensor([[True, False], [False, False]]))
    metric.update(5, 1, torch.log(torch.tensor([[1.0, 0.5]])), torch.tensor([[True, True]]))
    rows = curve_rows(metric.compute(), [2, 5], run="r", step=3)
    assert [(r["k"], r["task"], r["shots"]) for r in rows] == [(5, 1, 0), (5, 1, 1)]  # unseen cells give no row
    first = rows[0]
    assert first["count"] == 3 and first["step"] == 3 and first["run"] == "r"
    assert first["prob"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert first["acc"] == pytest.approx(2 / 3)
    assert first["nll"] == pytest.approx(-(torch.log(torch.tensor([0.5, 0.25, 1.0],
                                                                  dtype=torch.float64)).sum().item()) / 3)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    rows = metric_rows(rank, world_size)  # compute() all-reduces the sums of both ranks
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def test_two_ddp_processes_give_the_single_process_curves(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rows.pt")
    # fork: the children need not re-import torch
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="fork")
    ddp, single = torch.load(out), metric_rows()
    assert len(single) == len(ddp) == WORLD.n_tasks * (CONTEXT // 3 + CONTEXT // 4)  # shots of k=2 and k=3
    assert len(ICLPromptSet(WORLD, ICL, CONTEXT, 0, 2)) < len(ICLPromptSet(WORLD, ICL, CONTEXT))  # ranks really split
    for a, b in zip(ddp, single):
        assert {k: a[k] for k in ("k", "task", "shots", "count")} == {k: b[k] for k in ("k", "task", "shots", "count")}
        for key in ("prob", "nll", "acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)
