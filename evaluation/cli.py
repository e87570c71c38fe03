"""`evaluate.py` sub-commands: curves, fit, shift, ladder, reader-prior and reader-gap. Argument parsing,
and the glue that turns flags into calls of the library functions (evaluation.ginc_curves, llm_curves,
reports, ladder, reader_prior, reader_gap)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.fitting import SPACES, FitConfig
from analysis.laws import LAW_NAMES
from safe_io.files import check_output_file, check_replaceable, write_rows
from analysis.report import summary_table
from analysis.shift import ShiftConfig
from evaluation.arguments import COUNT, INDEX, OneLineParser
from contracts.curves_table import CURVE_COLUMNS, write_curves
from user_errors import UserError

if TYPE_CHECKING:
    from evaluation.llm_curves import LLMCurveConfig


def add_curves_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("curves", help="measure ICL curves and write the curves table",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", type=Path, help="Lightning checkpoints or HF export dirs of our GPT-2 runs")
    src.add_argument("--ideal", action="store_true", help="the exact Bayesian learner of the GINC world")
    src.add_argument("--hf-model", type=Path, help="a local Hugging Face causal-LM directory (with --dataset)")
    p.add_argument("--out", type=Path, required=True, help="curves CSV to write")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it (refused for a run "
                   "already in the table, unless --replace)")
    p.add_argument("--replace", action="store_true", help="with --append: replace the rows of runs already in the table")
    p.add_argument("--run", help="run label (default: derived from the source)")
    # GINC sources (--ckpt, --ideal)
    p.add_argument("--data-config", type=Path, help="YAML with the GINC world and ICL settings (default: the checkpoint's own)")
    p.add_argument("--k", type=COUNT, nargs="+", help="GINC: example lengths (default: the data config's); --hf-model: answer tokens scored")
    p.add_argument("--prompts", type=COUNT, help="GINC: prompts per (k, task) (default: the data config's); --hf-model: shuffles per answer type (default 5)")
    p.add_argument("--weights", type=float, nargs="+", help="--ideal: mixture weights of the learner's prior (default: the world's)")
    p.add_argument("--learner", choices=("exact", "reader", "both"), default="exact",
                   help="--ideal: the exact learner (knows the prompt format; run RUN), the document reader (the "
                        "Bayes-optimal documents-only model; run RUN-reader), or both")
    p.add_argument("--batch-size", type=COUNT, default=16, help="prompts per forward pass (for long LLM prompts, 1-4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    # real LLM source (--hf-model)
    p.add_argument("--dataset", type=Path, help="--hf-model: JSONL rows {question, answer, answer_type}")
    p.add_argument("--shots", type=COUNT, help="--hf-model: demonstrations per prompt (default: all rows of the type that fit)")
    p.add_argument("--max-length", type=COUNT, help="--hf-model: prompt tokens (default: the model's context length)")
    p.add_argument("--format", choices=("auto", "chat", "plain"), default="auto",
                   help="--hf-model: chat template or plain User:/Assistant: turns (auto: chat when the tokenizer has a template)")
    p.add_argument("--seed", type=INDEX, default=0, help="--hf-model: seed of the shuffles")
    p.set_defaults(func=run_curves)


def run_curves(args: argparse.Namespace) -> None:
    # each source's modules are imported only when used: `evaluate.py fit` need not load transformers
    ginc = {"k_values": args.k, "prompts": args.prompts, "batch_size": args.batch_size, "device": args.device}
    if args.ideal and args.data_config is None:
        raise UserError("--ideal needs --data-config (a YAML with the GINC world and ICL settings, e.g. configs/data/ginc.yaml)")
    if args.hf_model is not None:
        from evaluation.llm_curves import check_not_ginc_export

        check_not_ginc_export(args.hf_model)
    inputs = [p for p in (args.data_config, args.dataset, args.hf_model, *(args.ckpt or [])) if p is not None]
    check_output_file(args.out, inputs, CURVE_COLUMNS, "curves table")  # before minutes of measuring
    if args.ideal:
        from evaluation.ginc_curves import ideal_curve_rows

        rows = ideal_curve_rows(args.data_config, args.learner, args.run, args.weights, **ginc)
    elif args.ckpt:
        from evaluation.ginc_curves import checkpoint_curve_rows

        rows = checkpoint_curve_rows(args.ckpt, args.run, args.data_config, **ginc)
    else:
        from evaluation.llm_curves import hf_curve_rows

        rows = hf_curve_rows(args.hf_model, args.dataset, llm_config(args), args.device)
    path = write_curves(rows, args.out, append=args.append, replace=args.replace)
    print(f"wrote {len(rows)} rows to {path}")


def llm_config(args: argparse.Namespace) -> LLMCurveConfig:
    """The `--hf-model` flags as a config."""
    from evaluation.llm_curves import LLMCurveConfig

    if args.dataset is None:
        raise UserError("--hf-model needs --dataset FILE.jsonl (rows {question, answer, answer_type})")
    return LLMCurveConfig(  # it checks its values itself
        run=args.run or Path(args.hf_model).name, ks=tuple(sorted(set(args.k or (1,)))),
        shuffles=5 if args.prompts is None else args.prompts, shots=args.shots,
        max_length=args.max_length, prompt_format=args.format, seed=args.seed, batch_size=args.batch_size,
    )


def add_fit_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit the ICL laws to a curves table and report NRMSE",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--curves", type=Path, required=True, help="curves CSV (docs: the curves table)")
    p.add_argument("--step", type=INDEX, help="evaluation step to read from a run's own table (default: each run's last)")
    p.add_argument("--out", type=Path, required=True, help="directory for fits.csv, params.json, report.md, plots/")
    p.add_argument("--laws", nargs="+", default=list(FitConfig.laws), help=f"laws to fit (default: all of {' '.join(LAW_NAMES)})")
    p.add_argument("--splits", nargs="+", default=list(FitConfig.splits), help="interpolation and/or extrapolation")
    p.add_argument("--fit-fraction", type=float, nargs="+", default=list(FitConfig.fractions),
                   help="extrapolation fits shots <= f x max shots; several values run several extrapolations")
    p.add_argument("--loss", choices=SPACES, default=FitConfig.space, help="squared error in probability or NLL space")
    p.add_argument("--starts", type=COUNT, default=FitConfig.starts, help="optimiser starts per fit, read off the curves; the best is kept")
    p.add_argument("--max-iter", type=COUNT, default=FitConfig.max_iter, help="Levenberg-Marquardt iteration limit")
    p.add_argument("--tol", type=float, default=FitConfig.tol,
                   help="precision: a fit stops once its chi-square would fall by less than this (within sqrt(tol) "
                        "standard errors of its optimum); smaller is tighter, 0 runs to rounding")
    p.add_argument("--seed", type=INDEX, default=FitConfig.seed, help="seed of the random starts")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> None:
    check_replaceable(args.out, [args.curves], "report")  # before the table is read and fitted
    from evaluation.reports import fit_table

    config = FitConfig(laws=tuple(args.laws), splits=tuple(args.splits), fractions=tuple(args.fit_fraction),
                       space=args.loss, starts=args.starts, seed=args.seed, max_iter=args.max_iter, tol=args.tol)
    results, skipped = fit_table(args.curves, args.out, config, args.step, plots=not args.no_plots)
    for line in skipped:
        print(f"skipped {line}")
    print(summary_table(results))
    print(f"wrote {args.out}/fits.csv, params.json, report.md" + ("" if args.no_plots else ", plots/"))


def add_shift_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shift", help="how post-training moved priors, K and task knowledge, with intervals",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Runs of one model at one k are its conditions. A run's model is its `model` or `layers` "
                    "column, else its label before '/' (gpt2-4l/sft-favor-50 -> gpt2-4l); runs without a '/' "
                    "all belong to one model. Intervals: normal bootstrap intervals on the logit (probabilities), "
                    "log (K) or log(1 + n) (shots) scale, each resampled table fitted from the table's own fit and "
                    "--resample-starts more starts; "
                    "the larger of the resampled and the curvature standard deviation sets the width, so every "
                    "interval contains its estimate. 'inf' shots: no recovery within 10x the measured shots.")
    p.add_argument("--curves", type=Path, required=True, help="curves CSV with the baseline and post-trained runs")
    p.add_argument("--step", type=INDEX, help="evaluation step to read from a run's own table (default: each run's last)")
    p.add_argument("--baseline", required=True, help="run label of the pretrained model (the reference condition)")
    p.add_argument("--k", type=COUNT, nargs="+", help="example lengths to analyse (default: every k of the table)")
    p.add_argument("--out", type=Path, required=True, help="directory for shift.csv, comparison.csv, report.md, plots/")
    p.add_argument("--law", default=ShiftConfig.law, help="Bayesian law to fit: bayesian, bayesian_sampling or bayesian_scoring "
                   "(default: at each k, the one whose joint fit has the lowest BIC; laws.csv has every law's score)")
    p.add_argument("--tol", type=float, default=ShiftConfig.tol,
                   help="precision: every fit stops once its chi-square would fall by less than this (within "
                        "sqrt(tol) standard errors of its optimum); smaller is tighter, 0 runs to rounding")
    p.add_argument("--holdout-fraction", type=float, default=ShiftConfig.holdout_fraction, help="held-out comparison fits shots <= f x max")
    p.add_argument("--resamples", type=COUNT, default=ShiftConfig.resamples, help="resampled tables for the intervals")
    p.add_argument("--level", type=float, default=ShiftConfig.level, help="interval coverage")
    p.add_argument("--threshold", type=float, help="reemergence threshold (default: the baseline's zero-shot probability of each task)")
    p.add_argument("--prompt-table", type=Path, help="per-prompt CSV (run, k, task, prompt, shots, prob) to bootstrap prompts")
    p.add_argument("--true-priors", type=float, nargs="+", help="true pretraining mixture weights, to compare with the fitted priors")
    p.add_argument("--starts", type=COUNT, default=ShiftConfig.starts, help="optimiser starts of the joint and free fits of the table")
    p.add_argument("--resample-starts", type=INDEX, default=ShiftConfig.resample_starts,
                   help="starts per resampled table, beside the table's own fit")
    p.add_argument("--workers", type=INDEX, default=ShiftConfig.workers,
                   help="processes fitting the k values at once (0: one per k and CPU when the table is large)")
    p.add_argument("--seed", type=INDEX, default=ShiftConfig.seed, help="seed of the starts and the resampling")
    p.set_defaults(func=run_shift)


def run_shift(args: argparse.Namespace) -> None:
    check_replaceable(args.out, [args.curves, *([args.prompt_table] if args.prompt_table else [])], "report")
    from evaluation.reports import shift_table

    config = ShiftConfig(baseline=args.baseline, law=args.law, holdout_fraction=args.holdout_fraction,
                         resamples=args.resamples, level=args.level, threshold=args.threshold,
                         starts=args.starts, resample_starts=args.resample_starts, workers=args.workers,
                         seed=args.seed, tol=args.tol)
    result = shift_table(args.curves, args.out, config, args.step, args.prompt_table, args.true_priors, args.k)
    for row in result.comparison:
        print(f"k={row['k']} {row['fit']}: BIC {row['bic']}, held-out NRMSE {row['heldout_nrmse']}"
              + ("  (preferred)" if row["preferred"] else ""))
    print(f"wrote {args.out}/shift.csv, comparison.csv, report.md, plots/")


def add_ladder_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ladder", help="curves of ideal learners with known priors, then fit and shift on them",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-config", type=Path, required=True, help="YAML with the GINC world and ICL settings")
    p.add_argument("--out", type=Path, required=True, help="directory for curves.csv, fits/, shift/ and report.md")
    p.add_argument("--task", type=INDEX, default=0, help="the task favoured and disfavoured")
    p.add_argument("--strengths", type=float, nargs="+", default=[2.0, 4.0, 16.0],
                   help="factors the task's weight is multiplied (favour) or divided (disfavour) by")
    p.add_argument("--k", type=COUNT, nargs="+", help="example lengths (default: the data config's)")
    p.add_argument("--prompts", type=COUNT, help="prompts per (k, task) (default: the data config's)")
    p.add_argument("--law", default="bayesian_scoring", help="Bayesian law of the shift report")
    p.add_argument("--resamples", type=COUNT, default=100, help="resampled tables for the shift intervals")
    p.add_argument("--starts", type=COUNT, default=16, help="optimiser starts per fit")
    p.add_argument("--learner", choices=("exact", "reader", "exact-demos", "meanfield"), default="exact",
                   help="the exact Bayesian learner (knows the prompt format), the document reader (knows documents "
                        "only), or a counterfactual of the exact learner on the same prompts: exact-demos (its task "
                        "posterior reads the demonstrations only, not the query) or meanfield (the law's own model: "
                        "its per-task evidence and predictions averaged over the prompts)")
    p.add_argument("--device", default="auto", help="where the learners run: cpu, cuda, or auto")
    p.set_defaults(func=run_ladder)


def run_ladder(args: argparse.Namespace) -> None:
    check_replaceable(args.out, [args.data_config], "report")
    from evaluation.ladder import LadderConfig, run_ladder as ladder

    config = LadderConfig(args.data_config, args.task, tuple(args.strengths), tuple(args.k) if args.k else None,
                          args.prompts, args.law, args.resamples, args.starts, args.device, args.learner)
    results, _ = ladder(config, args.out)
    print(summary_table(results))
    print(f"wrote {args.out}/curves.csv, fits/, shift/, report.md")


def _per_model_parser(subparsers: argparse._SubParsersAction, name: str, help: str, description: str, columns: str,
                      prompts: int) -> argparse.ArgumentParser:
    """A command that measures each given run against an ideal learner of its world and writes one CSV."""
    p = subparsers.add_parser(name, help=help, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", nargs="+", type=Path, required=True, help="Lightning checkpoints or HF export dirs of our GPT-2 runs")
    p.add_argument("--out", type=Path, required=True, help=f"CSV to write ({columns})")
    p.add_argument("--prompts", type=COUNT, default=prompts, help="ICL prompts per (k, task), from each run's own ICL settings")
    p.add_argument("--learner", choices=("auto", "exact", "reader"), default="auto",
                   help="the ideal learner to compare with: the exact learner (knows the prompt format), the document "
                        "reader (knows documents only), or auto: the exact learner for a run trained with ICL prompts "
                        "in its data (data.demo_rate > 0), else the reader")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    return p


def add_reader_prior_command(subparsers: argparse._SubParsersAction) -> None:
    p = _per_model_parser(subparsers, "reader-prior", "the ideal learner's prior that best predicts each model (law-free)",
                          "For each run, the prior over tasks with which an ideal learner of its world best predicts "
                          "the model: the mean KL(model || learner), minimised over the prior, over every position of "
                          "held-out ICL prompts and documents (document reader; needs a world with property_smoothing "
                          "> 0, else the KL is infinite) or over the label positions of held-out ICL prompts (exact "
                          "learner).", "run, learner, prior_0.., kl, kl_world, positions, ...", 32)
    p.add_argument("--documents", type=COUNT, default=64, help="held-out documents of the world's mixture (document reader only)")
    p.set_defaults(func=run_reader_prior)


def run_reader_prior(args: argparse.Namespace) -> None:
    from evaluation.reader_prior import TABLE_COLUMNS, reader_prior_rows

    _write_per_model(args, TABLE_COLUMNS, "reader-prior table", lambda: reader_prior_rows(args.ckpt, args.prompts, args.documents, args.device, args.learner))


def add_reader_gap_command(subparsers: argparse._SubParsersAction) -> None:
    p = _per_model_parser(subparsers, "reader-gap", "how closely each model's ICL curve follows an ideal learner's",
                          "For each run and k: the mean over tasks and shots of |model - learner| target probability on "
                          "the same prompts, its bootstrap standard error over prompts, and the value that prompt noise "
                          "alone gives.", "run, learner, k, gap, gap_se, noise, signed, prompts, ...", 256)
    p.add_argument("--k", type=COUNT, nargs="+", help="example lengths (default: each run's own)")
    p.set_defaults(func=run_reader_gap)


def run_reader_gap(args: argparse.Namespace) -> None:
    from evaluation.reader_gap import TABLE_COLUMNS, reader_gap_rows

    _write_per_model(args, TABLE_COLUMNS, "reader-gap table", lambda: reader_gap_rows(args.ckpt, args.prompts, args.k, args.device, args.learner))


def _write_per_model(args: argparse.Namespace, columns: tuple[str, ...], what: str,
                     measure: Callable[[], list[dict]]) -> None:
    check_output_file(args.out, args.ckpt, columns, what)  # before any model loads
    rows = measure()
    print(f"wrote {len(rows)} rows to {write_rows(rows, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="evaluate.py", description="Evaluate models and curves: ICL curves, law fits, post-training shift.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_curves_command(sub)
    add_fit_command(sub)
    add_shift_command(sub)
    add_ladder_command(sub)
    add_reader_prior_command(sub)
    add_reader_gap_command(sub)
    return parser
