"""Fit and shift results as DataFrames carry the same numbers as the result objects and the CSVs."""
import csv
import os
import re

import numpy as np
import pandas as pd
import pytest

from analysis.fitting import FitConfig, fit_groups, flat_params
from analysis.frames import comparison_frame, fits_frame, shift_frame
from analysis.shift import ShiftConfig, analyse_shift
from analysis.synthetic import synthetic_group
from contracts.curves_table import prob_rows, write_curves
from evaluation.reports import fit_table
from tests.conftest import REPO, TRUE_LAW

M = 3
SHOTS = np.arange(0.0, 41.0)


def groups(n: int = 2):
    rng = np.random.default_rng(0)
    return [synthetic_group(f"m/c{i}", 3, "bayesian_sampling", TRUE_LAW, SHOTS, M, 2000, rng)[0] for i in range(n)]


def test_flat_params_names_every_entry():
    assert flat_params({"K": 0.5, "P": [[1, 2], [3, 4]], "priors": [0.2, 0.8]}) == {
        "K": 0.5, "P[0,0]": 1.0, "P[0,1]": 2.0, "P[1,0]": 3.0, "P[1,1]": 4.0, "priors[0]": 0.2, "priors[1]": 0.8}


def test_fits_frame_has_a_row_per_fit_with_its_parameters_and_errors():
    config = FitConfig(laws=("bayesian_sampling", "power"), splits=("interpolation",), starts=4)
    results = fit_groups(groups(), config)
    frame = fits_frame(results)
    assert len(frame) == len(results) == 4
    for row, r in zip(frame.itertuples(index=False), results):
        assert (row.run, row.law, row.nrmse, row.converged) == (r.group.run, r.law, r.nrmse, r.converged)
    bayes = frame[frame.law == "bayesian_sampling"]
    assert np.allclose(bayes[[f"priors[{i}]" for i in range(M)]].to_numpy(), TRUE_LAW["priors"], atol=0.05)
    assert (bayes["K_se"] > 0).all() and frame.loc[frame.law == "power", "K"].isna().all()


def test_fits_frame_agrees_with_fits_csv(tmp_path):
    curves = write_curves([row for g in groups() for row in prob_rows(g.run, g.k, g.shots, g.prob, 2000)],
                          tmp_path / "c.csv")
    results, skipped = fit_table(curves, tmp_path / "fits", FitConfig(laws=("power",), starts=2), plots=False)
    with (tmp_path / "fits" / "fits.csv").open() as f:
        written = list(csv.DictReader(f))
    frame = fits_frame(results)
    assert not skipped and len(written) == len(frame)
    assert np.allclose([float(r["nrmse"]) for r in written], frame.nrmse, rtol=1e-5)


def test_shift_frames_are_the_shift_tables_with_numbers():
    shift = analyse_shift(groups(3), ShiftConfig(baseline="m/c0", resamples=2, starts=2))
    rows, comparison = shift_frame(shift), comparison_frame(shift)
    assert len(rows) == len(shift.rows) and len(comparison) == len(shift.comparison) == 2
    assert pd.api.types.is_float_dtype(rows["prior"]) and pd.api.types.is_float_dtype(rows["shots_to_recover"])
    blank = [r["shots_to_recover"] == "" for r in shift.rows]
    assert rows["shots_to_recover"].isna().tolist() == blank
    assert set(comparison.fit) == {"shared", "free"} and comparison.preferred.sum() == 1


@pytest.mark.slow
def test_the_design_docs_python_example_runs(tmp_path, monkeypatch):
    """The 'From Python' block of docs/design.md, run as written (from a checkout's root)."""
    block = re.search(r"## From Python.*?```python\n(.*?)```", (REPO / "docs" / "design.md").read_text(), re.S).group(1)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/design.md", "exec"), namespace)
    assert len(namespace["fits"]) > 0 and (tmp_path / "fits" / "fits.csv").is_file()
    assert (tmp_path / "shift" / "shift.csv").is_file() and not os.path.exists(REPO / "fits")
