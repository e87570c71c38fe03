"""`evaluate.py fit` and `evaluate.py shift`: argument parsing and the glue to the analysis package."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from analysis.curves import read_curves
from analysis.fitting import SPLITS, FitConfig, fit_groups, plan_fits, skipped_fits
from analysis.laws import LAW_NAMES
from analysis.output import atomic_dir
from analysis.report import summary_table, write_fit_outputs


@contextmanager
def one_thread() -> Iterator[None]:
    """Fits run on one CPU thread, torch's and BLAS's: their tensors are small, and extra threads spin
    against other jobs. Fitting examples/curves_ideal.csv on 2 cores: idle, 16.4 s with two torch
    threads vs 5.7 s with one; with two busy processes beside it, 90.8 s vs 10.2 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def add_fit_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fit", help="fit the ICL laws to a curves table and report NRMSE",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--curves", type=Path, required=True, help="curves CSV (docs: the curves table)")
    p.add_argument("--step", type=int, help="evaluation step to read from a run's own table (default: each run's last)")
    p.add_argument("--out", type=Path, required=True, help="directory for fits.csv, params.json, report.md, plots/")
    p.add_argument("--laws", nargs="+", default=list(LAW_NAMES), help=f"laws to fit (default: all of {' '.join(LAW_NAMES)})")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="interpolation and/or extrapolation")
    p.add_argument("--fit-fraction", type=float, nargs="+", default=[0.1],
                   help="extrapolation fits shots <= f x max shots; several values run several extrapolations")
    p.add_argument("--loss", choices=("prob", "nll"), default="prob", help="squared error in probability or NLL space")
    p.add_argument("--starts", type=int, default=16, help="optimiser starts per fit, read off the curves; the best is kept")
    p.add_argument("--max-iter", type=int, default=300, help="Levenberg-Marquardt iteration limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> None:
    config = FitConfig(laws=tuple(args.laws), splits=tuple(args.splits), fractions=tuple(args.fit_fraction),
                       space=args.loss, starts=args.starts, seed=args.seed, max_iter=args.max_iter)
    config.validate()
    groups = read_curves(args.curves, args.step)
    skipped = skipped_fits(plan_fits(groups, config), config)
    with one_thread(), atomic_dir(args.out) as tmp:
        results = fit_groups(groups, config)
        write_fit_outputs(results, config, args.curves, tmp, plots=not args.no_plots, skipped=skipped)
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
                    "log (K) or log(1 + n) (shots) scale, each resampled table fitted like the table itself; "
                    "the larger of the resampled and the curvature standard deviation sets the width, so every "
                    "interval contains its estimate. 'inf' shots: no recovery within 10x the measured shots.")
    p.add_argument("--curves", type=Path, required=True, help="curves CSV with the baseline and post-trained runs")
    p.add_argument("--step", type=int, help="evaluation step to read from a run's own table (default: each run's last)")
    p.add_argument("--baseline", required=True, help="run label of the pretrained model (the reference condition)")
    p.add_argument("--out", type=Path, required=True, help="directory for shift.csv, comparison.csv, report.md, plots/")
    p.add_argument("--law", default="bayesian_sampling", help="Bayesian law to fit: bayesian, bayesian_sampling or bayesian_scoring")
    p.add_argument("--holdout-fraction", type=float, default=0.5, help="held-out comparison fits shots <= f x max")
    p.add_argument("--resamples", type=int, default=100, help="resampled tables for the intervals")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage")
    p.add_argument("--threshold", type=float, help="reemergence threshold (default: the baseline's zero-shot probability of each task)")
    p.add_argument("--prompt-table", type=Path, help="per-prompt CSV (run, k, task, prompt, shots, prob) to bootstrap prompts")
    p.add_argument("--true-priors", type=float, nargs="+", help="true pretraining mixture weights, to compare with the fitted priors")
    p.add_argument("--starts", type=int, default=16, help="optimiser starts per fit (the same for every resampled table)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starts and the resampling")
    p.set_defaults(func=run_shift)


def run_shift(args: argparse.Namespace) -> None:
    from analysis.shift import ShiftConfig, analyse_shift, read_prompt_table
    from analysis.shift_report import write_shift_outputs

    config = ShiftConfig(baseline=args.baseline, law=args.law, holdout_fraction=args.holdout_fraction,
                         resamples=args.resamples, level=args.level, threshold=args.threshold,
                         starts=args.starts, seed=args.seed)
    config.validate()
    groups = read_curves(args.curves, args.step)
    M = next((g.n_tasks for g in groups if g.run == args.baseline), None)
    if args.true_priors is not None and M is not None and len(args.true_priors) != M:
        raise ValueError(f"--true-priors has {len(args.true_priors)} weights but the curves have {M} tasks")
    prompts = read_prompt_table(args.prompt_table) if args.prompt_table else None
    with one_thread(), atomic_dir(args.out) as tmp:
        result = analyse_shift(groups, config, prompts)
        write_shift_outputs(result, config, args.curves, tmp, args.true_priors)
    for row in result.comparison:
        print(f"k={row['k']} {row['fit']}: BIC {row['bic']}, held-out NRMSE {row['heldout_nrmse']}"
              + ("  (preferred)" if row["preferred"] else ""))
    print(f"wrote {args.out}/shift.csv, comparison.csv, report.md, plots/")
