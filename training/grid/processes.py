"""The processes of an ablation grid: one driver per grid directory, and workers that never outlive it.

- `grid_lock(out)`: the driver (`ablate.py`, local or the one that submits SLURM jobs and waits for
  them) holds an exclusive `flock` on `out/.ablate.lock` for its whole life. The kernel releases it
  when the driver ends in any way, kill -9 included, so no lock is ever left stale; a second driver of
  the same grid is refused with one line naming the holder (PID, host, start time: the lock file's
  content). SLURM jobs of a grid train their cells without it.
- `die_with_parent()`: called at the start of every worker process. On Linux the kernel sends the
  worker SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), kill -9 of the driver included, and
  every process the worker forks (a DataLoader's workers) gets the same tie to the worker; elsewhere a
  watcher thread polls the parent's PID. Ctrl-C at the terminal ends the worker quietly: the driver
  says the one line.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import typing
from pathlib import Path

from user_errors import UserError

LOCK_FILE = ".ablate.lock"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class GridInUse(UserError):
    """Another driver holds the grid's lock."""


def _holder(text: str) -> str:
    """Who holds a lock, from its file's content: 'PID 123 on host, started 2024-05-01 12:00:00'."""
    try:
        info = json.loads(text)
        return f"PID {int(info['pid'])} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has just started and not yet said who it is"


def _open_locked(path: Path) -> int:
    """A descriptor of `path` holding its exclusive lock, or GridInUse. The file may be removed by a
    driver that is releasing it between our open and our lock; then we locked a file no other driver
    will find, so we check that the path still names the locked file, and start again if not."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the directory was just removed by a driver that released it empty
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise GridInUse(f"grid {path.parent} is in use by another ablate.py ({holder}); wait for it to finish, "
                            "or stop it, then rerun (two drivers would train the same cells into the same "
                            "directories)") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file kept being replaced")


@contextlib.contextmanager
def grid_lock(out: Path) -> typing.Iterator[None]:
    """Hold the grid `out`'s lock for the duration; GridInUse when another driver holds it. Directories
    it had to create are removed again when they are left empty (a run refused for bad input writes
    nothing), and so is the lock file when the driver ends normally."""
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path)
    except GridInUse:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            # a file system without flock (some Lustre, NFS mounts): run, but say that nothing guards the grid
            print(f"[ablate] warning: cannot lock {path} ({exc.strerror}); make sure no other ablate.py runs this grid",
                  flush=True)
            fd = None
        else:
            _remove_empty(created)
            raise UserError(f"cannot create {path} ({exc.strerror}); give the grid a root you can write to") from None
    if fd is not None:
        started = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still holding it: a driver that opens it meanwhile is refused, then finds none
            os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories grid_lock created (deepest first), as far as they are empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send this process `sig` when the thread that started it ends; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Where there is no PR_SET_PDEATHSIG: end this process once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _quiet_exit(signum: int, frame: object) -> None:
    os._exit(128 + signum)


_fork_state: dict[str, object] = {}


def _before_fork() -> None:
    _fork_state["pid"] = os.getpid()
    _fork_state["main"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # PR_SET_PDEATHSIG follows the thread that forked: only a fork from the main thread, which lives as
    # long as the process, is tied to it (a DataLoader forks its workers there)
    if _fork_state.get("main") and _set_pdeathsig(signal.SIGKILL) and os.getppid() != _fork_state["pid"]:
        os._exit(1)  # the parent died before the tie was made


def children_die_with_me() -> None:
    """Every process this one forks from its main thread from now on (a DataLoader's workers) is killed
    when this one dies, kill -9 included (Linux). Once per process."""
    if not _fork_state.get("registered"):
        _fork_state["registered"] = True
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def die_with_parent(parent: int | None = None) -> None:
    """Tie this process (a worker) to its parent `parent` (default: the current one): it is killed when the
    parent dies, kill -9 included, and so is every process it forks; Ctrl-C at the terminal ends it at once
    without a traceback (its driver reports the interruption and ends the other workers)."""
    parent = os.getppid() if parent is None else parent
    if not _set_pdeathsig(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent,), name="die-with-parent", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the tie was made
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _quiet_exit)
    children_die_with_me()


def stop_processes(processes: typing.Iterable[object]) -> None:
    """Kill worker processes (multiprocessing.Process) now and reap them; what they forked dies with them."""
    processes = [p for p in processes if p.is_alive()]
    for process in processes:
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    for process in processes:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            process.join(5)
