"""`evaluate.py fit` end to end, and bad input: one `error:` line, exit 2, nothing written."""
import csv
import json

import numpy as np
import pytest

import evaluate
from analysis.synthetic import law_prob
from contracts.curves_table import prob_rows
from tests.conftest import TRUE_LAW

M = 3


def write_table(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)


def synthetic_rows(shots: np.ndarray | None = None, runs=("m/pretrain", "m/sft-favor-50")):
    shots = np.arange(41.0) if shots is None else shots
    rng = np.random.default_rng(0)
    truth = law_prob("bayesian_sampling", TRUE_LAW, shots, M)[0]
    return [row for run in runs
            for row in prob_rows(run, 3, shots, np.clip(truth + rng.normal(0, 0.01, truth.shape), 0.01, 0.99), 1000,
                                  layers=2)]


def fit(tmp_path, rows, *extra):
    curves = tmp_path / "curves.csv"
    write_table(curves, rows)
    out = tmp_path / "fits"
    return evaluate.main(["fit", "--curves", str(curves), "--out", str(out), "--starts", "3", *extra]), out


@pytest.mark.slow
def test_fit_writes_the_design_outputs(tmp_path, capsys):
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "bayesian", "bayesian_sampling", "power",
                    "--fit-fraction", "0.25", "0.5")
    assert code == 0
    with (out / "fits.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:9] == ["run", "k", "law", "split", "nrmse", "nrmse_nll", "n_params", "loss", "converged"]
    assert len(rows) == 2 * 3 * 3  # runs x laws x (interpolation + two fractions)
    assert {r["n_params"] for r in rows if r["law"] == "bayesian"} == {str(M * M + M)}  # P, K, M - 1 free priors
    assert all(float(r["nrmse"]) < 0.05 for r in rows if r["law"] == "bayesian_sampling")
    params = json.loads((out / "params.json").read_text())
    tied = next(p for p in params if p["law"] == "bayesian_sampling" and p["split"] == "interpolation")
    assert len(tied["params"]["priors"]) == M and len(tied["params"]["gamma"]) == M and "K" in tied["params"]
    original = next(p for p in params if p["law"] == "bayesian")
    assert np.array(original["params"]["P"]).shape == (M, M)
    report = (out / "report.md").read_text()
    assert "| bayesian_sampling |" in report and "extrapolation (f=0.25)" in report
    assert (out / "plots" / "m_pretrain_k3.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| law |" in printed and "wrote" in printed


def test_nll_space_and_rerun_into_same_dir(tmp_path):
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "logistic", "--loss", "nll", "--no-plots")
    assert code == 0
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "power", "--no-plots")
    assert code == 0
    with (out / "fits.csv").open() as f:
        assert {r["law"] for r in csv.DictReader(f)} == {"power"}


def drop_column(rows, column):
    return [{k: v for k, v in r.items() if k != column} for r in rows]


def set_value(rows, column, value):
    return [{**r, column: value} if j == 5 else r for j, r in enumerate(rows)]


@pytest.mark.parametrize("make_rows, argv, message", [
    (lambda: drop_column(synthetic_rows(), "count"), [], "missing column(s) count"),
    (lambda: set_value(synthetic_rows(), "prob", "nan"), [], "prob is NaN"),
    (lambda: set_value(synthetic_rows(), "prob", "1.4"), [], "prob = 1.4 is outside [0, 1]"),
    (lambda: set_value(synthetic_rows(), "shots", "2.5"), [], "shots = 2.5 must be a non-negative integer"),
    (lambda: set_value(synthetic_rows(), "count", "inf"), [], "count = inf must be a positive integer"),
    (lambda: set_value(synthetic_rows(), "shots", "inf"), [], "shots = inf must be a non-negative integer"),
    (lambda: set_value(synthetic_rows(), "task", "-inf"), [], "task = -inf must be a non-negative integer"),
    (lambda: synthetic_rows(), ["--step", "7"], "has no rows at step 7; the table has no step column"),
    (lambda: synthetic_rows(), ["--laws", "bayesian", "powerlaw"], "unknown law 'powerlaw'"),
    (lambda: synthetic_rows(), ["--fit-fraction", "1.5"], "fit fractions [1.5] must lie strictly between 0 and 1"),
    (lambda: synthetic_rows(), ["--tol", "-0.1"], "tol -0.1 must be 0 (to rounding) or more, in chi-square"),
    (lambda: synthetic_rows(), ["--tol", "nan"], "tol nan must be 0 (to rounding) or more, in chi-square"),
    (lambda: [r for r in synthetic_rows() if r["task"] != 1], [], "tasks must be numbered 0..M-1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make_rows, argv, message):
    code, out = fit(tmp_path, make_rows(), *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_missing_file_is_reported(tmp_path, capsys):
    assert evaluate.main(["fit", "--curves", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_row_with_missing_fields_is_one_line(tmp_path, capsys):
    curves = tmp_path / "curves.csv"
    write_table(curves, synthetic_rows())
    lines = curves.read_text().splitlines()
    curves.write_text("\n".join(lines[:4] + [",".join(lines[4].split(",")[:5])] + lines[5:]) + "\n")
    assert evaluate.main(["fit", "--curves", str(curves), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "line 5" in err[0] and "columns expected" in err[0]


@pytest.mark.slow
def test_a_law_with_too_few_points_is_skipped_with_a_line_in_the_report(tmp_path):
    code, out = fit(tmp_path, synthetic_rows(shots=np.arange(30.0)), "--laws", "bayesian", "power")
    assert code == 0
    with (out / "fits.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the original law has 12 parameters; its extrapolation fit sees 3 shots x 3 tasks = 9 points
    assert {(r["law"], r["split"]) for r in rows} == {("bayesian", "interpolation"), ("power", "interpolation"),
                                                    ("power", "extrapolation")}
    report = (out / "report.md").read_text()
    assert ("bayesian on run m/pretrain, k 3, extrapolation (fit fraction 0.1): 12 parameters but only 9 points"
            in report)


def test_a_runs_own_table_fits_its_last_evaluation_by_default(tmp_path, capsys):
    early = [{**r, "prob": 0.5, "nll": 0.69, "step": 100} for r in synthetic_rows(runs=("m/pretrain",))]
    late = [{**r, "step": 300} for r in synthetic_rows(runs=("m/pretrain",))]
    code, out = fit(tmp_path, early + late, "--laws", "bayesian_sampling", "--splits", "interpolation", "--no-plots")
    assert code == 0
    params = json.loads((out / "params.json").read_text())
    assert abs(params[0]["params"]["priors"][0] - TRUE_LAW["priors"][0]) < 0.1  # the step-300 curves, not flat 0.5
    code, out = fit(tmp_path, early + late, "--laws", "power", "--splits", "interpolation", "--no-plots",
                    "--step", "100")
    assert code == 0


def test_params_json_carries_standard_errors_shaped_like_the_parameters(tmp_path):
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "bayesian", "bayesian_scoring", "logistic", "--no-plots")
    assert code == 0
    for entry in json.loads((out / "params.json").read_text()):
        assert set(entry["stderr"]) == set(entry["params"])
        for key, value in entry["params"].items():
            assert np.shape(entry["stderr"][key]) == np.shape(value), (entry["law"], key)
        if entry["law"] == "bayesian_scoring" and entry["split"] == "interpolation":
            assert all(np.isfinite(entry["stderr"][k]).all() for k in ("priors", "K", "gamma", "beta"))
            assert entry["stderr"]["K"] < 0.5 * entry["params"]["K"]


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_unusable_out_is_refused_before_any_fit(tmp_path, capsys, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = blocker if where == "file" else blocker / "fits"
    curves = tmp_path / "curves.csv"
    write_table(curves, synthetic_rows())
    assert evaluate.main(["fit", "--curves", str(curves), "--out", str(out), "--starts", "3"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "fitted" not in captured.err, err
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_a_report_directory_is_replaced_whole_with_the_users_modes(tmp_path):
    import os

    code, out = fit(tmp_path, synthetic_rows(), "--laws", "power")  # an older report, with plots
    assert code == 0 and any((out / "plots").iterdir())
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "power", "--no-plots")
    assert code == 0
    assert not (out / "plots").exists() and (out / "fits.csv").exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((out / "fits.csv").stat().st_mode & 0o777) == 0o666 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fits.")]


@pytest.mark.parametrize(("argv", "message"), [
    (["fit"], "error: evaluate.py fit: the following arguments are required: --curves, --out "
              "(`python evaluate.py fit --help`"),
    (["fitt"], "error: evaluate.py: argument command: invalid choice: 'fitt'"),
    (["fit", "--curves", "c.csv", "--out", "o", "--starts", "many"],
     "argument --starts: 'many' is not a whole number; give one >= 1"),
    (["fit", "--curves", "c.csv", "--out", "o", "--starts", "0"], "argument --starts: 0 must be >= 1"),
    (["fit", "--curves", "c.csv", "--out", "o", "--seed", "-1"], "argument --seed: -1 must be >= 0"),
    (["curves", "--ideal", "--out", "c.csv", "--prompts", "0"], "argument --prompts: 0 must be >= 1"),
    (["shift", "--curves", "c.csv", "--out", "o", "--baseline", "b", "--resamples", "0"],
     "argument --resamples: 0 must be >= 1"),
    (["ladder", "--out", "o", "--k", "0"], "argument --k: 0 must be >= 1"),
])
def test_bad_flags_are_one_line_naming_the_help(capsys, argv, message):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_nll_a_rounding_error_below_zero_is_written_and_read_as_zero(tmp_path):
    """The exact learner's mean of -log 1 came out -1.39e-17, and `fit` then refused the project's own table."""
    from contracts.curves_table import curve_row, read_curves

    assert curve_row("r", 3, 0, 0, 1.0, -1.39e-17, "", 10)["nll"] == 0.0
    rows = synthetic_rows()
    rows[0]["nll"] = -1.39e-17
    path = tmp_path / "c.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    group = read_curves(path)[0]
    assert group.nll.min() >= 0.0
    rows[0]["nll"] = -0.01  # a real negative is still refused
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="nll = -0.01 must be finite and >= 0"):
        read_curves(path)


def test_a_rewritten_step_0_block_replaces_the_old_one(tmp_path):
    """A run restarted after a failed start evaluates step 0 again: its block must replace the first,
    not sit beside it (step 0 was keyed as 'no step', so `fit --step 0` then found duplicate rows)."""
    from contracts.curves_table import read_curves, write_curves

    path = tmp_path / "curves.csv"
    rows = [{**r, "step": 0} for r in synthetic_rows(runs=("m/pretrain",))]
    write_curves(rows, path, append=True, replace=True)
    write_curves([{**r, "prob": r["prob"] * 0.9} for r in rows], path, append=True, replace=True)
    with path.open() as f:
        assert sum(1 for _ in f) == len(rows) + 1
    assert read_curves(path, step=0)[0].prob.max() <= 0.9 * max(r["prob"] for r in rows) + 1e-12


def _table(tmp_path, rows, header=None, encoding="utf-8", prefix=b""):
    path = tmp_path / "c.csv"
    columns = list(rows[0])
    text = ",".join(header or columns) + "\n" + "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows)
    path.write_bytes(prefix + text.encode(encoding))
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(acc=1.5), "line 2: acc = 1.5 is outside [0, 1]"),
    (lambda r: r.update(prob=0.0, nll=0.5), "line 2: prob = 0 with a finite nll = 0.5"),
    (lambda r: r.update(run=" "), "line 2: run is empty"),
    (lambda r: r.update(k="1e12"), "line 2: k = 1e12 must be a non-negative integer below 2^31"),
    (lambda r: r.update(run="caf\u00e9-\xff"), "line 2: not UTF-8 text; save the table as UTF-8 CSV"),
])
def test_values_that_cannot_be_are_refused_with_their_line(tmp_path, change, message):
    from contracts.curves_table import read_curves

    rows = synthetic_rows(runs=("m/pretrain",))
    change(rows[0])
    path = _table(tmp_path, rows, encoding="latin-1" if "UTF-8" in message else "utf-8")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("^", r"\^")):
        read_curves(path)


def test_a_byte_order_mark_and_padded_header_names_are_read(tmp_path):
    from contracts.curves_table import read_curves

    rows = synthetic_rows(runs=("m/pretrain",))
    path = _table(tmp_path, rows, header=[f" {c} " for c in rows[0]], prefix=b"\xef\xbb\xbf")
    assert read_curves(path)[0].run == "m/pretrain"


def test_distinct_run_labels_never_share_a_plot_file():
    from analysis.output import file_names

    labels = ["a/b", "a_b", "a b", "a:b", "run-1", "m/pretrain"]
    names = file_names(labels)
    assert len(set(names.values())) == len(labels) and names["run-1"] == "run-1" and names["m/pretrain"] == "m_pretrain"
    assert file_names(labels[::-1]) == names


def test_a_table_too_short_for_every_fit_keeps_the_old_report(tmp_path, capsys):
    code, out = fit(tmp_path, synthetic_rows(), "--laws", "power", "--no-plots")
    assert code == 0
    before = (out / "fits.csv").read_bytes()
    code, _ = fit(tmp_path, synthetic_rows(shots=np.arange(2.0)), "--laws", "power", "--no-plots")
    assert code == 2 and "no fit can be made" in capsys.readouterr().err
    assert (out / "fits.csv").read_bytes() == before
