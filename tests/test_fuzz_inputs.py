"""Random input thrown at the ablation YAML loader, the curves-table reader and every count flag of
evaluate.py: each time either success or a refusal as promised (one `error:` line, exit 2, no traceback,
and nothing on disk changed)."""
import csv
import hashlib
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
from contracts.curves_table import CURVE_COLUMNS, read_curves
from evaluation.arguments import WholeNumber, command_parser, parse
from evaluation.cli import COMMANDS
from tests.conftest import REPO
from training.grid import AblationConfig
from user_errors import UserError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BASE = REPO / "configs" / "ablations" / "tiny-base.yaml"

# values of every kind a hand-written YAML or CSV can hold
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


def _tree(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(top.rglob("*"))}


def _valid_grid(root: Path) -> dict:
    return {"name": "t", "root": str(root), "sizes": ["gpt2-1l"], "base_configs": [str(BASE)], "pretrain_steps": 4,
            "methods": ["sft"], "directions": ["favor"], "tasks": [0], "amounts": [0, 16], "batch_size": 16,
            "evals_per_cell": 1, "laws": ["power"], "shift_resamples": 4, "reader_prompts": 4, "gap_prompts": 4}


FIELDS = [*_valid_grid(Path("r")), "slurm", "overrides", "posttrain_overrides", "method_overrides", "pretrained",
          "no_such_setting"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
@pytest.mark.slow
def test_any_ablation_yaml_is_loaded_or_refused_without_a_trace(tmp_path_factory, changes):
    top = tmp_path_factory.mktemp("grid")
    path = top / "grid.yaml"
    path.write_text(yaml.safe_dump({**_valid_grid(top / "root"), **changes}))
    before = _tree(top)
    try:
        AblationConfig.load(path)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    assert _tree(top) == before, "loading a grid created, changed or deleted something"


CELLS = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.sampled_from(["", "nan", "inf", "-0", "1e400", "0x10", " 3", "1_000", "m/pretrain", "\ufeff1"]),
                  st.text(max_size=6))


@FUZZ
@given(header=st.lists(st.sampled_from([*CURVE_COLUMNS, "method", "amount", "extra"]), min_size=1, max_size=10),
       rows=st.lists(st.lists(CELLS, min_size=1, max_size=10), max_size=6))
def test_any_curves_table_is_read_or_refused_without_a_trace(tmp_path_factory, header, rows):
    path = tmp_path_factory.mktemp("table") / "curves.csv"
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(text.getvalue())
    try:
        groups = read_curves(path)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    else:
        assert all(g.prob.shape == g.nll.shape for g in groups)


# a command line of each sub-command that parses, to which one count flag is added
PARSES = {"curves": ["--ideal", "--out", "o.csv"], "fit": ["--curves", "c.csv", "--out", "o"],
          "shift": ["--curves", "c.csv", "--baseline", "b", "--out", "o"],
          "ladder": ["--data-config", "d.yaml", "--out", "o"], "reader-prior": ["--ckpt", "m", "--out", "o.csv"],
          "reader-gap": ["--ckpt", "m", "--out", "o.csv"]}
SUBCOMMANDS = {fn.__name__.replace("_", "-"): command_parser(fn, f"evaluate.py {fn.__name__}") for fn in COMMANDS}
COUNT_FLAGS = [(name, action.option_strings[0], action.type) for name, parser in SUBCOMMANDS.items()
               for action in parser._actions if isinstance(action.type, WholeNumber)]


def test_every_subcommand_and_count_flag_is_fuzzed():
    assert set(PARSES) == set(SUBCOMMANDS) and len(COUNT_FLAGS) >= 25


@pytest.mark.parametrize("command, flag, kind", COUNT_FLAGS, ids=[f"{c} {f}" for c, f, _ in COUNT_FLAGS])
@settings(max_examples=25, deadline=None)
@given(value=st.one_of(st.integers(-10**25, 10**25).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.sampled_from(["", "0", "1", "-1", "2147483647", "2147483648", "1e3", "٣", " 4", "+5"]),
                       st.text(max_size=5)))
def test_every_count_flag_takes_a_sane_whole_number_or_refuses_in_one_line(command, flag, kind, value):
    try:
        args = parse(SUBCOMMANDS[command], [*PARSES[command], f"{flag}={value}"], f"evaluate.py {command}")
    except UserError as exc:
        lines = str(exc).strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], str(exc)
        return
    got = args[flag.lstrip("-").replace("-", "_")]
    for number in got if isinstance(got, list) else [got]:
        assert isinstance(number, int) and kind.least <= number <= 2**31 - 1, (value, got)


def test_a_refused_count_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fits"
    assert evaluate.main(["fit", "--curves", str(tmp_path / "c.csv"), "--out", str(out), "--starts", "1e99"]) == 2
    assert not out.exists() and capsys.readouterr().err.startswith("error: ")
