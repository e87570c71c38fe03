"""`evaluate.py`'s sub-commands, one typed function each: curves, fit, shift, ladder, reader-prior, reader-gap.

Their options are their parameters and the fields of their config dataclasses (evaluation/arguments.py),
with the defaults written there; each checks what it was given, calls the library function and says what
it wrote. A source's modules are imported only when it is used: `evaluate.py fit` need not load transformers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from analysis.fitting import FitConfig
from analysis.report import summary_table
from analysis.shift import ShiftConfig
from contracts.curves_table import CURVE_COLUMNS, write_curves
from evaluation.settings import LadderConfig, ReaderGapConfig, ReaderPriorConfig
from safe_io.files import check_output_file, check_replaceable, write_rows
from user_errors import UserError


def given(**values: Any) -> dict[str, Any]:
    """The values that were given: the library's own defaults stand for the rest."""
    return {name: value for name, value in values.items() if value is not None}


def curves(out: Path, ckpt: list[Path] | None = None, ideal: bool = False, hf_model: Path | None = None,
           append: bool = False, replace: bool = False, run: str | None = None, data_config: Path | None = None,
           k: list[int] | None = None, prompts: int | None = None, weights: list[float] | None = None,
           learner: Literal["exact", "reader", "both"] | None = None, batch_size: int | None = None,
           device: str | None = None, dataset: Path | None = None, shots: int | None = None,
           max_length: int | None = None, format: Literal["auto", "chat", "plain"] | None = None,
           seed: int | None = None) -> None:
    """Measure ICL curves and write the curves table.

    Args:
        out: curves CSV to write
        ckpt: Lightning checkpoints or HF export dirs of our GPT-2 runs (a source)
        ideal: the exact Bayesian learner of the GINC world (a source)
        hf_model: a local Hugging Face causal-LM directory, with --dataset (a source)
        append: append to --out instead of replacing it (refused for a run already in the table, unless --replace)
        replace: with --append: replace the rows of runs already in the table
        run: run label (default: derived from the source)
        data_config: --ckpt, --ideal: YAML with the GINC world and ICL settings (default: the checkpoint's own)
        k: GINC: example lengths (default: the data config's); --hf-model: answer tokens scored (default: 1)
        prompts: GINC: prompts per (k, task) (default: the data config's); --hf-model: shuffles per answer type
        weights: --ideal: mixture weights of the learner's prior (default: the world's)
        learner: --ideal: the exact learner (knows the prompt format; run RUN), the document reader (the
            Bayes-optimal documents-only model; run RUN-reader), or both (default: exact)
        batch_size: prompts per forward pass (default: the source's; for long LLM prompts, 1-4)
        device: cpu, cuda, or auto (default: auto)
        dataset: --hf-model: JSONL rows {question, answer, answer_type}
        shots: --hf-model: demonstrations per prompt (default: all rows of the type that fit)
        max_length: --hf-model: prompt tokens (default: the model's context length)
        format: --hf-model: chat template or plain User:/Assistant: turns (default: auto, chat when the
            tokenizer has a template)
        seed: --hf-model: seed of the shuffles
    """
    sources = [name for name, value in (("--ckpt", ckpt), ("--ideal", ideal), ("--hf-model", hf_model)) if value]
    if len(sources) != 1:
        raise UserError("curves measures one source: give one of --ckpt, --ideal or --hf-model"
                        + (f", not {' and '.join(sources)}" if sources else ""))
    if ideal and data_config is None:
        raise UserError("--ideal needs --data-config (a YAML with the GINC world and ICL settings, "
                        "e.g. configs/data/ginc.yaml)")
    if hf_model is not None:
        from evaluation.llm_curves import check_not_ginc_export

        check_not_ginc_export(hf_model)
        if dataset is None:
            raise UserError("--hf-model needs --dataset FILE.jsonl (rows {question, answer, answer_type})")
    inputs = [p for p in (data_config, dataset, hf_model, *(ckpt or [])) if p is not None]
    check_output_file(out, inputs, CURVE_COLUMNS, "curves table")  # before minutes of measuring
    ginc = given(k_values=k, prompts=prompts, batch_size=batch_size, device=device)
    if ideal:
        from evaluation.ginc_curves import ideal_curve_rows

        rows = ideal_curve_rows(data_config, **given(learner=learner, run=run, weights=weights), **ginc)
    elif ckpt:
        from evaluation.ginc_curves import checkpoint_curve_rows

        rows = checkpoint_curve_rows(ckpt, run, data_config, **ginc)
    else:
        from evaluation.llm_curves import LLMCurveConfig, hf_curve_rows

        config = LLMCurveConfig(run=run or hf_model.name, **given(  # it checks its values itself
            ks=tuple(sorted(set(k))) if k else None, shuffles=prompts, shots=shots, max_length=max_length,
            prompt_format=format, seed=seed, batch_size=batch_size))
        rows = hf_curve_rows(hf_model, dataset, config, **given(device=device))
    path = write_curves(rows, out, append=append, replace=replace)
    print(f"wrote {len(rows)} rows to {path}")


def fit(curves: Path, out: Path, config: FitConfig, step: int | None = None, no_plots: bool = False) -> None:
    """Fit the ICL laws to a curves table and report NRMSE.

    Args:
        curves: curves CSV (docs: the curves table)
        out: directory for fits.csv, params.json, report.md, plots/
        step: evaluation step to read from a run's own table (default: each run's last)
        no_plots: skip the PNG plots
    """
    check_replaceable(out, [curves], "report")  # before the table is read and fitted
    from evaluation.reports import fit_table

    results, skipped = fit_table(curves, out, config, step, plots=not no_plots)
    for line in skipped:
        print(f"skipped {line}")
    print(summary_table(results))
    print(f"wrote {out}/fits.csv, params.json, report.md" + ("" if no_plots else ", plots/"))


def shift(curves: Path, out: Path, config: ShiftConfig, step: int | None = None, k: list[int] | None = None,
          prompt_table: Path | None = None, true_priors: list[float] | None = None) -> None:
    """How post-training moved priors, K and task knowledge, with intervals.

    Runs of one model at one k are its conditions. A run's model is its `model` or `layers` column, else
    its label before '/' (gpt2-4l/sft-favor-50 -> gpt2-4l); runs without a '/' all belong to one model.
    Intervals: normal bootstrap intervals on the logit (probabilities), log (K) or log(1 + n) (shots)
    scale, each resampled table fitted from the table's own fit and --resample-starts more starts; the
    larger of the resampled and the curvature standard deviation sets the width, so every interval
    contains its estimate. 'inf' shots: no recovery within 10x the measured shots.

    Args:
        curves: curves CSV with the baseline and post-trained runs
        out: directory for shift.csv, comparison.csv, report.md, plots/
        step: evaluation step to read from a run's own table (default: each run's last)
        k: example lengths to analyse (default: every k of the table)
        prompt_table: per-prompt CSV (run, k, task, prompt, shots, prob) to bootstrap prompts
        true_priors: true pretraining mixture weights, to compare with the fitted priors
    """
    check_replaceable(out, [curves, *([prompt_table] if prompt_table else [])], "report")
    from evaluation.reports import shift_table

    result = shift_table(curves, out, config, step, prompt_table, true_priors, k)
    for row in result.comparison:
        print(f"k={row['k']} {row['fit']}: BIC {row['bic']}, held-out NRMSE {row['heldout_nrmse']}"
              + ("  (preferred)" if row["preferred"] else ""))
    print(f"wrote {out}/shift.csv, comparison.csv, report.md, plots/")


def ladder(config: LadderConfig, out: Path) -> None:
    """Curves of ideal learners with known priors, then fit and shift on them.

    Args:
        out: directory for curves.csv, fits/, shift/ and report.md
    """
    check_replaceable(out, [config.data_config], "report")
    from evaluation.ladder import run_ladder

    results, _ = run_ladder(config, out)
    print(summary_table(results))
    print(f"wrote {out}/curves.csv, fits/, shift/, report.md")


def reader_prior(ckpt: list[Path], out: Path, config: ReaderPriorConfig) -> None:
    """The ideal learner's prior that best predicts each model (law-free).

    For each run, the prior over tasks with which an ideal learner of its world best predicts the model:
    the mean KL(model || learner), minimised over the prior, over every position of held-out ICL prompts
    and documents (document reader; needs a world with property_smoothing > 0, else the KL is infinite) or
    over the label positions of held-out ICL prompts (exact learner).

    Args:
        ckpt: Lightning checkpoints or HF export dirs of our GPT-2 runs
        out: CSV to write (run, learner, prior_0.., kl, kl_world, positions, ...)
    """
    from evaluation.reader_prior import TABLE_COLUMNS, reader_prior_rows

    check_output_file(out, ckpt, TABLE_COLUMNS, "reader-prior table")  # before any model loads
    rows = reader_prior_rows(ckpt, config.prompts, config.documents, config.device, config.learner)
    print(f"wrote {len(rows)} rows to {write_rows(rows, out)}")


def reader_gap(ckpt: list[Path], out: Path, config: ReaderGapConfig) -> None:
    """How closely each model's ICL curve follows an ideal learner's.

    For each run and k: the mean over tasks and shots of |model - learner| target probability on the same
    prompts, its bootstrap standard error over prompts, and the value that prompt noise alone gives.

    Args:
        ckpt: Lightning checkpoints or HF export dirs of our GPT-2 runs
        out: CSV to write (run, learner, k, gap, gap_se, noise, signed, prompts, ...)
    """
    from evaluation.reader_gap import TABLE_COLUMNS, reader_gap_rows

    check_output_file(out, ckpt, TABLE_COLUMNS, "reader-gap table")  # before any model loads
    rows = reader_gap_rows(ckpt, config.prompts, config.k_values, config.device, config.learner)
    print(f"wrote {len(rows)} rows to {write_rows(rows, out)}")


COMMANDS = (curves, fit, shift, ladder, reader_prior, reader_gap)
