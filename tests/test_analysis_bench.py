"""The fit benchmark runs end to end on its quick grid and reports time, quality and the ratio last."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fit_speed_quick_reports_ratio_last():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_speed.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=True)
    lines = proc.stdout.strip().splitlines()
    ratio = re.fullmatch(r"ratio_vs_sequential: ([0-9.]+)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    # quality on the same fits: those where the sequential loop did not break down
    ours = float(re.search(r"ours: [0-9.]+s on cpu, .*\(([0-9.]+) on the fits where", proc.stdout).group(1))
    peer = float(re.search(r"sequential: [0-9.]+s on cpu, mean NRMSE ([0-9.]+)", proc.stdout).group(1))
    assert ours <= 1.1 * peer, proc.stdout


def test_shift_speed_quick_reports_agreement_coverage_and_ratio_last():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shift_speed.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, check=True)
    lines = proc.stdout.strip().splitlines()
    ratio = re.fullmatch(r"ratio_vs_straightforward: ([0-9.]+)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    # the joint fit has one optimum: both ways must reach it
    assert "shared: chi-square" in proc.stdout and "1/1 fits reach the same optimum" in proc.stdout, proc.stdout
    covered = re.search(r"joint-fit intervals cover the true prior (\d+)/(\d+)", proc.stdout)
    assert int(covered.group(1)) >= 0.8 * int(covered.group(2)), proc.stdout
