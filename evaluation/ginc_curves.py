"""ICL curves on GINC prompts outside training: of our runs' checkpoints and HF exports, and of the two
ideal learners (the exact Bayesian learner, which knows the prompt format, and the document reader,
which knows only documents).

Uses the training path's own pieces (`label_scores`, `ICLCurveMetric`, `curve_rows`) on the prompts
of the run's datamodule, so curves measured here equal those logged during validation.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from analysis.progress import Progress
from contracts.run_artifacts import read_source
from datamodules.config_io import load_datamodule_config, read_data_settings, with_icl_overrides
from datamodules.document_reader import DocumentReader
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import GincDataModule
from datamodules.sampling import shots_for_context, split_demonstrations
from datamodules.world import GincWorld
from lightning_modules.dpo import PreferenceModule  # noqa: F401  (a DPO checkpoint names this class; loading needs it imported)
from lightning_modules.icl_metric import ICLCurveMetric, curve_rows, label_scores
from lightning_modules.lm_module import CausalLMModule
from models.gpt import read_pretrained, resolve_device
from user_errors import UserError

LEARNERS = ("exact", "reader", "both")
COMPARED = ("auto", "exact", "reader")  # what a model is measured against (reader-gap, reader-prior)
LEARNER_NAMES = {"exact": "exact learner", "reader": "document reader"}
PRIOR_NAMES = {"exact": "exact-learner prior", "reader": "reader prior"}
# where its KL is taken
MEASURED_ON = {"exact": "the labels of held-out prompts", "reader": "held-out prompts and documents"}


def ideal_learner(choice: str, demo_rate: float) -> str:
    """The ideal learner to measure a model against: `choice`, or for "auto" the exact learner when the
    model was trained with ICL prompts in its data (demo_rate > 0), as it is the Bayes-optimal model of
    those, else the document reader, the Bayes-optimal model of documents alone."""
    if choice not in COMPARED:
        raise UserError(f"unknown learner {choice!r}; choose one of {', '.join(COMPARED)}")
    if choice == "auto":
        return "exact" if demo_rate > 0 else "reader"
    return choice


def named_learners(rows: Iterable[Mapping], names: Mapping[str, str]) -> str:
    """The learners rows were measured against (their `learner`), by `names` (LEARNER_NAMES, PRIOR_NAMES)."""
    return " and ".join(names[learner] for learner in sorted({r["learner"] for r in rows}))


def load_model(path: str | Path) -> GPT2LMHeadModel:
    """The GPT-2 of a run's checkpoint or HF export."""
    path = Path(path)
    if path.is_dir():
        return read_pretrained(path)
    return CausalLMModule.load_from_checkpoint(path, map_location="cpu", init_from=None).gpt


@torch.no_grad()
def model_curve_rows(model: GPT2LMHeadModel, data: GincDataModule, run: str, device: torch.device,
                     **extra: object) -> list[dict]:
    """ICL curve rows of a model on the datamodule's ICL prompts (all of them: one process)."""
    model = model.to(device).eval()
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run):
        logp, hit = label_scores(model, batch["input_ids"].to(device), batch["label_pos"].to(device),
                                 batch["labels"].to(device))
        metric.update(batch["k"], batch["task"], logp, hit)
    return curve_rows(metric.compute(), data.icl.k_values, run, **extra)


def exact_curve_rows(data: GincDataModule, run: str = "exact", weights: object = None,
                     device: str | torch.device = "cpu", progress: bool = True, **extra: object) -> list[dict]:
    """The exact Bayesian learner's curve rows on the same prompts (prior = `weights`, default the world's)."""
    learner = ExactLearner(GincWorld.build(data.world).to(device), weights)
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run, progress):
        metric.update(batch["k"], batch["task"], *exact_label_scores(learner, batch, data.icl.demo_format, device))
    return curve_rows(metric.compute(), data.icl.k_values, run, **extra)


def icl_demonstrations(batch: dict, demo_format: str, device: str | torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An ICL batch as the exact learner reads it: inputs x [b, n, k-1], labels y [b, n], and the k-th
    tokens shown [b, n] in the "sampled" format (None in the "label" format, which shows y)."""
    labels = batch["labels"].to(device)
    x, shown = split_demonstrations(batch["input_ids"].to(device), batch["k"], labels.shape[1])
    return x, labels, shown if demo_format == "sampled" else None


def exact_label_scores(learner: ExactLearner, batch: dict, demo_format: str, device: str | torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `reader_label_scores`, for the exact learner: it has a prediction at every label."""
    pred = learner.predict_demos(*icl_demonstrations(batch, demo_format, device))
    return pred.prob.log(), pred.correct, torch.ones_like(pred.correct)


def reader_curve_rows(data: GincDataModule, run: str = "reader", weights: object = None,
                      device: str | torch.device = "cpu", progress: bool = True, **extra: object) -> list[dict]:
    """The document reader's curve rows on the same prompts: the Bayes-optimal documents-only model
    reading each prompt as one document. Points whose prefix no document can produce are left out of
    the means and counted in the `undefined` column; the share of them is printed."""
    reader = DocumentReader(GincWorld.build(data.world).to(device), weights)
    metric = _metric(data).to(device)
    for batch in _progress(data.icl_dataloader(), run, progress):
        metric.update(batch["k"], batch["task"], *reader_label_scores(reader, batch, device))
    sums = metric.compute()
    total = float(sums["count"].sum() + sums["undefined"].sum())
    if progress:
        print(f"{run}: {float(sums['undefined'].sum()) / max(total, 1):.1%} of scored positions have probability 0 as "
              "a document (the reader has no prediction there; counted in the `undefined` column)", file=sys.stderr)
    return curve_rows(sums, data.icl.k_values, run, undefined_column=True, **extra)


def reader_label_scores(reader: DocumentReader, batch: dict, device: str | torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reader's log-probability [b, n] of each label of an ICL batch, whether it is the reader's top-1
    token, and whether the reader has a prediction there at all (its prefix is possible as a document)."""
    labels, pos = batch["labels"].to(device), batch["label_pos"].to(device)
    out = reader.read(batch["input_ids"].to(device), next_tokens=True)
    scores = out.next_log_prob.gather(1, (pos - 1)[..., None].expand(-1, -1, out.next_log_prob.shape[-1]))
    return (scores.gather(-1, labels[..., None]).squeeze(-1), scores.argmax(-1) == labels,
            out.possible.gather(1, pos - 1))


_REFERENCES: dict[tuple[str, str, int, str], dict[str, list[dict]]] = {}


def ideal_references(data: GincDataModule, device: str | torch.device = "cpu") -> dict[str, list[dict]]:
    """Both ideal learners' curves on a data module's ICL prompts: what a trained model is drawn beside.

    The prompts are a function of the world, the ICL settings and the context length, so the curves are
    computed once per process for each of those: every cell of an ablation grid shares them (16 s of
    CPU for each run on configs/data/ginc.yaml otherwise)."""
    key = (repr(data.world), repr(data.icl), data.context_length, str(device))
    if key not in _REFERENCES:
        _REFERENCES[key] = {"exact Bayesian": exact_curve_rows(data, "exact", device=device, progress=False),
                            "document reader": reader_curve_rows(data, "reader", device=device, progress=False)}
    return _REFERENCES[key]


def _progress(loader: DataLoader, run: str, show: bool = True) -> Iterator[dict]:
    """The loader's batches, with progress on stderr when `show`: a line rewritten on a terminal, one
    line when done in a log."""
    progress = Progress(f"{run}: ICL prompts", len(loader)) if show else None
    for i, batch in enumerate(loader):
        yield batch
        if progress:
            progress.update(1, f"batch {i + 1}/{len(loader)}")
    if progress:
        progress.done(0, f"{len(loader)} batches done")
        progress.close()


def _metric(data: GincDataModule) -> ICLCurveMetric:
    shots = [data.icl.n_shots or shots_for_context(data.context_length, k) for k in data.icl.k_values]
    return ICLCurveMetric(data.icl.k_values, data.world.n_tasks, max(shots))


def checkpoint_curve_rows(paths: Sequence[str | Path], run: str | None = None, data_config: str | Path | None = None,
                          k_values: Sequence[int] | None = None, prompts: int | None = None, batch_size: int = 16,
                          device: str = "auto") -> list[dict]:
    """Curve rows of runs' checkpoints or HF exports, labelled and annotated like the runs' own curves.csv.

    The prompts are each run's own (its datamodule settings), with the world or ICL settings of
    `data_config` and the given k values, prompts per (k, task) and batch size put over them.
    `run` relabels the rows of a single source."""
    if run and len(paths) > 1:
        raise UserError("--run labels one source; with several --ckpt leave it out (each run's own label is used)")
    target = torch.device(resolve_device(device))
    given = read_data_settings(data_config) if data_config is not None else {}
    rows: list[dict] = []
    for path in paths:
        src = read_source(path)
        settings = {**src.data, **given, "icl": {**(src.data.get("icl") or {}), **(given.get("icl") or {})}}
        data = GincDataModule(**with_icl_overrides(settings, list(k_values or []) or None, prompts, batch_size))
        rows += model_curve_rows(load_model(path), data, run or src.label, target, **src.columns())
    return rows


def ideal_curve_rows(data_config: str | Path, learner: str = "exact", run: str | None = None,
                     weights: Sequence[float] | None = None, k_values: Sequence[int] | None = None,
                     prompts: int | None = None, batch_size: int = 16, device: str = "auto") -> list[dict]:
    """Curve rows of the ideal learners on a data config's ICL prompts: the exact learner (run `run`), the
    document reader (run `run`-reader) or both; their prior is `weights` (default: the world's mixture)."""
    if learner not in LEARNERS:
        raise UserError(f"unknown learner {learner!r}; choose one of {', '.join(LEARNERS)}")
    data = load_datamodule_config(data_config, k_values=list(k_values or []) or None, prompts_per_task=prompts,
                                  icl_batch_size=batch_size)
    target = resolve_device(device)
    rows = []
    if learner in ("exact", "both"):
        rows += exact_curve_rows(data, run or "ideal", weights, target)
    if learner in ("reader", "both"):
        rows += reader_curve_rows(data, f"{run or 'ideal'}-reader", weights, target)
    return rows
