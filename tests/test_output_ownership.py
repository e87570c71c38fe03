"""Nothing the project did not write is replaced by `evaluate.py`: a table output replaces (or `--append`s
to) only a table of the kind the command writes, recognised by its header; a report directory replaces
only a directory holding nothing but what the project's marker lists (or an unmarked report of an earlier
version, recognised by its tables); no output is, lies inside or holds an input, through links too; an
output path that is a symbolic link is refused; a directory that cannot be renamed is refused. Every
refusal comes before any work, is one `error:` line with exit status 2, and leaves every file as it was."""
import os
import shutil
from pathlib import Path

import pytest

import evaluate
from safe_io.files import MARKER, atomic_dir, check_replaceable
from tests.conftest import REPO, snapshot
from user_errors import UserError

CURVES = REPO / "examples" / "curves_ideal.csv"
WORLD = REPO / "configs" / "data" / "ginc.yaml"
DATASET = REPO / "examples" / "manyshot" / "pirate_persona.jsonl"


def forbid_work(monkeypatch) -> None:
    """Every measurement and fit the commands could start fails the test: refusals come before them."""
    import evaluation.ginc_curves as ginc_curves
    import evaluation.ladder as ladder
    import evaluation.llm_curves as llm_curves
    import evaluation.reader_gap as reader_gap
    import evaluation.reader_prior as reader_prior
    import evaluation.reports as reports

    def work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    for module, name in [(reports, "fit_groups"), (reports, "analyse_shift"), (ladder, "ladder_rows"),
                         (ginc_curves, "ideal_curve_rows"), (ginc_curves, "checkpoint_curve_rows"),
                         (llm_curves, "load_local_lm"), (reader_gap, "reader_gaps"),
                         (reader_prior, "fit_reader_prior")]:
        monkeypatch.setattr(module, name, work)


@pytest.fixture
def no_work(monkeypatch):
    forbid_work(monkeypatch)


def refused(capsys, argv: list[str], *watched: Path) -> str:
    """Run evaluate.py: exit status 2, one `error:` line last on stderr, no traceback, and everything under
    `watched` byte-identical. Returns the error line."""
    before = snapshot(*watched)
    assert evaluate.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    assert snapshot(*watched) == before
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with its HF export (an untrained tiny GPT-2 and its world's settings) at run/hf."""
    from tests.test_reader_gap import export
    from tests.test_reader_prior import prompts_of

    run = tmp_path_factory.mktemp("run")
    export(run, prompts_of("sampled", 0.0))
    return run


def ideal(out: Path, *extra: str) -> list:
    return ["curves", "--ideal", "--data-config", WORLD, "--prompts", "2", "--k", "3", "--device", "cpu", "--out", out,
            *extra]


# --- no output inside (or equal to, or holding) an input ---------------------------------------------------------

@pytest.mark.parametrize(("command", "target"), [
    ("reader-gap", "model.safetensors"), ("reader-prior", "model.safetensors"), ("curves", "config.json"),
    ("curves", "tokenizer.json"), ("curves", "new.csv"), ("reader-gap", "new.csv")])
def test_an_output_inside_an_input_directory_is_refused(tmp_path, capsys, no_work, run_dir, command, target):
    hf = run_dir / "hf"
    line = refused(capsys, [command, "--ckpt", hf, "--out", hf / target, "--device", "cpu"], run_dir, tmp_path)
    assert "lies inside the input" in line and not (hf / "new.csv").exists()


def test_an_output_reaching_an_input_through_a_link_is_refused(tmp_path, capsys, no_work, run_dir):
    """Outputs and inputs are compared by their real paths: a link above the output does not hide the input."""
    hf = run_dir / "hf"
    (tmp_path / "export").symlink_to(hf, target_is_directory=True)
    line = refused(capsys, ["reader-gap", "--ckpt", hf, "--out", tmp_path / "export" / "model.safetensors"],
                   run_dir, tmp_path)
    assert "lies inside the input" in line
    config = tmp_path / "world.yaml"
    shutil.copy(WORLD, config)
    (tmp_path / "configs").symlink_to(tmp_path, target_is_directory=True)
    line = refused(capsys, ideal(tmp_path / "configs" / "world.yaml", "--data-config", config), tmp_path)
    assert "is the input" in line
    (tmp_path / "data").mkdir()
    shutil.copy(CURVES, tmp_path / "data" / "c.csv")
    line = refused(capsys, ["fit", "--curves", tmp_path / "data" / "c.csv", "--out", tmp_path / "configs" / "data"],
                   tmp_path)
    assert "holds the input" in line


# --- a table replaces (or appends to) only a table of its kind ----------------------------------------------------

USER_FILES = {
    "notes.txt": b"my notes\nline two\n",
    "user.csv": b"a,b\n1,2\n",
    "run_only.csv": b"run,k,prob\nm,3,0.5\n",  # some of the curves table's columns, not all
    "gap.csv": b"run,k,learner,gap,gap_se,noise,signed,prompts\nm,3,reader,0.1,0.01,0.02,-0.1,4\n",
    "binary.bin": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("name", USER_FILES)
@pytest.mark.parametrize("append", [False, True])
def test_curves_never_replace_or_append_to_a_file_that_is_not_a_curves_table(tmp_path, capsys, no_work, name, append):
    out = tmp_path / name
    out.write_bytes(USER_FILES[name])
    line = refused(capsys, ideal(out, *(["--append"] if append else [])), tmp_path)
    assert "is not a curves table this project writes" in line


@pytest.mark.parametrize("command", ["reader-gap", "reader-prior"])
@pytest.mark.parametrize("name", ["notes.txt", "user.csv"])
def test_a_per_model_table_never_replaces_another_file(tmp_path, capsys, no_work, run_dir, command, name):
    out = tmp_path / name
    out.write_bytes(USER_FILES[name])
    shutil.copy(CURVES, tmp_path / "curves.csv")
    refused(capsys, [command, "--ckpt", run_dir / "hf", "--out", out], tmp_path, run_dir)
    line = refused(capsys, [command, "--ckpt", run_dir / "hf", "--out", tmp_path / "curves.csv"], tmp_path, run_dir)
    assert f"is not a {command} table this project writes" in line


def test_the_library_writer_refuses_a_file_that_is_not_a_curves_table(tmp_path):
    """The ablation grid and the training callback write through `write_curves` too."""
    from contracts.curves_table import read_rows, write_curves

    out = tmp_path / "notes.txt"
    out.write_bytes(USER_FILES["notes.txt"])
    for append in (False, True):
        with pytest.raises(UserError, match="is not a curves table this project writes"):
            write_curves(read_rows(CURVES)[:4], out, append=append)
    assert out.read_bytes() == USER_FILES["notes.txt"]


def test_the_project_replaces_and_appends_to_its_own_tables(tmp_path, capsys, run_dir):
    out = tmp_path / "c.csv"
    out.write_bytes(b"")  # an empty file holds nothing to lose
    assert evaluate.main([str(a) for a in ideal(out)]) == 0
    first = out.read_bytes()
    assert evaluate.main([str(a) for a in ideal(out, "--append", "--run", "other")]) == 0
    assert out.read_bytes().startswith(first.split(b"\n", 1)[0]) and len(out.read_bytes()) > len(first)
    assert evaluate.main([str(a) for a in ideal(out)]) == 0  # replaced by a table of the same kind
    gap = tmp_path / "gap.csv"
    gap.write_bytes(USER_FILES["gap.csv"])  # a reader-gap table (before the `learner` column, older ones lacked it)
    argv = ["reader-gap", "--ckpt", run_dir / "hf", "--out", gap, "--prompts", "2", "--device", "cpu"]
    assert evaluate.main([str(a) for a in argv]) == 0
    assert gap.read_bytes() != USER_FILES["gap.csv"] and b"m/pretrain" in gap.read_bytes()
    capsys.readouterr()


# --- a report directory replaces only a report the project wrote ---------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A few curves of the shipped table (k = 3, up to 40 shots), to fit in a moment."""
    from contracts.curves_table import read_rows, write_curves

    path = tmp_path_factory.mktemp("curves") / "small.csv"
    return write_curves([r for r in read_rows(CURVES) if r["k"] == 3 and r["shots"] <= 40], path)


def report_commands(out: Path, curves: Path = CURVES) -> dict[str, list]:
    return {"fit": ["fit", "--curves", curves, "--out", out, "--laws", "power"],
            "shift": ["shift", "--curves", curves, "--out", out, "--baseline", "ideal"],
            "ladder": ["ladder", "--data-config", WORLD, "--out", out, "--device", "cpu"]}


def users_report_md(out: Path, curves: Path) -> None:
    out.mkdir()
    (out / "report.md").write_text("# my own report\n")


def users_fits_csv(out: Path, curves: Path) -> None:
    out.mkdir()
    (out / "fits.csv").write_text("name,score\nmine,1\n")
    (out / "report.md").write_text("# mine\n")


def project_report_and_a_users_file(out: Path, curves: Path) -> None:
    assert evaluate.main([str(a) for a in report_commands(out, curves)["fit"]]) == 0
    (out / "notes.md").write_text("what I found\n")


def project_report_and_a_users_plot(out: Path, curves: Path) -> None:
    assert evaluate.main([str(a) for a in report_commands(out, curves)["fit"]]) == 0
    (out / "plots" / "my_figure.png").write_bytes(b"\x89PNG mine")


def a_models_export(out: Path, curves: Path | None = None) -> None:
    from tests.test_reader_gap import export
    from tests.test_reader_prior import prompts_of

    export(out.parent, prompts_of("sampled", 0.0)).rename(out)


@pytest.mark.parametrize("command", ["fit", "shift", "ladder"])
@pytest.mark.parametrize("make", [users_report_md, users_fits_csv, a_models_export,
                                  # these two write a whole report
                                  pytest.param(project_report_and_a_users_file, marks=pytest.mark.slow),
                                  pytest.param(project_report_and_a_users_plot, marks=pytest.mark.slow)])
def test_a_report_replaces_only_a_directory_the_project_wrote(tmp_path, capsys, monkeypatch, small, command, make):
    out = tmp_path / "out"
    make(out, small)
    capsys.readouterr()
    forbid_work(monkeypatch)
    line = refused(capsys, report_commands(out)[command], tmp_path)
    assert "did not write" in line or "HF export" in line


SHIPPED = sorted({p.parent for name in ("fits.csv", "shift.csv") for p in (REPO / "examples").rglob(name)}
                 | {p.parent for p in (REPO / "examples").glob("*/curves.csv") if (p.parent / "fits").is_dir()
                    and (p.parent / "shift" / "shift.csv").is_file()})


def unmarked_copy(report: Path, to: Path) -> Path:
    """A report as an earlier version left it: without the marker (and without its plots, to copy fast)."""
    return Path(shutil.copytree(report, to, ignore=shutil.ignore_patterns(MARKER, "*.png")))


@pytest.mark.slow
def test_shipped_reports_and_those_of_earlier_versions_stay_replaceable(tmp_path, capsys, small):
    """Directories written before the marker existed (examples/, older runs) are recognised by their tables:
    each shipped report passes the check without a marker, and a rerun of its command replaces it and marks it."""
    assert len(SHIPPED) >= 15, SHIPPED
    for i, report in enumerate(SHIPPED):
        check_replaceable(unmarked_copy(report, tmp_path / "shipped" / str(i)), kind="report")
    out = unmarked_copy(REPO / "examples" / "cpu-gradual" / "fits", tmp_path / "fits")
    assert evaluate.main([str(a) for a in report_commands(out, small)["fit"]]) == 0
    assert (out / MARKER).is_file() and "power" in (out / "fits.csv").read_text()
    assert evaluate.main([str(a) for a in report_commands(out, small)["fit"]]) == 0  # and again, marked now
    capsys.readouterr()


def test_an_unmarked_export_of_an_earlier_version_stays_replaceable_by_an_export(tmp_path):
    out = tmp_path / "hf"
    a_models_export(out)
    (out / MARKER).unlink()
    check_replaceable(out)  # what the training's export checks
    with pytest.raises(UserError, match="HF export"):
        check_replaceable(out, kind="report")


def test_what_is_added_while_a_report_is_written_stops_the_swap(tmp_path):
    out = tmp_path / "report"
    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text("old")
    with pytest.raises(UserError, match="'mine.txt'"):
        with atomic_dir(out) as tmp:
            (tmp / "report.md").write_text("new")
            (out / "mine.txt").write_text("added meanwhile")
    assert (out / "report.md").read_text() == "old" and (out / "mine.txt").read_text() == "added meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# --- symbolic links: an output path that is a link is refused --------------------------------------------------------

@pytest.mark.parametrize("command", ["fit", "shift", "ladder"])
@pytest.mark.parametrize("target", ["empty", "report", "nowhere"])
def test_a_report_out_that_is_a_symbolic_link_is_refused(tmp_path, capsys, no_work, command, target):
    (tmp_path / "empty").mkdir()
    if target == "report":
        with atomic_dir(tmp_path / "report") as tmp:
            (tmp / "report.md").write_text("the project's")
    link = tmp_path / "LINK"
    link.symlink_to(tmp_path / target)
    line = refused(capsys, report_commands(link)[command], tmp_path)
    assert "is a symbolic link" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"LINK", "empty", target} - {"nowhere"})


@pytest.mark.parametrize("target", ["notes.txt", "curves.csv", "nowhere.csv"])
@pytest.mark.parametrize("append", [False, True])
def test_a_table_out_that_is_a_symbolic_link_is_refused(tmp_path, capsys, no_work, run_dir, target, append):
    (tmp_path / "notes.txt").write_bytes(USER_FILES["notes.txt"])
    shutil.copy(CURVES, tmp_path / "curves.csv")
    link = tmp_path / "LINK.csv"
    link.symlink_to(tmp_path / target)
    assert "is a symbolic link" in refused(capsys, ideal(link, *(["--append"] if append else [])), tmp_path)
    if not append:
        assert "is a symbolic link" in refused(capsys, ["reader-gap", "--ckpt", run_dir / "hf", "--out", link],
                                               tmp_path)


def test_the_library_writers_refuse_a_link(tmp_path):
    from safe_io.files import write_rows

    (tmp_path / "notes.txt").write_bytes(USER_FILES["notes.txt"])
    (tmp_path / "LINK.csv").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="is a symbolic link"):
        write_rows([{"run": "m"}], tmp_path / "LINK.csv")
    assert (tmp_path / "LINK.csv").is_symlink() and (tmp_path / "notes.txt").read_bytes() == USER_FILES["notes.txt"]


# --- directories that cannot be renamed -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["fit", "shift", "ladder"])
@pytest.mark.parametrize("where", [".", "..", "here", "/"])
def test_a_report_out_that_cannot_be_renamed_is_refused_before_any_work(tmp_path, capsys, monkeypatch, no_work,
                                                                         command, where):
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = {"here": cwd}.get(where, Path(where))
    line = refused(capsys, report_commands(out)[command], tmp_path)
    assert ("filesystem root" if where == "/" else "is the current directory or holds it") in line
    assert not list(cwd.iterdir())


def test_a_mount_point_is_refused_before_any_work(tmp_path, capsys, monkeypatch, no_work):
    import safe_io.files as output

    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(output.os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    line = refused(capsys, report_commands(mount)["fit"], tmp_path)
    assert "is a mount point" in line


# --- the other inputs the tester found --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "1"])
def test_ladder_strengths_that_are_not_finite_and_above_1_name_the_flag(tmp_path, capsys, no_work, value):
    out = tmp_path / "ladder"
    line = refused(capsys, ["ladder", "--data-config", WORLD, "--out", out, "--strengths", "2", value], tmp_path)
    assert line.startswith("error: --strengths [2.0, ") and "must all be finite and above 1" in line
    assert not out.exists()


def test_curves_of_a_ginc_export_as_an_hf_model_are_refused_and_point_to_ckpt(tmp_path, capsys, no_work, run_dir):
    out = tmp_path / "llm.csv"
    line = refused(capsys, ["curves", "--hf-model", run_dir / "hf", "--dataset", DATASET, "--out", out],
                   tmp_path, run_dir)
    assert f"--ckpt {run_dir / 'hf'}" in line and not out.exists()
