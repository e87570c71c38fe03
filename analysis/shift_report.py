"""Shift outputs: shift.csv, comparison.csv, report.md and plots of parameters against the condition."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.ticker
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.output import markdown_table, shots_grid
from analysis.shift import ShiftConfig, ShiftResult, condition_fields, condition_key, condition_label, log_prob
from safe_io.files import write_csv

COMPARISON_COLUMNS = ("k", "fit", "n_params", "chi2", "aic", "bic", "heldout_nrmse", "converged", "preferred", "law")
LAW_COLUMNS = ("k", "law", "n_params", "chi2", "bic", "delta_bic", "converged", "used")
LAW_PRIOR_COLUMNS = ("run", "k", "condition", "task", "law", "prior", "used")


def interval_text(row: dict, key: str, fmt: str = ".3f") -> str:
    """A shift.csv value with its interval, `value [lo, hi]`, marked when the data do not determine it."""
    note = " (not determined)" if key in str(row.get("undetermined", "")).split(";") else ""
    return f"{row[key]:{fmt}} [{row[f'{key}_lo']:{fmt}}, {row[f'{key}_hi']:{fmt}}]{note}"


def condition_rows(rows: list[dict], k: int, fit: str) -> list[dict]:
    """shift.csv's rows of one k and fit, by condition (in condition_key's order), then task."""
    chosen = [r for r in rows if r["k"] == k and r["fit"] == fit]
    return sorted(chosen, key=lambda r: (condition_key(r["run"], r), r["task"]))


def _series(rows: list[dict], key: str, M: int) -> np.ndarray:
    """[C, M] values of a shift.csv column, rows ordered by condition then task."""
    return np.array([float(r[key]) if r[key] != "" else math.nan for r in rows]).reshape(-1, M)


def _yerr(mid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Error bars from an interval around its estimate (an unbounded end is drawn to the axis' edge)."""
    return [mid - lo, np.where(np.isfinite(hi), hi - mid, 1e300)]


BASELINE_COLOUR = (0.2, 0.2, 0.2, 1.0)


def _family(method: str, direction: str) -> str | None:
    """The colour map of a method and direction (blues: SFT favour, reds: SFT disfavour, purples and
    oranges: DPO favour and disfavour; other methods take SFT's); None without a direction (the baseline)."""
    if direction not in ("favor", "disfavor"):
        return None
    return {("favor", False): "Blues", ("disfavor", False): "Reds",
            ("favor", True): "Purples", ("disfavor", True): "Oranges"}[direction, method == "dpo"]


def family_colour(method: str, direction: str, shade: float = 0.75) -> tuple:
    """One colour of a method and direction's family (shade 0: light, 1: dark); grey for the baseline."""
    name = _family(method, direction)
    return colormaps[name](shade) if name else BASELINE_COLOUR


def _colours(labels: list[str]) -> list:
    """A colour per condition label: its method and direction's family, darker for larger amounts."""
    fields = {label: condition_fields(label) for label in labels}
    out = []
    for label in labels:
        method, direction, _ = fields[label]
        same = sorted({other for other in labels if fields[other][:2] == (method, direction)}, key=condition_key)
        out.append(family_colour(method, direction, 0.45 + 0.5 * (same.index(label) + 1) / (len(same) + 1)))
    return out


def _condition_axis(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)


def plot_parameters(result: ShiftResult, k: int, M: int, path: Path) -> None:
    """Priors, K and task knowledge (gamma/beta or P's diagonal) per condition, with intervals."""
    shared, free = condition_rows(result.rows, k, "shared"), condition_rows(result.rows, k, "free")
    labels = [r["condition"] for r in shared[::M]]
    x = np.arange(len(labels))
    knowledge = [key for key in ("gamma", "beta", "P_diag") if key in shared[0]]
    fig = Figure(figsize=(4.2 * (2 + len(knowledge)), 3.8))
    axes = fig.subplots(1, 2 + len(knowledge))
    offsets = 0.6 * (np.arange(M) - (M - 1) / 2) / max(M, 1)  # tasks side by side within a condition
    for i in range(M):
        mid, lo, hi = (_series(shared, key, M)[:, i] for key in ("prior", "prior_lo", "prior_hi"))
        axes[0].errorbar(x + offsets[i], mid, yerr=_yerr(mid, lo, hi), fmt="o", ms=3, capsize=2, label=f"task {i}")
    axes[0].set_title("prior (joint fit)")
    axes[0].set_ylim(0, 1)
    for rows, style, dx in ((shared, "o", -0.1), (free, "s", 0.1)):
        mid, lo, hi = (_series(rows, key, M)[:, 0] for key in ("K", "K_lo", "K_hi"))
        axes[1].errorbar(x + dx, mid, yerr=_yerr(mid, lo, hi), fmt=style, ms=3, capsize=2,
                         label=f"{rows[0]['fit']} fit")
    axes[1].set_yscale("log")
    Ks = _series(shared + free, "K", M)[:, 0]
    axes[1].set_ylim(Ks.min() / 1e3, Ks.max() * 1e3)  # bars the data do not bound run off the edge
    axes[1].set_title("K (log scale)")
    for ax, key in zip(axes[2:], knowledge):
        for i in range(M):
            mid, lo, hi = (_series(free, f, M)[:, i] for f in (key, f"{key}_lo", f"{key}_hi"))
            bars = ax.errorbar(x + offsets[i], mid, yerr=_yerr(mid, lo, hi), fmt="s", ms=3, capsize=2)
            ax.axhline(float(shared[i][key]), color=bars[0].get_color(), lw=0.8)
        ax.set_title(f"{key} (free fit; lines: joint)")
        ax.set_ylim(0, 1)
    for ax in axes:
        _condition_axis(ax, labels)
    axes[0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.1), ncol=min(M, 5), frameon=False)
    axes[1].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.1), ncol=2, frameon=False)
    fig.suptitle(f"k = {k}: conditions ordered by method, direction and amount", y=1.08)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_curves(result: ShiftResult, k: int, config: ShiftConfig, path: Path) -> None:
    """Measured curves of every condition with the joint fit, one panel per task."""
    cond = next(c for c in result.conditions if c.k == k)
    C, M, S = cond.prob.shape
    grid = torch.as_tensor(shots_grid(float(cond.shots.max())))
    fit = result.fits[k]["shared"]
    curves = log_prob(fit.law, fit.theta[0], grid, M, C, True).exp().numpy()
    fig = Figure(figsize=(3.4 * M, 3.4))
    axes = fig.subplots(1, M, squeeze=False)
    colors = _colours([condition_label(g) for g in cond.groups])
    for i, ax in enumerate(axes[0]):
        for c in range(C):
            ax.plot(grid, curves[c, i], color=colors[c], lw=1, zorder=1)
            ax.plot(cond.shots, cond.prob[c, i], ".", ms=2.5, color=colors[c], zorder=2)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"task {i}", fontsize=9)
        ax.set_xlabel("shots")
    axes[0, 0].set_ylabel("p(label)")
    handles = [Line2D([], [], color=colors[c], marker=".", label=g.run) for c, g in enumerate(cond.groups)]
    fig.legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"k = {k}: measured (dots) and joint fit of {fit.law} (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_reemergence(result: ShiftResult, path: Path) -> bool:
    """Predicted (joint fit) vs measured shots for suppressed tasks to return to the threshold."""
    pts = [r for r in result.rows if r["fit"] == "shared" and r["shots_to_recover"] != ""
           and np.isfinite(float(r["measured_shots_to_recover"])) and np.isfinite(float(r["shots_to_recover"]))]
    if not pts:
        return False
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    m = np.array([float(r["measured_shots_to_recover"]) for r in pts])
    p = np.array([float(r["shots_to_recover"]) for r in pts])
    lo = np.array([float(r["shots_to_recover_lo"]) for r in pts])
    hi = np.array([float(r["shots_to_recover_hi"]) for r in pts])
    colors = _colours([r["condition"] for r in pts])
    for j, r in enumerate(pts):
        ax.errorbar(m[j] + 1, p[j] + 1, yerr=[[p[j] - lo[j]], [min(hi[j], 1e9) - p[j]]], fmt="o", color=colors[j],
                    capsize=2, label=f"{r['condition']}, task {r['task']}")
    top = max(m.max(), p.max()) * 2 + 2
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("measured shots to recover + 1")
    ax.set_ylabel("predicted shots to recover + 1 (joint fit)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return True


def favoured_task(result: ShiftResult, k: int) -> int:
    """The task whose joint-fit prior (of the law used) moves most across the conditions at k: the one
    post-training favours or disfavours."""
    M = result.conditions[0].prob.shape[1]
    priors = _series(condition_rows(result.rows, k, "shared"), "prior", M)
    return int(np.argmax(priors.max(0) - priors.min(0)))


def law_rows(result: ShiftResult) -> list[dict]:
    """laws.csv: each law's joint fit at each k, its BIC against the best, and which law was used."""
    rows = []
    for k, choice in result.laws.items():
        best = min(score.bic for score in choice.scores)
        rows += [{"k": k, "law": s.law, "n_params": s.n_params, "chi2": round(s.chi2, 3), "bic": round(s.bic, 3),
                  "delta_bic": round(s.bic - best, 3), "converged": s.converged, "used": s.law == choice.law}
                 for s in choice.scores]
    return rows


def law_prior_rows(result: ShiftResult) -> list[dict]:
    """law_priors.csv: every condition's joint-fit prior of each task under each law fitted."""
    rows = []
    for cond in result.conditions:
        choice = result.laws[cond.k]
        for c, g in enumerate(cond.groups):
            rows += [{"run": g.run, "k": cond.k, "condition": condition_label(g), "task": i, "law": s.law,
                      "prior": f"{s.priors[c, i]:.6g}", "used": s.law == choice.law}
                     for s in choice.scores for i in range(cond.prob.shape[1])]
    return rows


def law_section(result: ShiftResult, k: int) -> list[str]:
    """Which law was used at k and why, every law's score, and whether the choice matters for the
    favoured task's prior: each law's estimate beside the used law's interval."""
    choice = result.laws[k]
    if not choice.chosen:
        return [f"## k = {k}: law", "", f"Law `{choice.law}`, as given (--law); the others were not fitted.", ""]
    best = min(s.bic for s in choice.scores)
    task = favoured_task(result, k)
    cond = next(c for c in result.conditions if c.k == k)
    index = {g.run: c for c, g in enumerate(cond.groups)}  # a LawScore's priors are in cond.groups' order
    used = [r for r in condition_rows(result.rows, k, "shared") if r["task"] == task]
    others = [s for s in choice.scores if s.law != choice.law]
    other = lambda s, r: s.priors[index[r["run"]], task]  # noqa: E731
    outside = [[not r["prior_lo"] <= other(s, r) <= r["prior_hi"] for s in others] for r in used]
    gap = max((abs(other(s, r) - r["prior"]) for s in others for r in used), default=0.0)
    n_outside = sum(any(o) for o in outside)
    verdict = (f"The choice matters for task {task}'s prior: another law's estimate lies outside the 95% interval of "
               f"`{choice.law}` in {n_outside} of {len(used)} conditions" if n_outside else
               f"The choice does not matter for task {task}'s prior beyond its intervals: every law's estimate lies "
               f"inside the 95% interval of `{choice.law}` in all {len(used)} conditions")
    return [
        f"## k = {k}: law", "",
        f"Each Bayesian law's joint fit to all shots; the law of the lowest BIC is used (`{choice.law}`). "
        "BIC differences above 10 are very strong evidence (Kass and Raftery).", "",
        markdown_table(["law", "parameters", "chi2", "BIC", "BIC - best", "converged", "used"],
                       [[s.law, s.n_params, round(s.chi2, 3), round(s.bic, 3), round(s.bic - best, 3), s.converged,
                         "yes" if s.law == choice.law else ""] for s in choice.scores]), "",
        f"Task {task} (its prior moves most across the conditions): its joint-fit prior under each law. "
        f"{verdict} (largest difference {gap:.3f}).", "",
        markdown_table(["condition", f"{choice.law} [95%] (used)", *[s.law for s in others]],
                       [[r["condition"], interval_text(r, "prior"), *[f"{other(s, r):.3f}" for s in others]]
                        for r in used]), "",
    ]


def write_shift_outputs(result: ShiftResult, config: ShiftConfig, curves_path: Path, out: Path,
                        true_priors: list[float] | None) -> None:
    columns = list(dict.fromkeys(key for r in result.rows for key in r))
    fmt = lambda v: f"{v:.6g}" if isinstance(v, (float, np.floating)) else v  # noqa: E731
    write_csv(out / "shift.csv", columns, [{k: fmt(v) for k, v in r.items()} for r in result.rows])
    write_csv(out / "comparison.csv", COMPARISON_COLUMNS, result.comparison)
    write_csv(out / "laws.csv", LAW_COLUMNS, law_rows(result))
    write_csv(out / "law_priors.csv", LAW_PRIOR_COLUMNS, law_prior_rows(result))
    (out / "plots").mkdir()
    lines = [
        "# Post-training shift", "",
        f"Curves: `{curves_path.name}`; baseline `{config.baseline}`; law "
        + (f"`{config.law}` (given). " if config.law else
           "chosen at each k by BIC among the three Bayesian laws' joint fits (laws.csv; below): "
           + ", ".join(f"k = {k}: `{law}`" for k, law in result.chosen_laws().items()) + ". ")
        + f"Every fit stops once its chi-square would fall by less than {config.tol:g}: within "
        f"{math.sqrt(config.tol):.2g} standard errors of its optimum. Joint fit: P "
        "(or gamma, beta) shared by all conditions, priors and K per condition; free fit: everything per "
        "condition. Both weight each point by its sampling error sqrt(p(1-p)/count), so chi2 is -2 log "
        f"likelihood up to a constant. Held-out NRMSE: fit shots <= {config.holdout_fraction:g} x max, score "
        f"the rest. Intervals: {config.level:.0%} normal bootstrap intervals on the logit (priors, gamma, beta), "
        f"log (K) or log(1 + n) (shots) scale from {config.resamples} resampled tables, each fitted by the same "
        "multi-start procedure; the width is the larger of the resampled and the curvature (J^T J) standard "
        "deviation, so every interval contains its estimate. Parameters in the `undetermined` column of shift.csv "
        "have a standard error above their value: the data do not pin them down.", "",
        *[line for cond in result.conditions for line in law_section(result, cond.k)],
        "## Joint vs free", "",
        markdown_table(COMPARISON_COLUMNS, [[c[k] for k in COMPARISON_COLUMNS] for c in result.comparison]), "",
    ]
    for cond in result.conditions:
        k, M = cond.k, cond.prob.shape[1]
        shared = condition_rows(result.rows, k, "shared")
        lines += [f"## k = {k}: priors and K (joint fit)", "", markdown_table(
            ["condition", "K [lo, hi]", *[f"prior {i} [lo, hi]" for i in range(M)]],
            [[r0["condition"], interval_text(r0, "K", ".3g"),
              *[interval_text(r, "prior") for r in shared[c * M:(c + 1) * M]]]
             for c, r0 in enumerate(shared[::M])]), ""]
        if true_priors is not None:
            base = [float(r["prior"]) for r in shared[:M]]
            lines += ["Baseline priors vs the true pretraining mixture:", "", markdown_table(
                ["task", "true weight", "fitted prior"], [[i, true_priors[i], base[i]] for i in range(M)]), ""]
        recover = [r for r in shared if r["shots_to_recover"] != ""]
        if recover:
            lines += [f"### Reemergence at k = {k}", "",
                      "Shots for a task whose zero-shot probability fell below the threshold to return to it "
                      "(inf: not within 10x the measured shots, or, measured, not within the measured shots).", "",
                      markdown_table(["condition", "task", "threshold", "predicted [lo, hi]", "measured"],
                                     [[r["condition"], r["task"], float(r["threshold"]),
                                       interval_text(r, "shots_to_recover", ".3g"), r["measured_shots_to_recover"]]
                                      for r in recover]), ""]
        plot_parameters(result, k, M, out / f"plots/parameters_k{k}.png")
        plot_curves(result, k, config, out / f"plots/curves_k{k}.png")
        lines += [f"![parameters](plots/parameters_k{k}.png)", "", f"![curves](plots/curves_k{k}.png)", ""]
    if plot_reemergence(result, out / "plots/reemergence.png"):
        lines += ["![reemergence](plots/reemergence.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
