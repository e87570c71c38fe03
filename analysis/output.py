"""Atomic output directories and small writers shared by the fit and shift reports."""
from __future__ import annotations

import csv
import ctypes
import errno
import glob
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from user_errors import UserError


def umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out: Path, flag: str = "--out") -> None:
    """One `error:` line for an output directory that cannot be written, before any work starts."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a directory path (it is created if missing)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out} lies under {existing}, which is a file; choose another path")
    writable = existing if existing != out else out.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {writable} is not writable; choose a directory you can write to")


def inside(root: str | os.PathLike, name: str, what: str, root_what: str) -> Path:
    """root / name, refused with one line unless it lies strictly inside root (a name like ../x or an
    absolute path would write elsewhere) and root can be a directory we write in."""
    path = Path(root) / name
    base = Path(root).resolve()
    if not name or Path(name).is_absolute() or base not in path.resolve().parents:
        raise UserError(f"{what} {name!r} would write outside {root}; give a name inside it, like my-run or grid/run-1")
    check_output_dir(Path(root), root_what)  # a root that is a file, or lies under one
    return path


# What the project writes in a directory it replaces whole: the fit, shift and ladder reports, the
# ablation tables, and an HF export. A directory holding anything else is not the project's to replace.
REPORT_ENTRIES = frozenset({
    "report.md", "plots", "fits.csv", "params.json", "shift.csv", "comparison.csv", "curves.csv", "fits", "shift",
    "reader_prior.csv", "reader_gap.csv", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json", "ginc_data.json",
})


def check_replaceable(out: Path, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """One `error:` line, before any work, when writing `out` whole would destroy what the project did
    not write there: `out` holds other entries, or it is (or holds) one of the command's inputs."""
    check_output_dir(out)
    target = out.resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == target or target in path.parents:
            raise UserError(f"--out {out} holds the input {given}, and the report replaces it whole; "
                             "write the report to another directory")
    if out.is_dir():
        foreign = sorted(e for e in os.listdir(out) if e not in REPORT_ENTRIES)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise UserError(f"--out {out} holds {foreign[0]!r}{more}, which this command did not write, and the "
                             "report replaces the directory whole; choose a new or empty directory")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a filesystem or kernel without the flag
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Leftovers of interrupted writes of `out` (their process is gone): put a report moved aside back
    if `out` is missing, then remove every partial or replaced report. Live writers' are left alone."""
    stale = []
    for entry in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, rest = entry.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            stale.append((kind, entry))
    for kind, entry in sorted(stale, key=lambda e: e[0] != "old"):
        if kind == "old" and not out.exists():
            os.replace(entry, out)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_output_file(out: Path, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """One `error:` line, before any work, for a file output that cannot be written where it is asked:
    a directory, a path under a file or in an unwritable directory, or one of the command's inputs."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; pass a CSV file path")
    check_output_dir(out.resolve().parent)
    for given in inputs:
        if Path(given).resolve() == out.resolve():
            raise UserError(f"--out {out} is the input {given}; write to another file")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file beside `path`; on success it replaces `path` in one rename, so a reader sees
    the old file or the new one. It carries this process's id: a failure removes it, and after a kill
    the next write of `path` does. Modes follow the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Check `out` (`check_replaceable`), then yield a fresh directory beside it; on success that
    directory replaces `out` as a whole, so a reader sees the old report or the new one, never a mix.
    Where the system can, the two are exchanged in one atomic step, so `out` exists at every moment; an
    interrupted write leaves only hidden leftovers named after its process, which the next write of
    `out` removes (restoring the old report if the interruption came between two renames). A failure
    leaves `out` as it was. Modes follow the umask."""
    out = Path(out)
    check_replaceable(out, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old report
        else:
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # interrupted between the two renames: the old report goes back
        shutil.rmtree(old, ignore_errors=True)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_rows(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Rows as a CSV (the union of their keys as columns, in first-seen order), swapped in whole."""
    path = Path(path)
    with atomic_file(path) as tmp:
        write_csv(tmp, list(dict.fromkeys(key for row in rows for key in row)), rows)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def file_names(labels: Sequence[str]) -> dict[str, str]:
    """A file name for each distinct label: its safe_name, plus a hash of the label where two labels
    would share one (a/b and a_b), whatever order they come in."""
    safe = {label: safe_name(label) for label in dict.fromkeys(labels)}
    shared = {name for name in safe.values() if list(safe.values()).count(name) > 1}
    return {label: f"{name}-{hashlib.sha1(label.encode()).hexdigest()[:6]}" if name in shared else name
            for label, name in safe.items()}


def shots_grid(max_shots: float, points: int = 300) -> np.ndarray:
    """Shots at which to draw a law: dense near 0 (where curves turn fastest), log-spaced beyond."""
    near = np.linspace(0.0, min(2.0, max_shots), 60)
    far = np.geomspace(min(2.0, max_shots) or 1.0, max(max_shots, 1.0), points)
    return np.unique(np.concatenate([near, far]))
