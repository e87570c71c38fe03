"""The benchmarks that no other test runs go through every code path on their --smoke settings and end
with the line their numbers are read from (the fit, shift and training benchmarks have their own tests)."""
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("script", "last_line"), [
    ("data_throughput.py", r"ratio_vs_hmmlearn: [0-9.]+"),
    ("train_threads.py", r"ratio_vs_default: [0-9.]+"),
    ("llm_prompt_time.py", r"[0-9.]+M params on .+ \(torch\.\w+\), load [0-9.]+ s: [0-9.]+ s per prompt .*"),
])
def test_a_benchmark_smoke_run_ends_with_its_result(script, last_line):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(last_line, proc.stdout.strip().splitlines()[-1]), proc.stdout[-2000:]
