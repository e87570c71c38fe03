"""The benchmarks run end to end: the fit and shift benchmarks on their quick grids, reporting time, quality
and the ratio last; those no other test runs (the training benchmark has its own) on their --smoke
settings, ending with the line their numbers are read from."""
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_benchmark(script: str, setting: str, last_line: str, timeout: int) -> str:
    """A benchmark's run on `setting` (--quick, --smoke): its stdout, after checking that it succeeded and
    that its last line matches `last_line`."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), setting], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(last_line, proc.stdout.strip().splitlines()[-1]), proc.stdout[-2000:]
    return proc.stdout


def run_quick(script: str, ratio: str, timeout: int) -> str:
    """A benchmark's --quick run, whose last line is `ratio: X` with X > 0."""
    out = run_benchmark(script, "--quick", rf"{ratio}: [0-9.]+", timeout)
    assert float(out.strip().splitlines()[-1].split(": ")[1]) > 0, out
    return out


@pytest.mark.parametrize(("script", "last_line"), [
    ("data_throughput.py", r"ratio_vs_hmmlearn: [0-9.]+"),
    ("train_threads.py", r"ratio_vs_default: [0-9.]+"),
    ("llm_prompt_time.py", r"[0-9.]+M params on .+ \(torch\.\w+\), load [0-9.]+ s: [0-9.]+ s per prompt .*"),
])
def test_a_benchmark_smoke_run_ends_with_its_result(script, last_line):
    run_benchmark(script, "--smoke", last_line, 300)


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
