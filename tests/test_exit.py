"""How the scripts end: bad input, Ctrl-C and bugs each the way user_errors/exit_status.py promises, and an
interrupted script ends even when interpreter shutdown would wait forever."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from user_errors import UserError
from user_errors.exit_status import exit_status


@pytest.mark.slow
def test_exit_within_ends_a_process_whose_shutdown_would_wait_forever():
    # a non-daemon thread that never finishes: Python's shutdown joins it forever
    code = ("import threading, train; train.exit_within(0.5, 130); "
            "threading.Thread(target=threading.Event().wait).start()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr


def raises(exc: BaseException):
    def main() -> None:
        raise exc
    return main


def lightning_exit() -> None:
    """What Lightning does on Ctrl-C in a running stage: tear down, then sys.exit(1) while handling it."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


def test_a_user_error_is_one_line_and_status_2(capsys):
    assert exit_status(raises(UserError("--out x is a file; pass a directory")), "kept") == 2
    assert capsys.readouterr().err == "error: --out x is a file; pass a directory\n"


@pytest.mark.parametrize("main", [raises(KeyboardInterrupt()), lightning_exit])
def test_ctrl_c_is_one_line_saying_how_to_resume_and_status_130(capsys, main):
    assert exit_status(main, "rerun to resume") == 130
    assert capsys.readouterr().err == "error: interrupted; rerun to resume\n"


def test_the_status_of_main_is_kept_and_anything_else_keeps_its_traceback():
    assert exit_status(lambda: None, "") == 0 and exit_status(lambda: 1, "") == 1
    with pytest.raises(ZeroDivisionError):
        exit_status(lambda: 1 / 0, "")
    with pytest.raises(SystemExit):  # --help, an explicit exit: the script's own
        exit_status(raises(SystemExit(0)), "")


@pytest.mark.parametrize("script, argv", [("evaluate.py", ["fit", "--curves", "c.csv"]),
                                          ("ablate.py", ["--parallel", "x"])])
@pytest.mark.slow
def test_a_bad_command_line_is_one_error_line_and_status_2(script, argv):
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, timeout=300, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {script}"), proc.stderr
    assert f"`python {script}" in lines[0] and "--help` lists the options" in lines[0]


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "ablate.py"])
@pytest.mark.slow
def test_help_into_a_reader_that_has_gone_ends_quietly(script):
    """`python train.py --help | head -1`, with head already gone when the help is written: nothing on
    stderr, and 0 (argparse drops what it cannot write) or the status a pipe's writer gets."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode in (0, 141) and proc.stderr == "", proc.stderr
