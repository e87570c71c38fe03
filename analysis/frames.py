"""Fit and shift results as pandas DataFrames, for notebooks.

pandas is an optional extra (`pip install -e ".[frames]"`); nothing else in the project needs it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from analysis.fitting import FitResult, flat_params
from analysis.shift import ShiftResult

if TYPE_CHECKING:
    import pandas as pd


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError('DataFrames of results need pandas: pip install -e ".[frames]" '
                          '(or pip install pandas)') from None
    return pandas


def fits_frame(results: Sequence[FitResult]) -> pd.DataFrame:
    """One row per fit: the columns of fits.csv as numbers, then each named parameter and its standard
    error (`<name>_se`). Parameters a law does not have are NaN."""
    rows = []
    for r in results:
        row = {"run": r.group.run, "k": r.group.k, "law": r.law, "split": r.split, "fit_fraction": r.fraction,
               "nrmse": r.nrmse, "nrmse_nll": r.nrmse_nll, "n_params": r.n_params, "loss": r.loss,
               "converged": r.converged}
        params, stderr = flat_params(r.params), flat_params(r.stderr)
        rows.append({**row, **params, **{f"{name}_se": stderr[name] for name in params}})
    return _pandas().DataFrame(rows)


def shift_frame(result: ShiftResult) -> pd.DataFrame:
    """One row per (k, fit, condition, task): shift.csv's columns, numbers unrounded ("" -> NaN)."""
    pd = _pandas()
    return pd.DataFrame(result.rows).replace({"": np.nan}).infer_objects()


def comparison_frame(result: ShiftResult) -> pd.DataFrame:
    """One row per (k, fit): comparison.csv, shared P against free fits."""
    return _pandas().DataFrame(result.comparison)
