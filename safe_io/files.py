"""Files and directories written whole, the checks that keep them from replacing what the project did not
write (a marker in every directory it writes; a table's header for a file), CSV writers, and YAML settings
read with one clear error line. It imports nothing heavy, so a command can check its input before it loads
torch or Lightning."""
from __future__ import annotations

import csv
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

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


# The file the project writes into every directory it replaces whole (a report, an HF export): it marks the
# directory as the project's and lists every path written into it, so what anyone adds there later is seen.
MARKER = ".bayesian-icl-laws.json"
_WRITER = "bayesian-icl-laws"

# beside an HF export: the settings it was trained on, {data, run_info, step} (contracts/run_artifacts.py
# writes it); named here, below both, so that the ownership checks know an export by it
EXPORT_DATA_FILE = "ginc_data.json"

# Directories written before the marker existed are recognised by their content: every entry has a name that
# such an output has, and one of them is a table whose header is the project's or an export's ginc_data.json.
REPORT_ENTRIES = frozenset({
    "report.md", "plots", "fits.csv", "params.json", "shift.csv", "comparison.csv", "curves.csv", "fits", "shift",
    "reader_prior.csv", "reader_gap.csv", "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json", EXPORT_DATA_FILE,
})
_SIGNED_TABLES = {  # a table of an unmarked report -> columns its header always has
    "fits.csv": ("run", "k", "law", "split", "nrmse"),
    "shift.csv": ("run", "k", "task", "fit", "prior"),
    "comparison.csv": ("k", "fit", "n_params", "chi2", "aic", "bic"),
    "curves.csv": ("run", "k", "task", "shots", "prob", "nll", "acc", "count"),
}


def _refuse_link(out: Path, flag: str = "--out") -> None:
    """The one rule for symbolic links: an output path that is itself a link (to a file, a directory or
    nothing) is refused, never written through or replaced; links in the directories above it are followed."""
    if out.is_symlink():
        raise UserError(f"{flag} {out} is a symbolic link (to {os.readlink(out)}); outputs are replaced whole, "
                         "which would replace the link or write where it points: pass the real path")


def _check_apart(out: Path, inputs: Sequence[str | os.PathLike], what: str) -> None:
    """Refuse an output that is, lies inside, or holds one of the command's inputs (by real paths, so
    through links too)."""
    target = out.resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == target:
            raise UserError(f"--out {out} is the input {given}; write to another {what}")
        if path in target.parents:
            raise UserError(f"--out {out} lies inside the input {given}, which the output would change; "
                             f"write the {what} outside it")
        if target in path.parents:
            raise UserError(f"--out {out} holds the input {given}, and the {what} replaces it whole; "
                             f"write the {what} to another directory")


def _check_movable(out: Path) -> None:
    """A directory replaced whole is renamed: refuse one that cannot be, before any work."""
    real = out.resolve()
    if real.parent == real:
        raise UserError(f"--out {out} is the filesystem root; pass a new directory, like --out report")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out {out} is the current directory or holds it, which cannot be replaced whole; "
                         "pass a new directory inside it, like --out report")
    if real.is_dir() and os.path.ismount(real):
        raise UserError(f"--out {out} is a mount point, which cannot be replaced whole; pass a new directory "
                         f"inside it, like --out {out / 'report'}")


def table_header(path: Path) -> list[str] | None:
    """The column names on a CSV's first line (a byte-order mark and padding dropped), or None where the
    file is no text table."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
        line = head.split(b"\n", 1)[0].decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        names = next(csv.reader([line]), [])
    except csv.Error:
        return None
    return [name.strip() for name in names]


def holds_columns(path: Path, columns: Sequence[str]) -> bool:
    header = table_header(path)
    return header is not None and set(columns) <= set(header)


def _blank(path: Path) -> bool:
    """An empty file (or one of whitespace only): nothing in it to lose."""
    try:
        return path.stat().st_size <= 4096 and not path.read_bytes().strip()
    except OSError:  # unreadable: not known to be empty
        return False


def _written_paths(out: Path) -> frozenset[str] | None:
    """The paths the project recorded as written into `out`, or None where `out` carries no marker of it."""
    marker = out / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    paths = meta.get("paths") if isinstance(meta, dict) and meta.get("written_by") == _WRITER else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    return frozenset(paths)


def _legacy_output(out: Path, entries: Sequence[str]) -> bool:
    """A report or export the project wrote before it marked them: nothing but the names such outputs
    have, and a table with the project's header or an export's ginc_data.json among them."""
    if not set(entries) <= REPORT_ENTRIES:
        return False
    if any(name in entries and (out / name).is_file() and holds_columns(out / name, columns)
           for name, columns in _SIGNED_TABLES.items()):
        return True
    try:
        data = json.loads((out / EXPORT_DATA_FILE).read_text(encoding="utf-8")) if EXPORT_DATA_FILE in entries else None
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"data", "run_info"} <= set(data)


def _all_paths(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def mark_output(directory: str | os.PathLike) -> None:
    """Write the marker into a directory the project has just filled: it says the project wrote the
    directory, and lists every path in it, so a later write replaces it only while it holds nothing else."""
    directory = Path(directory)
    paths = [p for p in _all_paths(directory) if p != MARKER]
    (directory / MARKER).write_text(json.dumps({
        "written_by": _WRITER,
        "note": "written by this project's commands, which replace this directory whole on their next write "
                "while it holds nothing but these paths; anything added here keeps them from replacing it",
        "paths": paths}, indent=1) + "\n")


def _check_owned(out: Path, kind: str | None = None) -> None:
    """Refuse a directory that holds something the project did not write: without its marker (and not
    an unmarked output of an earlier version), or with paths the marker does not list; and, for a `kind`
    of output ("report"), one the project wrote as another kind (a model's HF export)."""
    if not out.is_dir():
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if kind == "report" and EXPORT_DATA_FILE in entries:
        raise UserError(f"--out {out} is a model's HF export ({EXPORT_DATA_FILE} is in it), which a report would "
                         "replace whole; write the report to another directory")
    written = _written_paths(out)
    if written is None:
        if _legacy_output(out, entries):
            return
        foreign = entries
        why = f"no {MARKER} says this project wrote it"
    else:
        foreign = [p for p in _all_paths(out) if p != MARKER and p not in written]
        why = f"its {MARKER} does not list it"
        if not foreign:
            return
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    raise UserError(f"--out {out} holds {foreign[0]!r}{more}, which this command did not write ({why}), and the "
                     "report replaces the directory whole; choose a new or empty directory, or move those out")


def check_replaceable(out: Path, inputs: Sequence[str | os.PathLike] = (), kind: str | None = None) -> None:
    """One `error:` line, before any work, when writing `out` whole would destroy what the project did
    not write there, or cannot be done: `out` is a symbolic link, a file, the filesystem root, a mount
    point, the current directory or one above it; it is, lies inside or holds one of the command's inputs;
    or it holds anything but an output the project wrote (its marker, `MARKER`, lists what), or, with
    `kind="report"`, a model's export rather than a report."""
    out = Path(out)
    _refuse_link(out)
    check_output_dir(out)
    _check_movable(out)
    _check_apart(out, inputs, "report")
    _check_owned(out, kind)


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


def check_output_file(out: Path, inputs: Sequence[str | os.PathLike] = (), columns: Sequence[str] = (),
                      what: str = "table") -> None:
    """One `error:` line, before any work, for a table output that cannot be written where it is asked: a
    symbolic link, a directory, a path under a file or in an unwritable directory; one of the command's
    inputs, or inside one; or an existing file other than an empty one or a `what` the project writes
    (its header holds `columns`), which replacing or appending to it would destroy."""
    out = Path(out)
    _refuse_link(out)
    if out.resolve().is_dir():
        raise UserError(f"--out {out} is a directory; pass a CSV file path")
    check_output_dir(out.resolve().parent)
    _check_apart(out, inputs, "file")
    check_table_file(out, columns, what)


def check_table_file(path: Path, columns: Sequence[str], what: str, flag: str = "--out") -> None:
    """Refuse to replace (or append to) an existing file that is not a `what` this project writes: a table
    whose header holds `columns`. An empty file holds nothing to lose. `flag` names the path in the message."""
    if not path.exists() or path.is_symlink():
        return
    named = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise UserError(f"{named} is not a regular file; pass a CSV file path")
    if _blank(path) or (columns and holds_columns(path, columns)):
        return
    lacks = f" (its first line lacks the columns {', '.join(columns)})" if columns else ""
    raise UserError(f"{named} is not a {what} this project writes{lacks}, and writing would replace it; "
                     "choose another file name")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file beside `path`; on success it replaces `path` in one rename, so a reader sees
    the old file or the new one. It carries this process's id: a failure removes it, and after a kill
    the next write of `path` does. Modes follow the umask. A symbolic link or a directory at `path` is
    refused, never replaced."""
    _refuse_link(path, "output")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; pass a file path")
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
def atomic_dir(out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), kind: str | None = None
               ) -> Iterator[Path]:
    """Check `out` (`check_replaceable`), then yield a fresh directory beside it; on success the marker is
    written into it (`mark_output`) and it replaces `out` as a whole, so a reader sees the old report or
    the new one, never a mix. Where the system can, the two are exchanged in one atomic step, so `out`
    exists at every moment; an interrupted write leaves only hidden leftovers named after its process,
    which the next write of `out` removes (restoring the old report if the interruption came between two
    renames). Anything added to `out` while the report was written stops the swap. A failure leaves `out`
    as it was. Modes follow the umask. `kind`: as `check_replaceable`'s."""
    check_replaceable(Path(out), inputs, kind)
    given, out = Path(out), Path(out).resolve()  # not a link (refused): its real path, with a name to rename
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
    old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
    try:
        yield tmp
        mark_output(tmp)
        _refuse_link(given)  # what the check saw may have changed while the report was written
        _check_owned(given, kind)
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


def read_yaml_mapping(path: Path, what: str, error: type[UserError]) -> dict:
    """A YAML file of settings as a dict; one `error` line (naming `what` the file is) when it is not."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory; a {what} is a YAML file (such as configs/tiny.yaml)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                    "check the path and its permissions") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; a {what} is a YAML file") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(cfg, dict):
        raise error(f"{what} {path} must be a mapping of settings, got {type(cfg).__name__}")
    return cfg
