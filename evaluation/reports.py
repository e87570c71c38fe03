"""The fit and shift reports of a curves table: read it, fit, and write a report directory whole.

These are what `evaluate.py fit` / `shift` and the ablation runner call; each raises ValueError or
FileNotFoundError with a one-line message on bad input, before anything is written.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from analysis.fitting import FitConfig, FitResult, fit_groups, plan_fits, skipped_fits
from analysis.report import write_fit_outputs
from analysis.shift import ShiftConfig, ShiftResult, analyse_shift
from analysis.shift_report import write_shift_outputs
from contracts.curves_table import read_curves, read_prompt_table
from datamodules.world import check_weights
from safe_io.files import atomic_dir
from user_errors import UserError


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


def fit_table(curves: str | os.PathLike, out: str | os.PathLike, config: FitConfig, step: int | None = None,
              plots: bool = True) -> tuple[list[FitResult], list[str]]:
    """Fit `config.laws` to every (run, k) of a curves table and write fits.csv, params.json, report.md
    (and plots/) into `out`. Returns the fits and the fits skipped (too few points), one line each."""
    groups = read_curves(curves, step)
    jobs = plan_fits(groups, config)
    skipped = skipped_fits(jobs, config)
    if len(skipped) == len(jobs) * len(config.laws):  # nothing to fit: keep the old report, say why
        raise UserError(f"no fit can be made: {skipped[0]}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
                        + "; measure more shots or choose a law with fewer parameters")
    with one_thread(), atomic_dir(out, [curves], "report") as tmp:
        results = fit_groups(groups, config)
        write_fit_outputs(results, config, Path(curves), tmp, plots=plots, skipped=skipped)
    return results, skipped


def shift_table(curves: str | os.PathLike, out: str | os.PathLike, config: ShiftConfig, step: int | None = None,
                prompt_table: str | os.PathLike | None = None, true_priors: Sequence[float] | None = None,
                k_values: Sequence[int] | None = None) -> ShiftResult:
    """How post-training moved each model's law parameters, from the conditions in a curves table; writes
    shift.csv, comparison.csv, report.md and plots/ into `out`. `prompt_table` (per-prompt probabilities)
    resamples prompts for the intervals; `true_priors` (the pretraining mixture) is set beside the fit;
    `k_values` keeps only those k (default: every k of the table)."""
    groups = read_curves(curves, step)
    if k_values:
        missing = sorted(set(k_values) - {g.k for g in groups})
        if missing:
            raise UserError(f"k_values {missing} are not in {curves}; it has k = {sorted({g.k for g in groups})}")
        groups = [g for g in groups if g.k in k_values]
    M = next((g.n_tasks for g in groups if g.run == config.baseline), None)
    if true_priors is not None and M is not None:
        if len(true_priors) != M:
            raise UserError(f"true_priors has {len(true_priors)} weights but the curves have {M} tasks")
        check_weights(true_priors, M, "true_priors")
        if abs(sum(true_priors) - 1.0) > 1e-6:
            raise UserError(f"true_priors {list(true_priors)} sum to {sum(true_priors):g}, not 1; give the pretraining "
                             "mixture's weights, which are probabilities")
    prompts = read_prompt_table(prompt_table) if prompt_table else None
    with one_thread(), atomic_dir(out, [curves, *([prompt_table] if prompt_table else [])], "report") as tmp:
        result = analyse_shift(groups, config, prompts)
        write_shift_outputs(result, config, Path(curves), tmp, None if true_priors is None else list(true_priors))
    return result
