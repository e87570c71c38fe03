"""An interrupted script ends even when interpreter shutdown would wait forever."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_exit_within_ends_a_process_whose_shutdown_would_wait_forever():
    # a non-daemon thread that never finishes: Python's shutdown joins it forever
    code = ("import threading, train; train.exit_within(0.5, 130); "
            "threading.Thread(target=threading.Event().wait).start()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
