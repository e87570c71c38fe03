"""The processes of an ablation grid: one driver per grid, workers that never outlive it, a --parallel
that cannot hang, and SLURM submissions that fail in one line and leave nothing behind."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_ablate import _grid
from training.grid.processes import LOCK_FILE, GridInUse, grid_lock


def _ablate(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ablate.py ARGS` as a user runs it; a hang fails the test instead of stopping the suite."""
    return subprocess.run([sys.executable, "ablate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (run.returncode, run.stderr)
    return lines[0]


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, state letter)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, (ppid, _) in table.items() if ppid == parent}
        found |= children
        todo += children
    return found


def _alive(pids: set[int]) -> set[int]:
    """The pids that still run (a zombie that nobody reaps has ended)."""
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


WORKER = """
import os, sys, time
from training.grid.processes import die_with_parent
die_with_parent()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
open(sys.argv[1], "w").write(f"{os.getpid()} {child}")
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_and_what_it_forks_die_with_its_parent(tmp_path):
    """die_with_parent alone, whatever the main module: kill -9 of the parent ends the worker and the
    process it forked at once (each would otherwise sleep a minute under PID 1)."""
    pids = tmp_path / "pids"
    middle = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {WORKER!r}, {str(pids)!r}])\ntime.sleep(60)"],
                              cwd=REPO)
    worker: set[int] = set()
    try:
        began = time.monotonic()
        while not pids.is_file() or len(pids.read_text().split()) < 2:
            assert time.monotonic() - began < 30 and middle.poll() is None, "the worker did not start"
            time.sleep(0.05)
        worker = {int(p) for p in pids.read_text().split()}
        assert _alive(worker) == worker
        middle.kill()
        middle.wait()
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), f"outlived their parent: {sorted(_alive(worker))}"
    finally:
        middle.kill()
        for pid in _alive(worker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", ["kill -9", "ctrl-c"])
@pytest.mark.slow
def test_workers_and_their_dataloader_workers_die_with_the_driver(tmp_path, stop):
    """Two sizes pretrain at once in two workers, each with a DataLoader worker of its own. kill -9 of the
    driver leaves no process behind and frees the grid; Ctrl-C at the terminal (SIGINT to the whole process
    group) says one line, exits 130 and leaves no process behind either."""
    overrides = ["--data.context_length", "32", "--model.n_positions", "32", "--data.num_workers", "1",
                 "--data.icl", "{k_values: [3], prompts_per_task: 8, batch_size: 8}"]
    config = _grid(tmp_path, "killed", sizes=["gpt2-1l", "gpt2-2l"], pretrain_steps=1_000_000, overrides=overrides)
    out = tmp_path / "killed" / "t"
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        driver = subprocess.Popen([sys.executable, "ablate.py", "--config", str(config), "--parallel", "2"], cwd=REPO,
                                  stdout=stdout, stderr=stderr,
                                  start_new_session=True,  # its own group, as in a terminal
                                      # with Ctrl-C's default action even when the tests run as a background job
                                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        began = time.monotonic()
        while True:  # both workers train, each with its DataLoader worker: grandchildren of the driver
            tree = _descendants(driver.pid)
            grandchildren = tree - {p for p, (ppid, _) in _processes().items() if ppid == driver.pid}
            logs = all((out / size / "pretrain" / "train.log").is_file() for size in ("gpt2-1l", "gpt2-2l"))
            if logs and len(grandchildren) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() - began < 120, f"the workers did not start training: {tree}"
            time.sleep(0.2)
        time.sleep(0.5)
        tree = _descendants(driver.pid)
        if stop == "kill -9":
            driver.kill()
        else:
            os.killpg(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(tree), f"processes of the grid outlived its driver: {sorted(_alive(tree))}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in _alive(_descendants(driver.pid)):
            os.kill(pid, signal.SIGKILL)
    if stop == "kill -9":
        assert code == -signal.SIGKILL
        with grid_lock(out):  # the kernel released the dead driver's lock
            pass
    else:
        # the workers' Lightning notices ("Seed set to 0") may come before it; the error line is the last
        err = (tmp_path / "stderr").read_text().strip().splitlines()
        assert code == 130 and err[-1].startswith("error: interrupted"), (code, err)
        assert not [line for line in err[:-1] if line.startswith("error:") or "Traceback" in line or "Warning" in line
                    or "Interrupt" in line], err
        assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_driver_of_a_grid_is_refused_naming_the_first(tmp_path):
    config = _grid(tmp_path, "busy")
    out = tmp_path / "busy" / "t"
    with grid_lock(out):
        run = _ablate("--config", str(config))
        with pytest.raises(GridInUse, match=f"PID {os.getpid()} on {socket.gethostname()}, started 20"):
            with grid_lock(out):
                pass
    line = _one_error_line(run)
    assert f"grid {out} is in use by another ablate.py (PID {os.getpid()} on {socket.gethostname()}, started " in line
    assert "wait for it to finish, or stop it" in line
    assert not (out / "gpt2-1l").exists(), "the refused driver trained nothing"
    assert not out.exists(), "the lock's file and the directories made for it are removed on release"


def test_cells_that_slurm_still_holds_are_not_trained_here(tmp_path, monkeypatch, capsys):
    """A grid submitted with --no-wait belongs to its SLURM jobs until they end: a local run is refused
    with one line, and writes nothing."""
    import ablate

    config = _grid(tmp_path, "queued")
    out = tmp_path / "queued" / "t"
    (out / "slurm").mkdir(parents=True)
    (out / "slurm" / "jobs.json").write_text(json.dumps({"gpt2-1l/pretrain": {"id": "777", "flags": []}}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "squeue", "echo 777")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert ablate.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell gpt2-1l/pretrain is a SLURM job still queued or running (job 777)" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["slurm"]


@pytest.mark.parametrize("parallel", ["20000", "99999999999999999999"])
@pytest.mark.slow
def test_an_absurd_parallel_is_capped_and_never_hangs(tmp_path, parallel):
    """--parallel 20000 used to hang at exit and 10^20 before doing anything: the count is capped to the
    cells left and the CPUs here, with a line that says so."""
    began = time.monotonic()
    run = _ablate("--config", str(_grid(tmp_path, "capped")), "--parallel", parallel, "--stop-after", "0", timeout=60)
    if len(parallel) > 10:  # beyond 2^31 - 1: refused in one line like every count
        assert (run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ")
                and "beyond" in run.stderr)
        return
    assert run.returncode == 0, run.stderr
    assert (f"[ablate] --parallel {parallel}: " in run.stdout
            and " worker processes (0 cells left to train, " in run.stdout)
    assert time.monotonic() - began < 30


@pytest.mark.slow
def test_slurm_without_submitit_says_how_to_install_it(tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "submitit.py").write_text("raise ImportError(\"No module named 'submitit'\")\n")
    run = _ablate("--config", str(_grid(tmp_path, "nosubmitit")), "--launcher", "slurm",
                  env={"PYTHONPATH": f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    line = _one_error_line(run)
    assert '--launcher slurm needs submitit' in line and 'pip install -e ".[slurm]"' in line, line
    assert not (tmp_path / "nosubmitit").exists()


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_commands_missing_is_one_line_and_writes_nothing(tmp_path):
    pytest.importorskip("submitit")
    config = _grid(tmp_path, "no-slurm", slurm={"cpus_per_cell": 1})
    run = _ablate("--config", str(config), "--launcher", "slurm", "--no-wait",
                  env={"PATH": str(Path(sys.executable).parent)})
    line = _one_error_line(run)
    assert "sbatch and srun: not installed here" in line and "--launcher local" in line, line
    assert not (tmp_path / "no-slurm").exists()


REFUSED = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"


@pytest.mark.parametrize("accepted", [0, 1])
@pytest.mark.slow
def test_a_refused_sbatch_is_one_line_and_leaves_no_submission_files(tmp_path, accepted):
    """sbatch refuses the first job, or accepts the pretraining and refuses the cells' array: one line
    with sbatch's message, no pickles or sbatch scripts left, and the accepted job recorded for a rerun."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "accepted").write_text("x" * accepted)
    _script(bin_dir / "sbatch", f'left=$(cat {tmp_path}/accepted)\nif [ -n "$left" ]; then\n'
                                f'  printf "" > {tmp_path}/accepted; echo "Submitted batch job 4242"; exit 0\nfi\n'
                                f'echo "{REFUSED}" >&2\nexit 1')
    _script(bin_dir / "srun", "exit 0")  # submitit looks for it; the jobs never run
    config = _grid(tmp_path, "refused", slurm={"cpus_per_cell": 1})
    run = _ablate("--config", str(config), "--launcher", "slurm", "--no-wait",
                  env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    line = _one_error_line(run)
    assert "sbatch refused the job" in line and REFUSED in line and "controller answers (sinfo)" in line, line
    out = tmp_path / "refused" / "t"
    if accepted:
        assert "1 job(s) submitted before it are recorded" in line
        assert json.loads((out / "slurm" / "jobs.json").read_text())["gpt2-1l/pretrain"]["id"] == "4242"
        left = [p.name for p in (out / "slurm").iterdir() if (p.suffix == ".pkl" and not p.name.startswith("4242_"))
                or (p.name.startswith(".submission_file_") and not p.is_symlink())]
        assert not left and (out / "slurm" / "4242_submitted.pkl").is_file(), left
    else:
        assert not (tmp_path / "refused").exists(), "nothing of the refused submission is left"
