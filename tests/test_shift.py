"""Joint fits across post-training conditions on synthetic curves with known priors, P and K."""
import csv

import numpy as np
import pytest
import torch

import evaluate
from analysis.bootstrap import resample_table
from analysis.conditions import select_conditions
from analysis.curves import CurveGroup
from analysis.laws import get_law
from analysis.shift import ShiftConfig, analyse_shift, crossing
from analysis.synthetic import add_noise, law_prob
from contracts.curves_table import prob_rows, read_prompt_table

M = 4
SHOTS = np.arange(0.0, 61.0)
GAMMA = [0.9, 0.85, 0.8, 0.88]
BETA = [0.3, 0.2, 0.35, 0.25]
AMOUNTS = [0, 50, 250, 1000]
K = 0.8


def priors_at(amount: float) -> np.ndarray:
    """Disfavouring task 0: its prior decays with the amount, the others renormalise."""
    w = np.array([0.3, 0.25, 0.25, 0.2])
    w[0] *= np.exp(-amount / 300)
    return w / w.sum()


def conditions(move_P: bool, seed: int = 0) -> list[CurveGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for a in AMOUNTS:
        gamma = np.array(GAMMA) * (1 - 0.3 * a / 1000 * np.eye(M)[0]) if move_P else np.array(GAMMA)
        params = {"priors": priors_at(a).tolist(), "K": K, "gamma": gamma.tolist(), "beta": BETA}
        prob = add_noise(law_prob("bayesian_sampling", params, SHOTS, M)[0], 1000, rng)
        extra = {"stage": "pretrain"} if a == 0 else {"stage": "sft", "direction": "disfavor", "amount": str(a)}
        run = "gpt2-2l/pretrain" if a == 0 else f"gpt2-2l/sft-disfavor-{a}"
        groups.append(CurveGroup(run, 3, SHOTS, prob, -np.log(prob), np.full_like(prob, 1000), extra))
    return groups


@pytest.fixture(scope="module")
def fixed_P_result():
    config = ShiftConfig(baseline="gpt2-2l/pretrain", resamples=40, starts=4)
    return analyse_shift(conditions(move_P=False), config)


def test_joint_fit_recovers_prior_trajectory_and_intervals_cover(fixed_P_result):
    shared = [r for r in fixed_P_result.rows if r["fit"] == "shared"]
    assert len(shared) == len(AMOUNTS) * M
    fitted = np.array([r["prior"] for r in shared]).reshape(len(AMOUNTS), M)
    truth = np.array([priors_at(a) for a in AMOUNTS])
    np.testing.assert_allclose(fitted, truth, atol=0.03)
    assert np.all(np.diff(fitted[:, 0]) < 0), "the disfavoured task's prior must fall with the amount"
    lo = np.array([r["prior_lo"] for r in shared]).reshape(truth.shape)
    hi = np.array([r["prior_hi"] for r in shared]).reshape(truth.shape)
    covered = (lo <= truth) & (truth <= hi)
    assert covered.mean() >= 0.8, covered
    Ks = np.array([r["K"] for r in shared[::M]])
    assert np.all(np.abs(Ks / K - 1) < 0.1), Ks
    assert all(r["K_lo"] <= r["K"] <= r["K_hi"] for r in shared)


def test_shared_P_preferred_when_only_priors_move(fixed_P_result):
    by_fit = {c["fit"]: c for c in fixed_P_result.comparison}
    assert by_fit["shared"]["preferred"] and not by_fit["free"]["preferred"]
    assert by_fit["shared"]["bic"] < by_fit["free"]["bic"]
    assert by_fit["shared"]["n_params"] < by_fit["free"]["n_params"]


@pytest.mark.slow
def test_free_fit_preferred_when_task_knowledge_moves():
    result = analyse_shift(conditions(move_P=True), ShiftConfig(baseline="gpt2-2l/pretrain", resamples=2, starts=4))
    by_fit = {c["fit"]: c for c in result.comparison}
    assert by_fit["free"]["preferred"] and by_fit["free"]["bic"] < by_fit["shared"]["bic"]
    assert by_fit["free"]["heldout_nrmse"] < by_fit["shared"]["heldout_nrmse"]


def test_reemergence_predicted_next_to_measured(fixed_P_result):
    suppressed = [r for r in fixed_P_result.rows if r["fit"] == "shared" and r["shots_to_recover"] != ""]
    tasks = {(r["amount"], r["task"]) for r in suppressed}
    assert {("250", 0), ("1000", 0)} <= tasks, "the disfavoured task must be flagged at large amounts"
    for r in suppressed:
        if r["amount"] == "1000" and r["task"] == 0:
            assert r["shots_to_recover"] == pytest.approx(r["measured_shots_to_recover"], abs=1.5)
            assert r["shots_to_recover_lo"] <= r["shots_to_recover"] <= r["shots_to_recover_hi"]


def test_crossing_interpolates_and_reports_never():
    shots = np.array([0.0, 1.0, 2.0, 4.0])
    assert crossing(shots, np.array([0.1, 0.2, 0.4, 0.8]), 0.6) == pytest.approx(3.0)
    assert np.isinf(crossing(shots, np.array([0.1, 0.2, 0.3, 0.3]), 0.6))


def test_prompt_bootstrap_resamples_prompts(tmp_path):
    groups = conditions(move_P=False)[:2]
    rng = np.random.default_rng(0)
    path = tmp_path / "prompts.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "k", "task", "prompt", "shots", "prob"])
        for g in groups:
            for i in range(M):
                for p in range(20):
                    for s in SHOTS.astype(int):
                        w.writerow([g.run, g.k, i, p, s, rng.uniform(0.2, 0.9)])
    table = read_prompt_table(path)
    cond = select_conditions(groups, "gpt2-2l/pretrain")[0]
    sample = resample_table(cond, 5, np.random.default_rng(1), table)
    means = table[(groups[0].run, 3, 0)]
    # each resampled point is a mean of 20 of the prompts' values, not the count-based redraw
    assert sample.shape == (5, 2, M, len(SHOTS))
    assert np.all((sample[:, 0, 0] >= means.min(0)) & (sample[:, 0, 0] <= means.max(0)))
    assert not np.allclose(sample[0, 0, 0], sample[1, 0, 0])


def write_curves_csv(path, groups):
    rows = [row for g in groups for row in prob_rows(g.run, g.k, g.shots, g.prob, 1000, **g.extra)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)


@pytest.mark.slow
def test_shift_command_writes_report(tmp_path, capsys):
    curves = tmp_path / "curves.csv"
    write_curves_csv(curves, conditions(move_P=False)[::2])
    out = tmp_path / "shift"
    code = evaluate.main(["shift", "--curves", str(curves), "--baseline", "gpt2-2l/pretrain", "--out", str(out),
                          "--resamples", "4", "--starts", "3", "--true-priors", "0.3", "0.25", "0.25", "0.2"])
    assert code == 0
    with (out / "shift.csv").open() as f:
        rows = list(csv.DictReader(f))
    for col in ("run", "task", "prior", "prior_lo", "prior_hi", "K", "K_lo", "K_hi", "shots_to_recover"):
        assert col in rows[0]
    assert {r["fit"] for r in rows} == {"shared", "free"}
    report = (out / "report.md").read_text()
    assert "Joint vs free" in report and "true weight" in report
    assert (out / "plots" / "parameters_k3.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "nope"], "baseline run 'nope' is not in the curves table"),
    (["--baseline", "gpt2-2l/pretrain", "--law", "power"], "shift needs a Bayesian law"),
    (["--baseline", "gpt2-2l/pretrain", "--tol", "-1"], "tol -1.0 must be 0 (to rounding) or more"),
    (["--baseline", "gpt2-2l/pretrain", "--true-priors", "0.5", "0.5"], "true_priors has 2 weights"),
    (["--baseline", "gpt2-2l/pretrain", "--true-priors", "0.5", "0.5", "0.5", "-0.5"],
     "true_priors must be finite and >= 0"),
    (["--baseline", "gpt2-2l/pretrain", "--true-priors", "1", "1", "1", "1"], "sum to 4, not 1"),
])
def test_shift_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    curves = tmp_path / "curves.csv"
    write_curves_csv(curves, conditions(move_P=False)[:2])
    out = tmp_path / "shift"
    assert evaluate.main(["shift", "--curves", str(curves), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.slow
def test_every_interval_contains_its_estimate_and_covers_the_truth_near_its_level():
    """Four seeds of the fixed-P shift table: no NaN, every estimate inside its interval, and the
    priors' and K's intervals cover the truth at close to their 95%."""
    covered, total = 0, 0
    for seed in range(4):
        result = analyse_shift(conditions(move_P=False, seed=seed + 10),
                               ShiftConfig(baseline="gpt2-2l/pretrain", resamples=30, starts=8, seed=seed))
        for r in result.rows:
            for key in ("prior", "K", "gamma", "beta"):
                assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"], (key, r)
                assert not np.isnan([r[f"{key}_lo"], r[f"{key}_hi"]]).any()
            if r["shots_to_recover"] != "":
                assert r["shots_to_recover_lo"] <= r["shots_to_recover"] <= r["shots_to_recover_hi"]
        shared = [r for r in result.rows if r["fit"] == "shared"]
        truth = np.array([priors_at(float(r["amount"] or 0))[r["task"]] for r in shared])
        lo, hi = np.array([r["prior_lo"] for r in shared]), np.array([r["prior_hi"] for r in shared])
        covered += int(((lo <= truth) & (truth <= hi)).sum()) + sum(r["K_lo"] <= K <= r["K_hi"] for r in shared[::M])
        total += len(shared) + len(shared) // M
    assert 0.85 <= covered / total <= 1.0, covered / total


def test_runs_without_a_model_prefix_are_conditions_of_one_model(tmp_path):
    groups = conditions(move_P=False)
    for g in groups:
        g.run = g.run.split("/")[1]
        g.extra = {}
    assert [len(c.groups) for c in select_conditions(groups, "pretrain")] == [len(AMOUNTS)]


def test_interval_helpers_never_give_nan_and_always_contain_the_estimate():
    from analysis.bootstrap import link_interval, shots_interval

    rng = np.random.default_rng(0)
    boot = np.concatenate([rng.uniform(3, 30, 90), np.full(10, np.inf)])
    for point in (5.0, np.inf):
        lo, hi = shots_interval(point, boot, 0.95)
        assert lo <= point <= hi and not np.isnan([lo, hi]).any()
    assert shots_interval(5.0, boot, 0.95)[1] == np.inf  # 10% never recover: no upper bound
    assert shots_interval(np.inf, np.full(20, np.inf), 0.95) == (np.inf, np.inf)
    # resampled fits that all agree (a direction the data leave open) still get the curvature's width
    lo, hi = link_interval(2e9, np.full(30, 2e9), 5e9, "log", 0.95)
    assert lo < 2e9 / 10 and hi > 2e9 * 10
    assert link_interval(0.0, np.zeros(30), np.inf, "logit", 0.95) == (0.0, 1.0)
    lo, hi = link_interval(0.3, rng.normal(0.3, 0.02, 200), 0.02, "logit", 0.95)
    assert 0.25 < lo < 0.3 < hi < 0.35


@pytest.mark.slow
def test_k_values_fitted_in_worker_processes_equal_one_process():
    groups = conditions(move_P=False)
    groups += [CurveGroup(g.run, 5, g.shots, g.prob[:, ::-1].copy(), g.nll[:, ::-1].copy(), g.count, g.extra)
               for g in groups]  # a second k, so there are two problems to spread
    config = ShiftConfig(baseline="gpt2-2l/pretrain", resamples=4, starts=4)
    one = analyse_shift(groups, config)
    config.workers = 2
    two = analyse_shift(groups, config)
    assert one.rows == two.rows and one.comparison == two.comparison


def test_predicted_crossings_equal_a_search_of_the_whole_fine_grid():
    from analysis.fitting import predict
    from analysis.shift import predicted_crossings

    law = get_law("bayesian_sampling")
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(30, law.n_params(M), generator=gen, dtype=torch.float64)
    theta[:, -1] -= 2.0  # K from about 0.02 to 1: crossings anywhere from 0 shots to never
    thresholds = np.array([0.3, 0.5, 0.6, 0.7])
    got = predicted_crossings("bayesian_sampling", theta[:, None], False, M, 1, 600.0, thresholds)[:, 0]
    grid = np.concatenate([np.arange(0.0, 20.0, 0.05), np.geomspace(20.0, 600.0, 2000)])
    p = predict("bayesian_sampling", theta, torch.as_tensor(grid), M)[:, 0].exp().numpy()
    want = np.array([[crossing(grid, p[b, i], thresholds[i]) for i in range(M)] for b in range(len(theta))])
    assert np.isfinite(want).any() and np.isinf(want).any() and (want == 0).any()
    np.testing.assert_array_equal(got, want)


def test_free_fit_is_never_worse_than_the_joint_fit_on_any_condition():
    """The free model contains the joint one; with strongly favoured conditions, data-driven starts alone
    missed the optimum of some (a chi-square twice the joint fit's on that condition)."""
    rng = np.random.default_rng(3)
    groups = []
    for a in (0, 1000, 2500, 5000):
        priors = np.array([0.2, 0.3, 0.3, 0.2]) * np.exp(np.array([1.5 * np.log1p(a / 250), 0, 0, 0]))
        params = {"priors": (priors / priors.sum()).tolist(), "K": 0.6, "gamma": GAMMA, "beta": BETA}
        prob = add_noise(law_prob("bayesian_sampling", params, SHOTS, M)[0], 200, rng)
        run = "m/pretrain" if a == 0 else f"m/sft-favor-{a}"
        extra = {"stage": "pretrain"} if a == 0 else {"stage": "sft", "direction": "favor", "amount": str(a)}
        groups.append(CurveGroup(run, 3, SHOTS, prob, -np.log(prob), np.full_like(prob, 200), extra))
    result = analyse_shift(groups, ShiftConfig(baseline="m/pretrain", resamples=2, starts=4))
    cond, fits = result.conditions[0], result.fits[3]
    C = len(cond.groups)
    law = get_law(fits["shared"].law)
    w = torch.as_tensor(1 / cond.sd)
    y = torch.as_tensor(cond.prob)
    joint = law.log_prob(fits["shared"].theta, torch.as_tensor(SHOTS)[None], M, C)[0].exp()
    free = law.log_prob(fits["free"].theta, torch.as_tensor(SHOTS).expand(C, -1), M, 1)[:, 0].exp()
    chi2 = lambda p: (w * (p - y)).square().sum((1, 2))  # noqa: E731
    assert (chi2(free) <= chi2(joint) * (1 + 1e-9)).all(), (chi2(free), chi2(joint))


def test_joint_fit_does_not_depend_on_the_order_of_the_conditions():
    """The starts give every condition the same noise, so permuting the conditions permutes the fit.
    Drawn in parameter order, the 2 starts of this fit (the sampling-wise law on scoring-wise curves of
    9 conditions x 5 tasks) ended at chi-square 13,680, 13,616, 13,640 and 13,668 in four orders."""
    from analysis.conditions import Conditions
    from analysis.shift_fits import _fit_to, named_per_condition
    from benchmarks.shift_speed import paper_table

    groups, _ = paper_table("bayesian_scoring", 1, (3,), (250, 2500), 5, 41, 200, seed=3)
    config = ShiftConfig(baseline="gpt2-1l/pretrain", starts=2)
    cond = select_conditions(groups, config.baseline)[0]
    law, C = "bayesian_sampling", len(cond.groups)
    orders = [list(range(C))] + [list(np.random.default_rng(j).permutation(C)) for j in range(3)]
    fits, named = [], []
    for order in orders:
        permuted = Conditions(cond.k, [cond.groups[c] for c in order], cond.shots, cond.prob[order], cond.count[order])
        fits.append(_fit_to(permuted.mask, permuted, config, law=law))
        by_condition = named_per_condition(law, fits[-1].theta, True, 5, C)
        named.append([by_condition[order.index(c)] for c in range(C)])  # back in the table's order
    chi2 = [float(2 * f.loss[0]) for f in fits]
    assert max(chi2) - min(chi2) <= config.tol, chi2
    for other in named[1:]:
        for c in range(C):
            np.testing.assert_allclose(other[c]["priors"], named[0][c]["priors"], atol=1e-4)
            assert other[c]["K"] == pytest.approx(named[0][c]["K"], rel=1e-4)


@pytest.mark.slow
def test_the_law_is_chosen_by_bic_and_the_report_shows_every_law(tmp_path):
    """Curves drawn from the scoring-wise law: without --law, BIC picks it at every k, laws.csv scores all
    three laws (the chosen one at delta BIC 0), and law_priors.csv puts their priors side by side."""
    from benchmarks.shift_speed import paper_table

    groups, _ = paper_table("bayesian_scoring", 1, (3, 5), (250,), 5, 31, 200, seed=4)
    curves, out = tmp_path / "curves.csv", tmp_path / "shift"
    write_curves_csv(curves, groups)
    assert evaluate.main(["shift", "--curves", str(curves), "--baseline", "gpt2-1l/pretrain", "--out", str(out),
                          "--resamples", "4", "--starts", "4"]) == 0
    laws = list(csv.DictReader(open(out / "laws.csv")))
    assert {(r["k"], r["law"]) for r in laws} == {(k, law) for k in ("3", "5") for law in
                                                    ("bayesian", "bayesian_sampling", "bayesian_scoring")}
    used = {r["k"]: r["law"] for r in laws if r["used"] == "True"}
    assert used == {"3": "bayesian_scoring", "5": "bayesian_scoring"}, laws
    assert (all(float(r["delta_bic"]) >= 0 for r in laws)
            and all(float(r["delta_bic"]) == 0 for r in laws if r["used"] == "True"))
    assert {r["law"] for r in csv.DictReader(open(out / "shift.csv"))} == {"bayesian_scoring"}
    priors = list(csv.DictReader(open(out / "law_priors.csv")))
    assert len(priors) == 3 * 2 * 5 * 5  # laws x k x conditions x tasks
    assert "bayesian_scoring" in (out / "report.md").read_text()
