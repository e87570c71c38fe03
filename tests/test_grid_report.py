"""The grid report's readings of shift tables: condition order, reemergence counts, the amount-range
verdict, the favoured prior's trajectory, on hand-made tables and small synthetic curves."""
import math
import random

import numpy as np
import pytest
from matplotlib.figure import Figure

from analysis.conditions import Conditions, condition_fields, condition_key, select_conditions
from analysis.curves import CurveGroup
from analysis.shift import ShiftConfig, ShiftResult, analyse_shift
from analysis.shift_report import condition_rows, plot_parameters
from analysis.synthetic import add_noise, law_prob
from evaluation.grid_findings import graded_count, prior_only_verdict, range_comparisons, reemergence
from evaluation.grid_report import prior_section, reemergence_section

ORDERED = ["gpt2-2l/pretrain", "gpt2-2l/sft-favor-8", "gpt2-2l/sft-favor-128", "gpt2-2l/sft-disfavor-16",
           "gpt2-2l/dpo-favor-32", "gpt2-2l/dpo-disfavor-4", "gpt2-2l/dpo-disfavor-32"]


def shuffled(items: list, seed: int = 0) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    assert out != items
    return out


def test_conditions_order_by_method_direction_then_amount_as_a_number():
    assert sorted(shuffled(ORDERED), key=condition_key) == ORDERED
    assert sorted(["base", "10", "100", "3", "30"], key=condition_key) == ["base", "3", "10", "30", "100"]
    assert condition_fields("gpt2-2l/posttrain-dpo-disfavor-32") == ("dpo", "disfavor", 32.0)
    # the curves table's columns, where filled, win over the label
    columns = {"stage": "posttrain", "method": "sft", "direction": "favor", "amount": "9"}
    assert condition_fields("m/x-100", columns) == ("sft", "favor", 9.0)
    assert condition_key("m/b", columns) < condition_key("m/a", {**columns, "amount": "10"})


def shift_rows(runs: list[str], M: int = 2, k: int = 3) -> list[dict]:
    """Shared and free shift.csv rows of the runs (method, direction and amount in their columns only
    for the post-trained ones): the favoured task's prior climbs with the condition's place in ORDERED."""
    rows = []
    for run in runs:
        method, direction, amount = condition_fields(run)
        level = 0.1 + 0.1 * (ORDERED.index(run) if run in ORDERED else 0)
        for fit in ("shared", "free"):
            for task in range(M):
                prior = level if task == 0 else (1 - level) / (M - 1)
                rows.append({"run": run, "k": k, "task": task, "fit": fit, "condition": run.split("/")[-1],
                             "method": method, "direction": direction,
                             "amount": "" if math.isnan(amount) else f"{amount:g}",
                             "prior": prior, "prior_lo": prior * 0.9, "prior_hi": prior * 1.05, "prior_se": 0.01,
                             "K": 0.5, "K_lo": 0.4, "K_hi": 0.6, "K_se": 0.05, "gamma": 0.8, "gamma_lo": 0.7,
                             "gamma_hi": 0.9, "gamma_se": 0.05, "undetermined": "", "shots_to_recover": ""})
    return rows


def test_tables_and_plots_from_unordered_input_come_out_ordered(monkeypatch, tmp_path):
    rows = shift_rows(shuffled(ORDERED))
    assert [r["run"] for r in condition_rows(rows, 3, "shared")[::2]] == ORDERED
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig))
    plot_parameters(ShiftResult(rows, [], [], {}), 3, 2, tmp_path / "p.png")
    assert [t.get_text() for t in drawn[0].axes[0].get_xticklabels()] == [run.split("/")[-1] for run in ORDERED]
    # the grid report's per-cell table: baseline, then SFT favour, SFT disfavour, DPO favour, DPO disfavour
    comparison = [{"k": 3, "fit": f, "bic": 10.0, "heldout_nrmse": 0.1, "preferred": f == "shared"}
                  for f in ("shared", "free")]
    lines = "\n".join(prior_section(ShiftResult(rows, comparison, [], {}), 0, {})).splitlines()
    cells = [line.split(" | ")[:2] for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert cells == [["| baseline", "0"], ["| sft-favor", "8"], ["| sft-favor", "128"], ["| sft-disfavor", "16"],
                     ["| dpo-favor", "32"], ["| dpo-disfavor", "4"], ["| dpo-disfavor", "32"]]
    groups = [CurveGroup(run, 3, np.arange(3.0), np.full((2, 3), 0.5), np.full((2, 3), 0.7), np.full((2, 3), 10.0))
              for run in shuffled(ORDERED)]
    assert [g.run for g in select_conditions(groups, "gpt2-2l/pretrain")[0].groups] == ORDERED


def recovery(run: str, task: int, predicted: float, lo: float, hi: float, measured: float, fit: str = "shared") -> dict:
    method, direction, amount = condition_fields(run)
    return {"run": run, "k": 3, "task": task, "fit": fit, "method": method, "direction": direction,
            "amount": f"{amount:g}",
            "shots_to_recover": predicted, "shots_to_recover_lo": lo, "shots_to_recover_hi": hi,
            "measured_shots_to_recover": measured, "undetermined": ""}


HAND_MADE = [
    recovery("m/sft-disfavor-8", 0, 15.0, 8.0, 30.0, 10.0),  # within 2, inside its interval
    recovery("m/sft-disfavor-16", 0, 25.0, 20.0, 40.0, 10.0),  # 2.5x: neither
    recovery("m/sft-disfavor-32", 0, 2.0, 1.5, 3.0, 4.0),  # exactly half: within 2, outside its interval
    recovery("m/dpo-disfavor-8", 0, 3.0, 1.0, 5.0, 0.5),  # recovered before one shot: not compared
    recovery("m/dpo-disfavor-16", 0, math.inf, 90.0, math.inf, math.inf),  # predicted never
    recovery("m/dpo-disfavor-32", 0, 120.0, 70.0, 200.0, math.inf),  # predicted beyond the last shot (60)
    recovery("m/sft-favor-8", 1, math.inf, 30.0, math.inf, 20.0),  # compared (a miss) and beyond
    recovery("m/sft-favor-16", 1, 40.0, 30.0, 50.0, math.inf),  # predicted within the shots, never measured
    recovery("m/sft-favor-16", 1, 10.0, 8.0, 12.0, 10.0, fit="free"),  # the free fit's: not counted
    {**recovery("m/sft-favor-32", 0, 0, 0, 0, 0), "shots_to_recover": ""},  # not suppressed
]


def test_reemergence_counts_factor_two_and_coverage_on_a_hand_made_table(tmp_path):
    found = reemergence(shuffled(HAND_MADE), {3: 60.0})
    assert [(r["run"], r["task"]) for r in found.compared] == [("m/sft-favor-8", 1), ("m/sft-disfavor-8", 0),
                                                               ("m/sft-disfavor-16", 0), ("m/sft-disfavor-32", 0)]
    assert (found.within, found.covered) == (2, 1)
    assert [r["run"] for r in found.beyond] == ["m/sft-favor-8", "m/dpo-disfavor-16", "m/dpo-disfavor-32"]
    shots = np.arange(61.0)
    cond = Conditions(3, [], shots, np.zeros((1, 1, 61)), np.ones((1, 1, 61)))
    text = "\n".join(reemergence_section({"m": ShiftResult(HAND_MADE, [], [cond], {})}, tmp_path))
    assert ("Of 8 suppressed (cell, k, task), 4 were measured to re-emerge after at least one shot, "
            "1 before one shot" in text)
    assert "within a factor of 2 of the measured shots: 2 of 4 (50%)" in text and "interval: 1 of 4 (25%)" in text
    assert ("3 of 8; 1 of them were measured to re-emerge" in text
            and "(1 of them predicted to re-emerge within them)" in text)
    assert (tmp_path / "reemergence.png").stat().st_size > 1000


def test_graded_amounts_lie_between_the_baseline_and_saturation_with_their_intervals():
    # favour from 0.3: graded, saturated at the top (shown as 1.000), overlapping the baseline, graded
    assert graded_count("favor", 0.3, [0.5, 0.999, 0.35, 0.9], [0.4, 0.99, 0.25, 0.85], [0.6, 0.99999, 0.45, 0.95]) == 2
    # disfavour from 0.4: graded, reaching 0, above the baseline
    assert graded_count("disfavor", 0.4, [0.2, 0.001, 0.5], [0.1, 0.0, 0.45], [0.3, 0.01, 0.55]) == 1


def test_learner_column_names_the_prior_and_each_row_counts_its_graded_amounts():
    runs = ["gpt2-2l/pretrain", "gpt2-2l/sft-favor-8", "gpt2-2l/sft-favor-128"]
    comparison = [{"k": 3, "fit": f, "bic": 10.0, "heldout_nrmse": 0.1, "preferred": f == "shared"}
                  for f in ("shared", "free")]
    shift = ShiftResult(shift_rows(runs), comparison, [], {})
    reader = {run: {"prior_0": 0.3, "prior_1": 0.7, "kl": kl} for run, kl in zip(runs, (0.1, 0.15, 0.35))}
    text = "\n".join(prior_section(shift, 0, reader))
    assert "| reader prior | KL left (nats) | KL / base |" in text and "| sft-favor | 128 |" in text
    assert "- sft favor: law prior monotone" in text and "graded at 2 of 2 amounts" in text
    assert "KL left exceeds 2x the base model's 0.1000 from amount 128" in text
    exact = {run: {**row, "learner": "exact"} for run, row in reader.items()}
    text = "\n".join(prior_section(shift, 0, exact))
    assert ("| exact-learner prior |" in text and "; exact-learner prior monotone" in text
            and "to the exact learner" in text)


def test_prior_only_verdict_names_the_first_failing_amount_or_says_it_holds():
    def verdict(range_: str, amounts: list, preferred: str) -> dict:
        return {"range": range_, "amounts": amounts, "shared": 100.0, "free": 90.0 if preferred == "free" else 110.0,
                "preferred": preferred}

    ranges = {"all amounts": verdict("all amounts", [8, 16, 64, 128], "free"),
              "small half": verdict("small half", [8, 16], "shared"),
              "large half": verdict("large half", [64, 128], "free")}
    cells = [(8.0, "m/sft-favor-8", 0.11), (128.0, "m/sft-favor-128", 0.15)]
    assert prior_only_verdict(ranges, cells, 0.1).startswith("- prior-only account fails from amount 64: "
                                                              "the free fit wins on large half (64, 128): "
                                                              "BIC 100.0 shared vs 90.0 free")
    assert "fails from amount 8" in prior_only_verdict(ranges, [(8.0, "m/sft-favor-8", 0.25)], 0.1)
    holding = {name: {**r, "preferred": "shared"} for name, r in ranges.items()}
    assert prior_only_verdict(holding, cells, 0.1).startswith("- prior-only account holds throughout")


M = 4
SHOTS = np.arange(0.0, 41.0)
GAMMA = [0.9, 0.85, 0.8, 0.88]
BETA = [0.3, 0.2, 0.35, 0.25]


def moving_late(amounts=(0, 25, 50, 500, 1000)) -> list[CurveGroup]:
    """Favouring task 0: its prior grows with the amount; its knowledge (gamma) drops from 500 on only."""
    rng = np.random.default_rng(0)
    groups = []
    for a in amounts:
        w = np.array([0.3, 0.25, 0.25, 0.2]) * np.array([1 + a / 500, 1, 1, 1])
        gamma = np.array(GAMMA) * (1 - 0.3 * (a >= 500) * np.eye(M)[0])
        params = {"priors": (w / w.sum()).tolist(), "K": 0.8, "gamma": gamma.tolist(), "beta": BETA}
        prob = add_noise(law_prob("bayesian_sampling", params, SHOTS, M)[0], 1000, rng)
        extra = ({"stage": "pretrain"} if a == 0
                 else {"stage": "sft", "method": "sft", "direction": "favor", "amount": str(a)})
        run = "m/pretrain" if a == 0 else f"m/sft-favor-{a}"
        groups.append(CurveGroup(run, 3, SHOTS, prob, -np.log(prob), np.full_like(prob, 1000), extra))
    return groups


@pytest.mark.slow
def test_amount_ranges_find_where_the_shared_prior_stops_fitting():
    """P moves only from amount 500: the small half keeps a shared P, the large half needs free fits."""
    groups = shuffled(moving_late())
    config = ShiftConfig(baseline="m/pretrain", resamples=2, starts=3)
    shift = analyse_shift(groups, config)
    rows = {r["range"]: r for r in range_comparisons(groups, config, shift)}
    assert [(name, r["amounts"]) for name, r in rows.items()] == [
        ("all amounts", [25.0, 50.0, 500.0, 1000.0]), ("small half", [25.0, 50.0]), ("large half", [500.0, 1000.0])]
    assert (rows["small half"]["preferred"], rows["large half"]["preferred"], rows["all amounts"]["preferred"]) == \
        ("shared", "free", "free")
    assert rows["all amounts"]["free"] == pytest.approx(next(c["bic"] for c in shift.comparison if c["fit"] == "free"))
    assert prior_only_verdict(rows, [], None).startswith("- prior-only account fails from amount 500: "
                                                          "the free fit wins on large half")
