"""ICL curves outside training: from Lightning checkpoints or HF exports of our runs, and of the exact learner.

Uses the training path's own pieces (`label_scores`, `ICLCurveMetric`, `curve_rows`) on the prompts
of the run's datamodule, so curves measured here equal those logged during validation.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from datamodules.config_io import read_data_settings, with_icl_overrides
from datamodules.document_reader import DocumentReader
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import GincDataModule
from datamodules.sampling import shots_for_context, split_demonstrations
from datamodules.world import GincWorld
from lightning_modules.callbacks import DATA_FILE, RUN_INFO_KEY, RunInfo, plain
from lightning_modules.icl_metric import ICLCurveMetric, curve_rows, label_scores
from lightning_modules.gpt import read_checkpoint, read_pretrained, resolve_device

ARCH_KEYS = ("size", "n_layer", "n_embd", "n_head", "n_positions", "dropout", "vocab_size")
_DATA_KEYS = tuple(inspect.signature(GincDataModule.__init__).parameters)[1:]


@dataclass
class Source:
    """What a checkpoint or HF export of a run says about itself."""

    path: Path
    model: dict  # the module's hyperparameters (architecture at least)
    data: dict  # the GincDataModule arguments it was trained with
    info: RunInfo | None  # labels of its curve rows
    step: int


def read_source(path: str | Path) -> Source:
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / DATA_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an HF export of a run (needs config.json and {DATA_FILE}); point at a run's hf/ directory or a .ckpt")
        cfg = json.loads((path / "config.json").read_text())
        model = {"size": "gpt2-1l", **{k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}}
        meta = json.loads((path / DATA_FILE).read_text())
        data, info, step = meta["data"], meta.get(RUN_INFO_KEY), meta.get("step", 0)
    elif path.is_file():
        ckpt = read_checkpoint(path)
        if "datamodule_hyper_parameters" not in ckpt:
            raise ValueError(f"{path} was not written by train.py (no GINC datamodule settings inside); use a run's checkpoint")
        model, data = plain(dict(ckpt["hyper_parameters"])), plain(dict(ckpt["datamodule_hyper_parameters"]))
        info, step = ckpt.get(RUN_INFO_KEY), ckpt.get("global_step", 0)
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a run's checkpoints/last.ckpt (or best.ckpt) or its hf/ directory")
    data = {k: v for k, v in data.items() if k in _DATA_KEYS}
    return Source(path, model, data, RunInfo(**info) if info else None, int(step))


def load_model(path: str | Path) -> GPT2LMHeadModel:
    path = Path(path)
    if path.is_dir():
        return read_pretrained(path)
    from lightning_modules.lm_module import CausalLMModule  # lm_module imports this file's neighbours
    from lightning_modules import dpo  # noqa: F401  (imported so that DPO checkpoints, a CausalLMModule subclass, may load)

    return CausalLMModule.load_from_checkpoint(path, map_location="cpu", init_from=None).gpt


@torch.no_grad()
def model_curve_rows(model: GPT2LMHeadModel, data: GincDataModule, run: str, device: torch.device, **extra: object) -> list[dict]:
    """ICL curve rows of a model on the datamodule's ICL prompts (all of them: one process)."""
    model = model.to(device).eval()
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run):
        logp, hit = label_scores(model, batch["input_ids"].to(device), batch["label_pos"].to(device), batch["labels"].to(device))
        metric.update(batch["k"], batch["task"], logp, hit)
    return curve_rows(metric.compute(), data.icl.k_values, run, **extra)


def exact_curve_rows(data: GincDataModule, run: str = "exact", weights: object = None, device: str | torch.device = "cpu",
                     progress: bool = True, **extra: object) -> list[dict]:
    """The exact Bayesian learner's curve rows on the same prompts (prior = `weights`, default the world's)."""
    learner = ExactLearner(GincWorld.build(data.world).to(device), weights)
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run, progress):
        k, labels = batch["k"], batch["labels"].to(device)
        x, shown = split_demonstrations(batch["input_ids"].to(device), k, labels.shape[1])
        pred = learner.predict_demos(x, labels, shown if data.icl.demo_format == "sampled" else None)
        metric.update(k, batch["task"], pred.prob.log(), pred.correct)
    return curve_rows(metric.compute(), data.icl.k_values, run, **extra)


def reader_curve_rows(data: GincDataModule, run: str = "reader", weights: object = None,
                      device: str | torch.device = "cpu", progress: bool = True, **extra: object) -> list[dict]:
    """The document reader's curve rows on the same prompts: the Bayes-optimal documents-only model
    reading each prompt as one document. Points whose prefix no document can produce are left out of
    the means and counted in the `undefined` column; the share of them is printed."""
    reader = DocumentReader(GincWorld.build(data.world).to(device), weights)
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run, progress):
        labels, pos = batch["labels"].to(device), batch["label_pos"].to(device)
        out = reader.read(batch["input_ids"].to(device), next_tokens=True)
        scores = out.next_log_prob.gather(1, (pos - 1)[..., None].expand(-1, -1, out.next_log_prob.shape[-1]))
        defined = out.possible.gather(1, pos - 1)
        metric.update(batch["k"], batch["task"], scores.gather(-1, labels[..., None]).squeeze(-1),
                      scores.argmax(-1) == labels, defined)
    sums = metric.compute()
    total = float(sums["count"].sum() + sums["undefined"].sum())
    if progress:
        print(f"{run}: {float(sums['undefined'].sum()) / max(total, 1):.1%} of scored positions have probability 0 as "
              "a document (the reader has no prediction there; counted in the `undefined` column)", file=sys.stderr)
    return curve_rows(sums, data.icl.k_values, run, undefined_column=True, **extra)


def ideal_references(data: GincDataModule, device: str | torch.device = "cpu") -> dict[str, list[dict]]:
    """Both ideal learners' curves on a data module's ICL prompts: what a trained model is drawn beside."""
    return {"exact Bayesian": exact_curve_rows(data, "exact", device=device, progress=False),
            "document reader": reader_curve_rows(data, "reader", device=device, progress=False)}


def _progress(loader: DataLoader, run: str, show: bool = True) -> Iterator[dict]:
    """The loader's batches, counting them on stderr (one line, rewritten) when `show`."""
    for i, batch in enumerate(loader):
        if show:
            print(f"\r{run}: ICL batch {i + 1}/{len(loader)}", end="", file=sys.stderr, flush=True)
        yield batch
    if show:
        print(file=sys.stderr)


def _metric(data: GincDataModule) -> ICLCurveMetric:
    shots = [data.icl.n_shots or shots_for_context(data.context_length, k) for k in data.icl.k_values]
    return ICLCurveMetric(data.icl.k_values, data.world.n_tasks, max(shots))


def checkpoint_curve_rows(args: argparse.Namespace) -> list[dict]:
    """`evaluate.py curves --ckpt ...`: rows labelled and annotated like the run's own curves.csv."""
    if args.run and len(args.ckpt) > 1:
        raise ValueError("--run labels one source; with several --ckpt leave it out (each run's own label is used)")
    device = torch.device(resolve_device(args.device))
    given = read_data_settings(args.data_config) if args.data_config is not None else {}
    rows: list[dict] = []
    for path in args.ckpt:
        src = read_source(path)
        settings = {**src.data, **given, "icl": {**(src.data.get("icl") or {}), **(given.get("icl") or {})}}
        data = GincDataModule(**with_icl_overrides(settings, args.k or None, args.prompts or None, args.batch_size))
        extra = src.info.columns(src.step) if src.info else {"step": src.step}
        label = args.run or (src.info.run if src.info else src.path.stem)
        rows += model_curve_rows(load_model(path), data, label, device, **extra)
    return rows
