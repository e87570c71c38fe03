"""The ablation grid on SLURM, through submitit: each size's pretraining is one job, and its post-training
cells are one job array that starts once that job has succeeded (afterok). Every job asks for what the
grid's `slurm:` section says. A job that SLURM preempts or times out is requeued by submitit and resumes
from the cell's last checkpoint.

`<grid>/slurm/jobs.json` records each submitted cell's job id and what it was asked (its config). A rerun (after
`--no-wait`, or after this process was stopped) collects the jobs SLURM still holds instead of submitting them
again, and resubmits only cells that are neither DONE nor queued; a job queued under other settings stops it.
Job logs are `<grid>/slurm/<job id>_*`.

The driver (the process that submits and waits) holds the grid's lock (processes.py); the jobs
do not need it. submitit missing, or sbatch refusing a job (the controller unreachable, a bad partition),
stops the driver with one line, sbatch's own message in it; the files of a refused submission are removed,
and the jobs submitted before it are recorded, so that a rerun collects them instead of submitting again.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

from training.grid.cells import Cell, CellFailed, CellStatus, asked_of_cells, cells_of, outcome, pretrained_of, run_cell
from training.grid.checks import AblationConfigError
from training.grid.config import AblationConfig
from training.grid.launcher import Launcher
from user_errors import UserError

JOBS = "jobs.json"
INSTALL = 'pip install -e ".[slurm]"'


def require_submitit() -> None:
    """--launcher slurm needs submitit: without it, one line with the command that installs it."""
    try:
        import submitit  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--launcher slurm needs submitit, which this Python cannot import ({exc}); install it with "
                        f"{INSTALL}, or train here with --launcher local") from None


class CellJob:
    """One cell as a SLURM job. On preemption or timeout submitit calls `checkpoint`, which requeues the
    same call; run_cell then resumes from the cell's last.ckpt."""

    def __call__(self, cfg: AblationConfig, cell: Cell, out: Path, pretrained: Path | None) -> CellStatus:
        result = run_cell(cfg, cell, out, pretrained)
        if result.failed:
            raise CellFailed(str(result))
        return result

    def checkpoint(self, *args: object) -> object:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args)


def executor(cfg: AblationConfig, out: Path, after: str | None = None):
    """A submitit executor whose jobs ask SLURM for what the grid's `slurm:` section says, and start only
    after job `after` has succeeded (they are cancelled if it fails)."""
    import submitit

    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:  # submitit itself would stop with a traceback; a grid with nothing to submit needs neither
        raise UserError(f"{' and '.join(missing)}: not installed here, so the grid's cells cannot be submitted; "
                        "run ablate.py --launcher slurm where SLURM's commands work, or use --launcher local")
    settings = cfg.slurm
    extra = dict(flag.lstrip("-").split("=", 1) for flag in settings.get("sbatch", []))
    if after is not None:
        extra |= {"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"}
    ex = submitit.AutoExecutor(folder=out / "slurm", cluster="slurm")
    ex.update_parameters(
        timeout_min=settings.get("time_min", 60), cpus_per_task=settings.get("cpus_per_cell", 1),
        gpus_per_node=settings.get("gpus_per_cell", 0), name=f"ablate-{cfg.name}",
        **({"mem_gb": settings["mem_gb"]} if "mem_gb" in settings else {}),
        **({"slurm_partition": settings["partition"]} if "partition" in settings else {}),
        **({"slurm_account": settings["account"]} if "account" in settings else {}),
        **({"slurm_additional_parameters": extra} if extra else {}))
    return ex


def held_jobs(timeout_s: float = 60) -> set[str]:
    """Ids of the jobs SLURM still holds, pending or running; one per element of a job array."""
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"squeue did not answer ({exc}); "
                        "run ablate.py --launcher slurm where SLURM's commands work") from None
    if result.returncode != 0:
        raise UserError(f"squeue failed: {result.stderr.strip()}; is the SLURM controller reachable from here?")
    return set(result.stdout.split())


def recorded_jobs(out: Path) -> dict[str, dict]:
    """jobs.json: each submitted cell's job id and what it was asked (asked_of), by cell name."""
    path = out / "slurm" / JOBS
    return json.loads(path.read_text()) if path.is_file() else {}


def queued_cells(out: Path) -> dict[str, str]:
    """The grid's cells whose SLURM jobs (submitted with --no-wait, or by a driver that was stopped) SLURM
    still holds and that are not DONE, by name: job id. Empty without a record, or where no SLURM answers."""
    recorded = recorded_jobs(out)
    if not recorded or shutil.which("squeue") is None:
        return {}
    try:
        held = held_jobs(timeout_s=15)
    except UserError:
        return {}
    return {name: job["id"] for name, job in recorded.items()
            if job["id"] in held and not (out / name / "DONE").is_file()}


def _unsubmitted(folder: Path) -> set[Path]:
    """What submitit leaves in its folder while a submission is under way: the call's pickle (a uuid's
    hex digits) and the sbatch script, both renamed after the job once sbatch accepts it."""
    return ({p for p in folder.glob("*.pkl") if re.fullmatch(r"[0-9a-f]{32}\.pkl", p.name)}
            | {p for p in folder.glob(".submission_file_*.sh") if not p.is_symlink()})


@contextlib.contextmanager
def sbatch_errors(folder: Path, what: str, submitted: int) -> typing.Iterator[None]:
    """A submission refused by sbatch as one line with sbatch's own message; the files of the refused
    submission are removed. submitit prints sbatch's message itself: it goes in the line."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    existed = folder.is_dir()
    before = _unsubmitted(folder) if existed else set()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        for path in _unsubmitted(folder) - before:
            path.unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # made for this submission alone, and empty again
        kept = (f"; the {submitted} job(s) submitted before it are recorded in {folder / JOBS} and a rerun "
                "collects them"
                if submitted else "")
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise UserError(f"sbatch refused {what}: {reason}; check the grid's slurm: section and that the SLURM "
                        f"controller answers (sinfo), then rerun{kept}") from None
    sys.stderr.write(printed.getvalue())  # accepted: whatever it said is not lost


def submit(cfg: AblationConfig, out: Path, status: dict[str, CellStatus], stop_after: int | None) -> dict[str, object]:
    """Submit every cell that is neither in status (given, DONE) nor still held by SLURM from an earlier
    call; at most stop_after new ones. Returns the job of every cell that SLURM holds now. The jobs
    are recorded in jobs.json also when a later submission fails."""
    import submitit

    recorded_path = out / "slurm" / JOBS
    recorded = recorded_jobs(out)
    held = held_jobs() if recorded else set()
    asked = asked_of_cells(cfg, out)
    jobs = {}
    for name, job in recorded.items():
        if job["id"] in held and name not in status:
            if job.get("asked") != asked.get(name):  # queued before the grid's settings changed
                raise AblationConfigError(f"{out}: cell {name} has SLURM job {job['id']} queued under other settings; "
                                          f"scancel {job['id']}, or give the grid a new name")
            jobs[name] = submitit.SlurmJob(out / "slurm", job["id"])
    budget = len(cells_of(cfg)) if stop_after is None else stop_after
    collected = len(jobs)

    def record() -> None:
        recorded_path.parent.mkdir(parents=True, exist_ok=True)
        recorded.update({name: {"id": job.job_id, "asked": asked[name]} for name, job in jobs.items()})
        recorded_path.write_text(json.dumps(recorded, indent=1))

    try:
        for size in cfg.sizes:
            pre, posts = Cell(size, "pretrain"), [c for c in cells_of(cfg) if c.size == size and c.method != "pretrain"]
            if pre.name not in status and pre.name not in jobs and budget > 0:
                with sbatch_errors(out / "slurm", f"the job of {pre.name}", len(jobs) - collected):
                    jobs[pre.name] = executor(cfg, out).submit(CellJob(), cfg, pre, out, None)
                budget -= 1
            todo = [c for c in posts if c.name not in status and c.name not in jobs][:budget]
            pretrained = pretrained_of(cfg, out, size)
            if not todo or (pre.name not in jobs and not pretrained.exists()):
                continue  # nothing to do, or its pretraining did not run (--stop-after): a rerun submits them
            ex = executor(cfg, out, after=jobs[pre.name].job_id if pre.name in jobs else None)
            with sbatch_errors(out / "slurm", f"the job array of {size}'s cells", len(jobs) - collected):
                with ex.batch():  # one job array
                    array = [ex.submit(CellJob(), cfg, cell, out, pretrained) for cell in todo]
            jobs.update({cell.name: job for cell, job in zip(todo, array)})
            budget -= len(todo)
    except BaseException:
        if len(jobs) > collected:  # the jobs submitted before a refusal: a rerun collects them, not submits them twice
            record()
        raise
    record()
    return jobs


def wait(jobs: dict[str, object], status: dict[str, CellStatus], poll_s: float = 2.0) -> None:
    """Wait for every job and put each cell's outcome into status. A job that leaves the queue without a
    result (cancelled, killed, out of memory, or its pretraining failed) is a failed cell with its log."""
    gone: set[str] = set()
    while jobs:
        held = held_jobs()
        for name, job in list(jobs.items()):
            if job.paths.result_pickle.exists():
                status[name] = outcome(job)
            elif job.job_id in held:
                continue
            elif name not in gone:  # absent once without a result: it may still be writing it
                gone.add(name)
                continue
            else:
                pretrain = f"{name.split('/')[0]}/pretrain"
                why = (f"its pretraining ({pretrain}) failed" if pretrain in status and status[pretrain].failed
                       else "cancelled, killed or out of memory")
                status[name] = CellStatus.failure(f"SLURM job {job.job_id} ended without a result ({why}; log: "
                                                  f"{job.paths.stderr})")
            del jobs[name]
        if jobs:
            time.sleep(poll_s)


class SlurmLauncher(Launcher):
    """Every cell a SLURM job: each size's pretraining one job, its cells one job array after it. With
    `wait` false the driver submits and returns (the grid stopped); a rerun collects the jobs."""

    def __init__(self, wait: bool = True) -> None:
        require_submitit()
        self.wait = wait

    def train(self, cfg: AblationConfig, out: Path, cells: list[Cell], known: dict[str, CellStatus],
              stop_after: int | None) -> tuple[dict[str, CellStatus], bool]:
        status = dict(known)
        jobs = submit(cfg, out, status, stop_after)
        if jobs:
            print("[ablate] SLURM jobs: " + ", ".join(f"{name} {job.job_id}" for name, job in jobs.items()), flush=True)
        if not self.wait:
            print(f"[ablate] {len(jobs)} cells queued; rerun the same command to wait for them and write the report",
                  flush=True)
            return {}, True
        wait(jobs, status)
        stopped = any(cell.name not in status for cell in cells)
        if stopped:
            print(f"[ablate] stopped after {len(jobs)} submitted cells (--stop-after); rerun to finish", flush=True)
        return {name: s for name, s in status.items() if name not in known}, stopped
