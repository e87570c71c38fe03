"""Nothing a user owns is lost to a report: `--out` replaces only what the project wrote there, never the
command's input, and the swap that replaces it leaves a whole report after an interruption at any step
(where the system cannot exchange two directories atomically: once the next write has cleaned up)."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import evaluate
from safe_io.files import MARKER, _clean_stale, atomic_dir, mark_output
from tests.conftest import REPO, snapshot

CURVES = REPO / "examples" / "curves_ideal.csv"
WORLD = REPO / "configs" / "data" / "ginc.yaml"


def victim(tmp_path: Path) -> Path:
    folder = tmp_path / "victim"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(CURVES, folder / "my_curves.csv")
    (folder / "notes.txt").write_text("x\n")
    (folder / "sub" / "data.txt").write_text("y\n")
    return folder


COMMANDS = {
    "fit": lambda curves, out: ["fit", "--curves", str(curves), "--out", str(out), "--laws", "power"],
    "shift": lambda curves, out: ["shift", "--curves", str(curves), "--out", str(out), "--baseline", "exact"],
    "ladder": lambda curves, out: ["ladder", "--data-config", str(WORLD), "--out", str(out), "--device", "cpu"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("input_inside", [True, False])
def test_out_naming_a_directory_of_other_files_is_refused_before_any_work(tmp_path, capsys, command, input_inside):
    out = victim(tmp_path)
    before = snapshot(out)
    curves = out / "my_curves.csv" if input_inside else CURVES
    assert evaluate.main(COMMANDS[command](curves, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --out ") and "Traceback" not in "\n".join(err)
    assert ("holds the input" in err[-1]) if input_inside and command != "ladder" else ("did not write" in err[-1])
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"], "no leftovers beside it"


@pytest.mark.slow
def test_out_that_is_the_commands_own_input_directory_is_refused(tmp_path, capsys):
    report = tmp_path / "r"
    assert evaluate.main(COMMANDS["fit"](CURVES, report)) == 0
    shutil.copy(CURVES, report / "curves.csv")  # a name reports use, but here it is the input
    before = snapshot(report)
    assert evaluate.main(COMMANDS["fit"](report / "curves.csv", report)) == 2
    assert "holds the input" in capsys.readouterr().err and snapshot(report) == before


@pytest.mark.slow
def test_a_report_replaces_the_report_it_wrote_before(tmp_path, capsys):
    out = tmp_path / "fits"
    assert evaluate.main(COMMANDS["fit"](CURVES, out)) == 0
    (out / "report.md").write_text("stale")
    assert evaluate.main(COMMANDS["fit"](CURVES, out)) == 0
    assert (out / "report.md").read_text() != "stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits"]


CRASH = textwrap.dedent("""
    import os, shutil, sys
    sys.path.insert(0, {root!r})
    import safe_io.files as output
    from pathlib import Path

    stop_at, exchange = int(sys.argv[1]), sys.argv[2] == "exchange"
    calls = [0]

    def step(fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == stop_at:
                os._exit(9)  # as kill -9: no cleanup runs
            return fn(*args, **kwargs)
        return wrapped

    output.os.replace = step(os.replace)
    output.shutil.rmtree = step(shutil.rmtree)
    output._exchange = step(output._exchange if exchange else lambda a, b: False)
    with output.atomic_dir(Path(sys.argv[3])) as tmp:
        (tmp / "report.md").write_text("new")
        if stop_at == 1:
            os._exit(9)  # while writing
        (tmp / "fits.csv").write_text("new")
""")


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_an_interrupt_at_any_step_of_the_swap_leaves_one_whole_report(tmp_path, swap):
    script = tmp_path / "crash.py"
    script.write_text(CRASH.format(root=str(REPO)))
    outcomes = set()
    for stop_at in range(1, 8):  # past the last step of either swap: the run completes
        folder = tmp_path / f"case{stop_at}"
        out = folder / "report"
        out.mkdir(parents=True)
        (out / "report.md").write_text("old")
        (out / "fits.csv").write_text("old")
        mark_output(out)  # as the project leaves every report it writes
        proc = subprocess.run([sys.executable, str(script), str(stop_at), swap, str(out)], capture_output=True)
        if not out.exists():  # killed between two renames: only without an atomic exchange
            assert swap == "renames", stop_at
            _clean_stale(out)  # what the next write does first: the old report goes back
        texts = {p.name: p.read_text() for p in out.iterdir() if p.name != MARKER}
        assert texts in ({"report.md": "old", "fits.csv": "old"}, {"report.md": "new", "fits.csv": "new"}), \
            (stop_at, texts)
        outcomes.add((proc.returncode, texts["report.md"]))
        with atomic_dir(out) as tmp:  # the next write cleans up what the interrupted one left
            (tmp / "report.md").write_text("next")
        assert [p.name for p in folder.iterdir()] == ["report"], (stop_at, list(folder.iterdir()))
        assert (out / "report.md").read_text() == "next"
    assert (9, "old") in outcomes and (9, "new") in outcomes and (0, "new") in outcomes, outcomes


def test_an_empty_data_config_is_refused_not_run_as_the_default_world(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    out = tmp_path / "ladder"
    assert evaluate.main(["ladder", "--data-config", str(empty), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("is empty; give the world and ICL settings, "
                                                    "as configs/data/ginc.yaml does")
    assert not out.exists()


def default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. A shell starts background jobs with SIGINT ignored, and
    Python then never raises KeyboardInterrupt, so under such a CI the child would not see the signal."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_a_fit_stops_with_one_line_130_and_the_old_report_intact(tmp_path):
    import signal
    import time

    out = tmp_path / "fits"
    assert evaluate.main(COMMANDS["fit"](CURVES, out)) == 0
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "fit", "--curves", str(CURVES),
                             "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 60
    while not any(p.name.startswith(".fits.tmp-") for p in tmp_path.iterdir()):  # fitting has begun
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["fits"]


@pytest.mark.parametrize(("device", "message"), [
    ("cuda:99", "--device cuda:99: this machine's torch sees"), ("gpu0", "--device 'gpu0' is not a device name")])
def test_a_device_this_machine_cannot_use_is_one_line_before_any_work(tmp_path, capsys, device, message):
    out = tmp_path / "c.csv"
    assert evaluate.main(["curves", "--ideal", "--data-config", str(WORLD), "--out", str(out), "--prompts", "2",
                          "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {message}") and not out.exists()


CRASH_CURVES = textwrap.dedent("""
    import csv, os, sys
    sys.path.insert(0, {root!r})
    from contracts.curves_table import read_rows, write_curves

    rows = read_rows({curves!r})
    original = csv.DictWriter.writerows

    def half_then_killed(self, some):
        original(self, list(some)[:5])
        os._exit(9)  # as kill -9 in the middle of writing

    csv.DictWriter.writerows = half_then_killed
    write_curves(rows, sys.argv[1])
""")


def test_curves_out_killed_while_writing_keeps_the_old_table_and_the_next_write_cleans_up(tmp_path):
    from contracts.curves_table import read_rows, write_curves

    out = tmp_path / "c.csv"
    shutil.copy(CURVES, out)
    before = out.read_bytes()
    script = tmp_path / "crash.py"
    script.write_text(CRASH_CURVES.format(root=str(REPO), curves=str(CURVES)))
    assert subprocess.run([sys.executable, str(script), str(out)]).returncode == 9
    assert out.read_bytes() == before
    assert any(p.name.startswith(".c.csv.tmp-") for p in tmp_path.iterdir()), "the killed writer's temporary"
    write_curves(read_rows(CURVES)[:10], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "crash.py"]


def test_curves_out_that_is_an_input_or_a_directory_is_refused_before_measuring(tmp_path, capsys):
    config = tmp_path / "world.yaml"
    shutil.copy(WORLD, config)
    before = config.read_bytes()
    assert evaluate.main(["curves", "--ideal", "--data-config", str(config), "--out", str(config)]) == 2
    assert "is the input" in capsys.readouterr().err and config.read_bytes() == before
    assert evaluate.main(["curves", "--ideal", "--data-config", str(config), "--out", str(tmp_path)]) == 2
    assert "is a directory; pass a CSV file path" in capsys.readouterr().err


@pytest.mark.slow
def test_a_bug_inside_the_library_keeps_its_traceback_while_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    """Only a UserError becomes the one `error:` line: a plain ValueError (here a shape error) raised inside
    the library surfaces with its traceback in each of the three scripts."""
    import ablate
    import train
    from datamodules.ginc_datamodule import GincDataModule
    from evaluation import reports

    def shape_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    assert evaluate.main(["fit", "--curves", str(tmp_path / "none.csv"), "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.startswith("error: curves file")
    monkeypatch.setattr(reports, "fit_table", shape_bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        evaluate.main(["fit", "--curves", str(CURVES), "--out", str(tmp_path / "f")])

    assert ablate.main(["--config", str(tmp_path / "none.yaml")]) == 2
    monkeypatch.setattr(ablate, "run_grid", shape_bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        ablate.main(["--config", str(REPO / "configs" / "ablations" / "tiny.yaml")])

    tiny = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--run.root", str(tmp_path / "runs")]
    assert train.main([*tiny, "--data.world.n_tasks", "0"]) == 2  # refused while jsonargparse builds the data
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: data.world.n_tasks must be >= 1, got 0"
    monkeypatch.setattr(GincDataModule, "setup", shape_bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        train.main([*tiny, "--trainer.max_steps", "1"])
