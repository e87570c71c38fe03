"""Fit outputs (docs/design.md): fits.csv, params.json, report.md and one plot per (run, k)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis.fitting import RIDGE, FitConfig, FitResult, flat_params, predict, undetermined
from analysis.laws import BAYESIAN_NAMES
from analysis.lm import FTOL, WINDOW, XTOL
from analysis.output import file_names, markdown_table, shots_grid
from safe_io.files import write_csv

FIT_COLUMNS = ("run", "k", "law", "split", "nrmse", "nrmse_nll", "n_params", "loss", "converged", "fit_fraction")


def split_label(result: FitResult) -> str:
    return result.split if result.fraction is None else f"{result.split} (f={result.fraction:g})"


def summary_table(results: list[FitResult]) -> str:
    """Mean NRMSE (probability, NLL) of each law on each split, over all (run, k) groups."""
    cells: dict[tuple[str, str], list[FitResult]] = defaultdict(list)
    for r in results:
        cells[(r.law, split_label(r))].append(r)
    laws = list(dict.fromkeys(r.law for r in results))
    splits = list(dict.fromkeys(split_label(r) for r in results))
    rows = []
    for law in laws:
        row: list[object] = [law]
        for s in splits:
            rs = cells.get((law, s), [])
            row += ([float(np.mean([r.nrmse for r in rs])), float(np.mean([r.nrmse_nll for r in rs]))] if rs
                    else ["skipped", "skipped"])
        rows.append(row)
    header = ["law"] + [f"{s} {m}" for s in splits for m in ("NRMSE", "NRMSE(NLL)")]
    return markdown_table(header, rows)


def by_group_table(results: list[FitResult]) -> str:
    """NRMSE (probability) of every law/split for each (run, k)."""
    cols = list(dict.fromkeys((r.law, split_label(r)) for r in results))
    groups: dict[tuple[str, int], dict] = defaultdict(dict)
    for r in results:
        groups[(r.group.run, r.group.k)][(r.law, split_label(r))] = r.nrmse
    rows = [[run, k, *[vals.get(c, "skipped") for c in cols]] for (run, k), vals in groups.items()]
    return markdown_table(["run", "k", *[f"{law} {s}" for law, s in cols]], rows)


def plot_group(results: list[FitResult], path: Path) -> None:
    """Measured curves of one (run, k) with every law's fit; bottom row: extrapolation, cut marked."""
    g = results[0].group
    splits = list(dict.fromkeys(r.split for r in results))
    M = g.n_tasks
    fig = Figure(figsize=(3.2 * M, 2.8 * len(splits)))  # no pyplot: nothing global to set at import
    axes = fig.subplots(len(splits), M, squeeze=False, sharex=True)
    grid = torch.as_tensor(shots_grid(float(g.shots.max())))
    colors = dict(zip(dict.fromkeys(r.law for r in results), colormaps["tab10"].colors))
    for row, split in enumerate(splits):
        shown = [r for r in results if r.split == split]
        first_fraction = shown[0].fraction
        for r in (r for r in shown if r.fraction == first_fraction):
            curves = predict(r.law, r.theta[None], grid, M)[0, 0].exp().numpy()
            for i in range(M):
                axes[row, i].plot(grid, curves[i], color=colors[r.law], lw=1.2, label=r.law)
        for i in range(M):
            ax = axes[row, i]
            ax.plot(g.shots, g.prob[i], ".", color="0.3", ms=2.5, zorder=3, label="measured" if i == 0 else None)
            if split == "extrapolation":
                ax.axvline(first_fraction * g.shots[g.mask.any(0)].max(), color="k", ls="--", lw=0.8)
            ax.set_title(f"task {i}, {split}", fontsize=9)
            ax.set_xscale("symlog", linthresh=1.0)
        axes[row, 0].set_ylabel("p(label)")
    for ax in axes[-1]:
        ax.set_xlabel("shots")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(g.label)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def undetermined_names(result: FitResult) -> list[str]:
    """Parameters whose standard error exceeds their value: the data do not pin them down."""
    stderr = flat_params(result.stderr)
    return [name for name, value in flat_params(result.params).items() if undetermined(value, stderr[name])]


def write_fit_outputs(results: list[FitResult], config: FitConfig, curves_path: Path, out: Path, plots: bool,
                      skipped: list[str] = ()) -> None:
    """Write fits.csv, params.json, report.md and plots/ into `out` (a fresh directory)."""
    write_csv(out / "fits.csv", FIT_COLUMNS, [
        {"run": r.group.run, "k": r.group.k, "law": r.law, "split": r.split, "nrmse": f"{r.nrmse:.6g}",
         "nrmse_nll": f"{r.nrmse_nll:.6g}", "n_params": r.n_params, "loss": f"{r.loss:.6g}",
         "converged": r.converged, "fit_fraction": "" if r.fraction is None else r.fraction}
        for r in results
    ])
    params = [{"run": r.group.run, "k": r.group.k, "law": r.law, "split": r.split, "fit_fraction": r.fraction,
               "converged": r.converged, "params": r.params, "stderr": r.stderr} for r in results]
    (out / "params.json").write_text(json.dumps(params, indent=1))
    by_group: dict[tuple[str, int], list[FitResult]] = defaultdict(list)
    for r in results:
        by_group[(r.group.run, r.group.k)].append(r)
    plot_names = []
    if plots:
        (out / "plots").mkdir()
        files = file_names([run for run, _ in by_group])
        for (run, k), rs in by_group.items():
            name = f"plots/{files[run]}_k{k}.png"
            plot_group(rs, out / name)
            plot_names.append(name)
    failed = [r for r in results if not r.converged]
    loose = [(r, undetermined_names(r)) for r in results if r.law in BAYESIAN_NAMES]
    loose = [(r, names) for r, names in loose if names]
    lines = [
        "# Law fits", "",
        f"Curves: `{curves_path.name}`, {len(by_group)} (run, k) groups. Loss: squared error in "
        f"{'probability' if config.space == 'prob' else 'NLL'} space, float64, {config.starts} starts per fit. "
        "NRMSE = RMSE / mean of the measured values on the evaluated shots; extrapolation fits shots <= f x max "
        "shots and evaluates the rest.", "",
        "## Mean NRMSE over groups", "", summary_table(results), "",
        "## Convergence", "",
        f"A fit converged when, from its parameters, the Gauss-Newton step would lower chi-square by less than "
        f"{config.tol:g} (--tol): the optimum of the least-squares loss (plus a prior {RIDGE:g} times as informative "
        f"as one point on each unconstrained parameter) is then within {math.sqrt(config.tol):.2g} standard errors "
        "in any direction. The fits are unweighted; chi-square is their squared residuals over the smaller of the "
        "points' mean sampling variance (p(1-p)/count, from the table's counts) and the residual variance at the "
        f"fit. Also converged: a stationary point to rounding (step below {XTOL:g} x (1 + max |theta|), or a "
        f"predicted gain below {FTOL:g} of the objective). A fit not converged ran to {config.max_iter} iterations, "
        f"or crept: two windows of {WINDOW} accepted steps in a row each gained less than {config.tol:g} (a curved "
        "valley, or an optimum at the edge of the parameter space approached ever more slowly), or every step "
        "failed.", "",
        f"{len(results) - len(failed)} of {len(results)} fits converged."
        + "".join(f"\n- not converged: {r.group.label}, {r.law}, {split_label(r)}" for r in failed), "",
        *(["## Skipped fits", "", *[f"- {line}" for line in skipped], ""] if skipped else []),
        "## Parameters the data do not determine", "",
        "Standard errors (params.json, `stderr`) come from J^T J at the optimum, scaled by the residual "
        "variance. Listed here: Bayesian-law parameters whose standard error exceeds their value; read them "
        "as unknown, not as measured.", "",
        *([f"- {r.group.label}, {r.law}, {split_label(r)}: {', '.join(names)}" for r, names in loose]
          or ["Every Bayesian-law parameter has a standard error below its value."]), "",
        "## NRMSE by run and k", "", by_group_table(results), "",
    ]
    if plot_names:
        lines += ["## Plots", "", *[f"![{n}]({n})" for n in plot_names], ""]
    (out / "report.md").write_text("\n".join(lines))
