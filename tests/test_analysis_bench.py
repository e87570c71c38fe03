"""The analysis benchmarks run end to end on their quick grids and report time, quality and the ratio last."""
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the fit and shift benchmarks' quick runs


def run_quick(script: str, ratio: str, timeout: int) -> str:
    """A benchmark's --quick run: its stdout, after checking that `ratio: X` (X > 0) is its last line."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick"],
                          capture_output=True, text=True, timeout=timeout, check=True)
    last = re.fullmatch(rf"{ratio}: ([0-9.]+)", proc.stdout.strip().splitlines()[-1])
    assert last and float(last.group(1)) > 0, proc.stdout
    return proc.stdout


def test_fit_speed_quick_reports_ratio_last():
    out = run_quick("fit_speed.py", "ratio_vs_sequential", 300)
    # quality on the same fits: those where the sequential loop did not break down
    ours = float(re.search(r"ours: [0-9.]+s on cpu, .*\(([0-9.]+) on the fits where", out).group(1))
    peer = float(re.search(r"sequential: [0-9.]+s on cpu, mean NRMSE ([0-9.]+)", out).group(1))
    assert ours <= 1.1 * peer, out


def test_shift_speed_quick_reports_agreement_coverage_and_ratio_last():
    out = run_quick("shift_speed.py", "ratio_vs_straightforward", 600)
    # the joint fit has one optimum: both ways must reach it
    assert "shared: chi-square" in out and "1/1 fits reach the same optimum" in out, out
    for what in ("the favoured task's true prior", "every true prior", "the true K"):
        covered = re.search(rf"{what} (\d+)/(\d+)", out)
        assert int(covered.group(1)) >= 0.8 * int(covered.group(2)), (what, out)
    # the law is chosen by the evidence: the one the table was drawn from
    chosen = re.search(r"the generating law \(bayesian_sampling\) chosen at (\d+) of (\d+)", out)
    assert chosen and chosen.group(1) == chosen.group(2), out
