"""A grid is checked whole before it trains, and stale work is never reused.

Every refused grid: exit status 2, one last stderr line `error: ...`, no traceback, and nothing created,
changed or deleted on disk (the whole temporary tree is compared byte for byte)."""
import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

import ablate
from tests.conftest import REPO
from training.grid import AblationConfig

BASE = REPO / "configs" / "ablations" / "tiny-base.yaml"
SMALL = ["--data.context_length", "32", "--model.n_positions", "32",
         "--data.icl", "{k_values: [3], prompts_per_task: 8, batch_size: 8}", "--data.world.property_smoothing", "0.5"]


def _grid(tmp_path: Path, **extra) -> Path:
    cfg = {"name": "t", "root": str(tmp_path / "root"), "sizes": ["gpt2-1l"], "base_configs": [str(BASE)],
           "pretrain_steps": 4, "overrides": SMALL, "methods": ["sft"], "directions": ["favor"], "tasks": [0],
           "amounts": [0, 16], "batch_size": 16, "evals_per_cell": 1, "fit_fraction": 0.5, "laws": ["power"],
           "shift_resamples": 4, "reader_prompts": 4, "gap_prompts": 4, **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tree(top: Path) -> dict[str, str]:
    """Every path under top, with its content's hash (directories: '')."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(top.rglob("*"))}


def _refused(tmp_path: Path, capsys, argv: list[str]) -> str:
    """Run ablate.py on argv, assert the grid was refused as promised, and return its error line."""
    before = _tree(tmp_path)
    capsys.readouterr()
    assert ablate.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert _tree(tmp_path) == before, "a refused grid created, changed or deleted something"
    return lines[-1]


def test_a_size_that_is_a_path_is_refused_and_nothing_outside_is_touched(tmp_path, capsys):
    """sizes: ["../esc"] used to train into ROOT/esc/pretrain, outside the grid, and a rerun rmtree'd it."""
    mine = tmp_path / "root" / "esc" / "pretrain" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file\n")
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path, sizes=["../esc"]))])
    assert "unknown model size '../esc'" in line and "gpt2-1l" in line
    assert mine.read_text() == "a user's file\n"


@pytest.mark.parametrize("extra, message", [
    ({"sizes": ["gpt2-99l"]}, "unknown model size 'gpt2-99l' in sizes; choose from gpt2-1l"),
    ({"sizes": ["gpt2 1l"]}, "unknown model size 'gpt2 1l'"),
    ({"sizes": []}, "sizes is empty, so the grid has no cells; list at least a model size"),
    ({"methods": []}, "methods is empty"),
    ({"directions": []}, "directions is empty"),
    ({"amounts": []}, "amounts is empty"),
    ({"amounts": [0]}, "has no amount > 0"),
    ({"tasks": [7]}, "tasks [7]: [7] not in the world gpt2-1l is pretrained on, which has 3 tasks (0..2)"),
    ({"overrides": [*SMALL, "--data.world.n_tasks", "2"], "tasks": [0, 2]},
     "tasks [0, 2]: [2] not in the world gpt2-1l is pretrained on, which has 2 tasks"),
    ({"slurm": {"gpus_per_cell": -1}}, "slurm.gpus_per_cell must be >= 0, got -1"),
    ({"slurm": {"mem_gb": -5}}, "slurm.mem_gb must be >= 1, got -5"),
    ({"slurm": {"sbatch": ["--qos"]}}, "slurm.sbatch flag '--qos' is not of the form --name=value"),
    ({"base_configs": [str(BASE.parent)]}, "is a directory; list train.py config files"),
])
def test_a_bad_setting_is_refused_before_anything_is_made(tmp_path, capsys, extra, message):
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path, **extra))])
    assert message in line, line
    assert "train.log" not in line  # no pointer at logs of cells that never ran


@pytest.mark.parametrize("extra, message", [
    ({"pretrain_overrides": ["--model.optim.lrr", "1e-3"]},
     "cell gpt2-1l/pretrain: train.py refuses its flags: model.optim: Option 'lrr' is not accepted (fix base_configs, "
     "overrides or pretrain_overrides)"),
    ({"posttrain_overrides": ["--model.optim.lr", "abc"]}, "cell gpt2-1l/sft-favor-16: train.py refuses its flags: "
     "model.optim.lr: Expected a <class 'float'>. Got value: abc"),
    ({"methods": ["sft", "dpo"], "method_overrides": {"dpo": ["--model.betaa", "0.1"]}},
     "cell gpt2-1l/dpo-favor-16: train.py refuses its flags: model: Option 'betaa' is not accepted (fix base_configs, "
     "overrides or posttrain_overrides, method_overrides.dpo)"),
    ({"overrides": [*SMALL, "--trainer.max_epochss", "3"]}, "unrecognized arguments: --trainer.max_epochss 3"),
    ({"overrides": [*SMALL, "--data.world.n_tasks", "0"]},
     "cell gpt2-1l/pretrain: data.world.n_tasks must be >= 1, got 0"),
    ({"overrides": [*SMALL, "--data.world.start_temperature", "nan"]},
     "cell gpt2-1l/pretrain: data.world.start_temperature"),
    ({"overrides": [*SMALL, "--run.root", "elsewhere"]}, "set run.root to 'elsewhere', which the grid sets itself"),
    ({"posttrain_overrides": ["--run.tasks", "[1]"]},
     "set run.tasks to [1], which the grid sets itself ([0], from tasks)"),
    ({"posttrain_overrides": ["--data.train_weights", "[1, 0, 0]"]}, "give either run.direction with run.tasks or "
     "data.train_weights, not both"),
])
def test_every_override_is_parsed_before_anything_trains(tmp_path, capsys, extra, message):
    """Overrides go through train.py's own parser for every cell before the first one trains: a typo in
    posttrain_overrides no longer fails every post-training cell after the pretraining has finished."""
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path, **extra))])
    assert message in line, line


def test_a_config_that_is_a_directory_is_named_so(tmp_path, capsys):
    line = _refused(tmp_path, capsys, ["--config", str(tmp_path)])
    assert "is a directory; pass a grid YAML" in line


def test_a_broken_pretrained_checkpoint_is_refused_with_its_whole_reason(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint " * 50)
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path, pretrained={"gpt2-1l": str(garbage)}))])
    assert line.endswith("is not a checkpoint train.py wrote (it is not a file torch.save writes); pass a run's "
                         "checkpoints/last.ckpt or its hf/ directory"), line


def _export(run_dir: Path, vocab_size: int, n_embd: int, n_entities: int = 5) -> Path:
    """An HF export as train.py writes it, of an untrained 1-layer model on tiny-base.yaml's world but for
    vocab_size and n_entities."""
    from dataclasses import asdict

    from contracts.run_artifacts import RunInfo, write_export
    from datamodules.world import WorldConfig
    from models.gpt import build_gpt, resolve_spec

    world = WorldConfig(n_tasks=3, n_entities=n_entities, n_properties=5, vocab_size=vocab_size,
                        distinct_emissions=True, property_temperature=0.01, property_smoothing=0.5)
    gpt = build_gpt(resolve_spec("gpt2-1l", n_embd=n_embd, n_head=4, n_positions=32), vocab_size + 2,
                    bos_id=vocab_size + 1, pad_id=vocab_size)
    info = RunInfo(run="given/pretrain", stage="pretrain", method="", direction="", amount="", layers=1, target="")
    return write_export(run_dir, gpt, {"world": asdict(world), "context_length": 32}, info, step=0)


def test_a_pretrained_model_of_another_world_is_refused(tmp_path, capsys):
    """The given model's recorded world and architecture against what the grid's base configs give its size."""
    other = _export(tmp_path / "other", vocab_size=20, n_embd=32, n_entities=4)
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path, pretrained={"gpt2-1l": str(other)}))])
    assert (f"pretrained checkpoint {other} for gpt2-1l is another model than the grid's base configs give gpt2-1l"
            in line)
    assert "world.vocab_size 20 (grid: 30)" in line and "n_embd 32 (grid: 64)" in line
    same = _export(tmp_path / "same", vocab_size=30, n_embd=64)
    assert AblationConfig.load(_grid(tmp_path, pretrained={"gpt2-1l": str(same)})).pretrained == {"gpt2-1l": str(same)}


def test_a_directory_ablate_did_not_make_is_neither_deleted_nor_reused(tmp_path, capsys):
    mine = tmp_path / "root" / "t" / "gpt2-1l" / "pretrain" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("kept\n")
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path))])
    assert "holds no record of ablate.py's (ASKED)" in line and "move it away" in line
    assert mine.read_text() == "kept\n"


def test_a_file_in_the_way_of_a_cell_is_refused(tmp_path, capsys):
    blocking = tmp_path / "root" / "t" / "gpt2-1l"
    blocking.parent.mkdir(parents=True)
    blocking.write_text("a file\n")
    line = _refused(tmp_path, capsys, ["--config", str(_grid(tmp_path))])
    assert f"{blocking} is a file where cell gpt2-1l/pretrain trains; move it away" in line


@pytest.mark.slow
def test_finished_cells_are_stale_once_a_base_config_changes(tmp_path, capsys):
    """The DONE record holds the content of every config a cell's flags name and the model it started from:
    editing the base config in place makes the finished cells stale, and so does removing the pretraining
    (its post-training cells were trained from a model that is gone)."""
    base = tmp_path / "base.yaml"
    shutil.copy(BASE, base)
    config = _grid(tmp_path, base_configs=[str(base)])
    assert ablate.main(["--config", str(config), "--stop-after", "2"]) == 0  # the pretraining and the one cell
    out = tmp_path / "root" / "t" / "gpt2-1l"
    assert (out / "pretrain" / "DONE").is_file() and (out / "sft-favor-16" / "DONE").is_file()
    original = base.read_text()
    for change in (("n_tasks: 3", "n_tasks: 4"), ("seed: 0", "seed: 5")):
        assert change[0] in original
        base.write_text(original.replace(*change))
        line = _refused(tmp_path, capsys, ["--config", str(config)])
        assert "cell gpt2-1l/pretrain and 1 more finished under other settings" in line, line
        assert f"remove {out} to train them again" in line, line
    base.write_text(original)
    AblationConfig.load(config)  # the same content again: both cells are reused
    shutil.rmtree(out / "pretrain")  # what the stale-cell error used to advise
    line = _refused(tmp_path, capsys, ["--config", str(config)])
    assert ("cell gpt2-1l/sft-favor-16 finished under other settings" in line
            and f"remove {out / 'sft-favor-16'} " in line)
