"""`evaluate.py ladder`: a ground-truth ladder for the law fits and the shift report.

Ideal learners of one world whose prior over tasks is set to known conditions: the world's
own mixture (the baseline), then one task favoured or disfavoured at several strengths (its weight
multiplied or divided by each strength, the rest renormalised). Their curves go through `fit` and
`shift` like a model's, and the report says how well the analysis recovers what is known: the priors
and their moves (bias, interval coverage), whether it keeps P shared where P truly does not move, and
predicted against measured reemergence for the disfavoured conditions.

The learner is the exact Bayesian learner (it knows the prompt format) or the document reader (the
Bayes-optimal model of the documents alone, which is what a pretrained model imitates): the second
checks the analysis on the learner trained models are measured against.

Two counterfactual learners, built from the exact learner's own per-task terms on the same prompts,
take its departures from the law's assumptions away one at a time, to find what biases the fitted priors:

- `exact-demos`: the exact learner whose belief about the task reads the demonstrations only, not the
  query's own tokens (at k = 2 on a world whose first token reveals the start property it is the exact
  learner itself);
- `meanfield`: the learner the law describes. On each (k, task) it replaces the demonstrations'
  log-evidence for each task against the true one, and the label's probability under each task, by
  their means over the prompts, so every prompt moves every task's log-evidence by the same amount.
  Its curve is sum_m w_m e^{mean l_m(n)} mean q_m(n) / sum_m w_m e^{mean l_m(n)}.

The exact-demos learner's curve is the mean over prompts of that posterior predictive with each prompt's
own l and q; the two differ only in the prompt-to-prompt spread of the evidence, which makes the mean
curve depend on the prior less steeply than any learner with fixed evidence per shot does (docs/results.md: "The
law's bias on known priors").
"""
from __future__ import annotations

import math
import os
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.fitting import FitConfig, FitResult, fit_groups
from analysis.output import markdown_table
from analysis.report import summary_table, write_fit_outputs
from analysis.shift import ShiftConfig, ShiftResult, analyse_shift
from analysis.shift_report import write_shift_outputs
from contracts.curves_table import prob_rows, read_curves, write_curves
from datamodules.config_io import load_datamodule_config
from datamodules.exact import ExactLearner
from datamodules.ginc_datamodule import GincDataModule
from datamodules.sampling import split_demonstrations
from datamodules.world import GincWorld, check_weights
from evaluation.ginc_curves import exact_curve_rows, reader_curve_rows
from evaluation.reports import one_thread
from evaluation.settings import LadderConfig, LadderLearner
from models.gpt import resolve_device
from safe_io.files import atomic_dir, mark_output
from user_errors import UserError

MODEL = "truth"
MEASURED = {"exact": exact_curve_rows, "reader": reader_curve_rows}
COUNTERFACTUAL = ("exact-demos", "meanfield")
LEARNERS = typing.get_args(LadderLearner)
LEARNER_TITLES = {"exact": "Exact Bayesian learners", "reader": "Document readers",
                  "exact-demos": "Exact Bayesian learners whose task posterior reads the demonstrations only",
                  "meanfield": "Mean-field learners (the law's own model: the exact learner's per-task evidence and "
                               "predictions averaged over the prompts)"}


def ladder_weights(base: np.ndarray, task: int, strengths: list[float]) -> dict[str, np.ndarray]:
    """Condition name -> prior: the base mixture, then `task` favoured / disfavoured by each strength."""
    out = {"pretrain": base}
    for direction, power in (("favor", 1.0), ("disfavor", -1.0)):
        for s in strengths:
            w = base.copy()
            w[task] *= s**power
            out[f"{direction}-{s:g}"] = w / w.sum()
    return out


def run_ladder(config: LadderConfig, out: str | os.PathLike) -> tuple[list[FitResult], ShiftResult]:
    """Curves of the ladder's learners, all laws fitted to them, and the shift report with what it
    recovered of the truth: curves.csv, fits/, shift/ and report.md in `out`, written whole."""
    if config.learner not in LEARNERS:
        raise UserError(f"learner {config.learner!r} is not a ladder learner; choose one of {', '.join(LEARNERS)}")
    data = load_datamodule_config(config.data_config, k_values=list(config.k_values) if config.k_values else None,
                                  prompts_per_task=config.prompts)
    device = resolve_device(config.device)
    M = data.world.n_tasks
    if not 0 <= config.task < M:
        raise UserError(f"task {config.task} is out of range for a world of {M} tasks; give one from 0 to {M - 1}")
    if any(not (math.isfinite(s) and s > 1.0) for s in config.strengths):
        raise UserError(f"--strengths {list(config.strengths)} must all be finite and above 1 (1 is the baseline "
                         "itself; a factor of inf would give the task all or none of the prior)")
    shift_config = ShiftConfig(baseline=f"{MODEL}/pretrain", law=config.law, resamples=config.resamples,
                               starts=config.starts)
    conditions = ladder_weights(check_weights(data.world.weights, M), config.task, list(config.strengths))
    with atomic_dir(out, [config.data_config], "report") as tmp:
        write_curves(ladder_rows(data, conditions, config.learner, device), tmp / "curves.csv")
        groups = read_curves(tmp / "curves.csv")
        with one_thread():
            fit_config = FitConfig(starts=config.starts)
            results = fit_groups(groups, fit_config)
            (tmp / "fits").mkdir()
            write_fit_outputs(results, fit_config, Path("curves.csv"), tmp / "fits", plots=True)
            shift = analyse_shift(groups, shift_config)
            (tmp / "shift").mkdir()
            write_shift_outputs(shift, shift_config, Path("curves.csv"), tmp / "shift",
                                conditions["pretrain"].tolist())
        for report in ("fits", "shift"):  # each is a report of its own, which `fit` / `shift --out` may replace
            mark_output(tmp / report)
        (tmp / "report.md").write_text(ladder_report(conditions, shift, shift_config, config, results))
    return results, shift


def condition_columns(name: str) -> dict[str, str]:
    """The curves table's condition columns of a ladder condition (pretrain, favor-4, disfavor-16, ...)."""
    direction, _, strength = name.partition("-")
    return {"stage": "pretrain"} if name == "pretrain" else {
        "stage": "prior", "method": "prior", "direction": direction, "amount": strength}


def ladder_rows(data: GincDataModule, conditions: dict[str, np.ndarray], learner: str,
                device: str | torch.device = "cpu") -> list[dict]:
    """Curve rows of `learner` (one of LEARNERS) at each condition's prior, on the data module's ICL prompts."""
    if learner in MEASURED:
        return [row for name, weights in conditions.items()
                for row in MEASURED[learner](data, f"{MODEL}/{name}", weights.tolist(), device,
                                             **condition_columns(name))]
    terms = task_evidence(data, device)
    rows = []
    for name, weights in conditions.items():
        for k in data.icl.k_values:
            tasks = sorted(t for kk, t in terms if kk == k)
            prob = np.stack([counterfactual_curve(terms[k, t], weights, learner) for t in tasks])
            count = terms[k, tasks[0]].q.shape[0]
            rows += prob_rows(f"{MODEL}/{name}", k, np.arange(prob.shape[1]), prob, count, **condition_columns(name))
    return rows


@dataclass
class TaskEvidence:
    """The exact learner's per-task terms on the prompts of one (k, true task i), whatever its prior."""

    q: torch.Tensor  # [N, n, M]: p(y_n | x_n, D_<n, m), the label's probability under task m alone
    ell: torch.Tensor  # [N, n, M]: log p(D_<n | m) - log p(D_<n | i), the demonstrations' evidence for m against i


@torch.no_grad()
def task_evidence(data: GincDataModule, device: str | torch.device = "cpu") -> dict[tuple[int, int], TaskEvidence]:
    """TaskEvidence of every (k, task) of the data module's ICL prompts, from the exact learner's per-task
    terms (`ExactLearner.task_terms`, which do not depend on its prior)."""
    learner = ExactLearner(GincWorld.build(data.world).to(device))
    parts: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for batch in data.icl_dataloader():
        k, task, labels = batch["k"], batch["task"], batch["labels"].to(device)
        x, shown = split_demonstrations(batch["input_ids"].to(device), k, labels.shape[1])
        terms = learner.task_terms(x, labels, shown if data.icl.demo_format == "sampled" else None)
        index = labels[:, :, None, None].expand(*terms.next_prob.shape[:-1], 1)
        q = terms.next_prob.gather(-1, index).squeeze(-1)  # [N, n, M]
        seen = terms.seen[:, :-1]  # log p(D_<n | m)
        parts[k, task].append((q.cpu(), (seen - seen[..., task : task + 1]).cpu()))
    return {key: TaskEvidence(torch.cat([q for q, _ in p]), torch.cat([e for _, e in p])) for key, p in parts.items()}


def counterfactual_curve(terms: TaskEvidence, weights: np.ndarray, learner: str) -> np.ndarray:
    """Mean probability of the label at each shot [n] of a counterfactual learner with prior `weights`:
    "exact-demos" averages each prompt's posterior predictive over the prompts, "meanfield" is the
    posterior predictive of the prompts' mean evidence and mean per-task probabilities."""
    with np.errstate(divide="ignore"):
        log_w = torch.as_tensor(np.log(weights), dtype=torch.float64)
    if learner == "meanfield":
        post = torch.softmax(log_w + terms.ell.mean(0), -1)  # [n, M]
        return (post * terms.q.mean(0)).sum(-1).numpy()
    if learner == "exact-demos":
        return (torch.softmax(log_w + terms.ell, -1) * terms.q).sum(-1).mean(0).numpy()
    raise UserError(f"unknown counterfactual learner {learner!r}; choose one of {', '.join(COUNTERFACTUAL)}")


def ladder_report(conditions: dict[str, np.ndarray], shift: ShiftResult, config: ShiftConfig,
                  ladder: LadderConfig, fits: list[FitResult]) -> str:
    """What the analysis recovered of the known truth."""
    learner = LEARNER_TITLES[ladder.learner]
    gap = ("The law is the posterior predictive of a learner whose every demonstration moves each task's "
           "log-evidence by the same amount in every prompt; this learner is that one, so a bias here is the "
           "law's fitting error alone." if ladder.learner == "meanfield" else
           "The law is only an approximation of the learner: it moves each task's log-evidence by the same amount "
           "in every prompt, while the learner's evidence varies from prompt to prompt (which flattens the mean "
           "curve's dependence on the prior and shrinks the fitted priors towards the base), and where a start "
           "property or the query's own tokens carry evidence, the learner's first points differ from the law's "
           "too. A bias here measures that gap, not noise.")
    lines = ["# Ground-truth ladder", "",
             f"{learner} of `{ladder.data_config}` with their prior set to known conditions: the world's mixture, "
             f"then task {ladder.task} favoured or disfavoured by {', '.join(f'{s:g}' for s in ladder.strengths)} "
             f"(its weight multiplied or divided, the rest renormalised). Shift law: `{ladder.law}` (joint fit: P "
             f"shared, priors and K per condition). {gap}", "",
             "## Fits of all laws", "", summary_table(fits), ""]
    for k in sorted({r["k"] for r in shift.rows}):
        shared = [r for r in shift.rows if r["k"] == k and r["fit"] == "shared"]
        truth = np.array([conditions[r["run"].split("/", 1)[1]][r["task"]] for r in shared])
        est = np.array([r["prior"] for r in shared])
        lo, hi = np.array([r["prior_lo"] for r in shared]), np.array([r["prior_hi"] for r in shared])
        covered = (lo <= truth) & (truth <= hi)
        M = len(conditions["pretrain"])
        lines += [f"## k = {k}", "",
                  f"Priors (joint fit) against the truth: mean bias {np.mean(est - truth):+.3f}, mean absolute error "
                  f"{np.mean(np.abs(est - truth)):.3f}, largest {np.max(np.abs(est - truth)):.3f}; the "
                  f"{config.level:.0%} intervals cover the truth in {covered.sum()} of {len(covered)} cases.", "",
                  "Bias by task (fitted - true, averaged over conditions): "
                  + ", ".join(f"task {i}: {np.mean((est - truth)[i::M]):+.3f}" for i in range(M)), "",
                  markdown_table(["condition", f"true prior of task {ladder.task}", "fitted [lo, hi]", "covered"],
                                 [[r["run"].split("/", 1)[1], float(truth[j]),
                                   f"{r['prior']:.3f} [{r['prior_lo']:.3f}, {r['prior_hi']:.3f}]", bool(covered[j])]
                                  for j, r in enumerate(shared) if r["task"] == ladder.task]), ""]
        verdict = {c["fit"]: c for c in shift.comparison if c["k"] == k}
        lines += [f"Shared P vs free (P does not move here): BIC {verdict['shared']['bic']} vs "
                  f"{verdict['free']['bic']}, so the {'shared' if verdict['shared']['preferred'] else 'free'} fit is "
                  "preferred.", ""]
        recover = [r for r in shared if r["shots_to_recover"] != "" and r["task"] == ladder.task]
        if recover:
            lines += ["Reemergence of the disfavoured task (shots to return to its baseline zero-shot "
                      "probability):", "",
                      markdown_table(["condition", "predicted [lo, hi]", "measured"],
                                     [[r["run"].split("/", 1)[1],
                                       f"{r['shots_to_recover']:.3g} [{r['shots_to_recover_lo']:.3g}, "
                                       f"{r['shots_to_recover_hi']:.3g}]", f"{r['measured_shots_to_recover']:.3g}"]
                                      for r in recover]), ""]
    lines += ["Details: `fits/report.md` and `shift/report.md`.", ""]
    return "\n".join(lines)
