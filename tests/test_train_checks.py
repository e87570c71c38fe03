"""train.py checks everything it is given before any work: world values, --ckpt_path, --model.init_from
and config paths. A refusal is one `error:` line, exit status 2, no traceback, and nothing written: no run
directory, and the checkpoints and exports it read stay byte for byte as they were."""
from __future__ import annotations

import shutil

import pytest
import torch

import evaluate
import train
from tests.conftest import TINY_FIT, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
SFT = ["--run.stage", "sft", "--run.direction", "favor", "--run.tasks", "[0]"]


def assert_refused(code: int, capsys, fragment: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], lines[-3:]
    assert "Traceback" not in err
    return lines[-1]


def test_a_garbage_ckpt_path_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint\n")
    root = tmp_path / "runs"
    code = train.main([*TINY_FIT, "--run.root", str(root), "--ckpt_path", str(garbage)])
    assert_refused(code, capsys, f"{garbage} is not a readable checkpoint")
    assert garbage.read_bytes() == b"not a checkpoint\n" and not root.exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("property_temperature", "inf", "data.world.property_temperature must be > 0 and finite"),
    ("start_temperature", "nan", "data.world.start_temperature must be > 0 and finite"),
    ("start_temperature", ".nan", "data.world.start_temperature must be > 0 and finite"),
    ("entity_temperature", "1e400", "data.world.entity_temperature must be > 0 and finite"),
    ("entity_temperature", "1e-320", "data.world.entity_temperature must be > 0 and finite (at least 2.2e-308)"),
    ("entity_identity_bias", ".nan", "data.world.entity_identity_bias must be in [0, 1]"),
    ("property_smoothing", "2", "data.world.property_smoothing must be in [0, 1]"),
    ("n_tasks", "2.5", "data.world.n_tasks must be a whole number >= 1"),
    ("n_tasks", ".inf", "data.world.n_tasks must be a whole number >= 1"),
    ("seed", "-1", "data.world.seed must be >= 0"),
    ("weights", "[1, .nan, 1]", "data.world.weights must be finite"),
    ("weights", "[1, -1, 1]", "data.world.weights must be finite and >= 0"),
    ("weights", "[1, nan, 1]", "data.world.weights must be finite numbers >= 0, one per task"),
    ("weights", "[1e308, 1e308, 1]", "data.world.weights sum to more than a float holds"),
    ("distinct_emissions", "maybe", "data.world.distinct_emissions must be true or false"),
    ("n_taks", "3", "data.world.n_taks is not a world setting"),
])
def test_world_values_are_finite_and_in_range(tmp_path, capsys, flag, value, message):
    root = tmp_path / "runs"
    code = train.main([*TINY_FIT, "--run.root", str(root), f"--data.world.{flag}", value])
    assert_refused(code, capsys, message)
    assert not root.exists()


def test_post_training_checks_the_world_values_it_is_given(tiny_run, tmp_path, capsys):
    root = tmp_path / "runs"
    code = train.main([*TINY_FIT, *SFT, "--run.root", str(root),
                       "--model.init_from", str(tiny_run / "checkpoints" / "last.ckpt"),
                       "--data.world.start_temperature", "nan"])
    assert_refused(code, capsys, "data.world.start_temperature must be > 0 and finite")
    assert not root.exists()


@pytest.mark.parametrize(("how", "extra", "message"), [
    ("last", ["--data.world.n_tasks", "1"], "data.world.n_tasks 1 here, 3 in the checkpoint"),
    ("path", ["--data.world.n_tasks", "1"], "data.world.n_tasks 1 here, 3 in the checkpoint"),
    ("validate", ["--data.world.n_tasks", "1"], "data.world.n_tasks 1 here, 3 in the checkpoint"),
    ("path", ["--data.world.weights", "[2, 1, 1]"],
     "data.world.weights [0.5, 0.25, 0.25] here, [0.3333, 0.3333, 0.3333] in the checkpoint"),
    ("last", ["--data.context_length", "16"], "data.context_length 16 here, 32 in the checkpoint"),
    ("last", ["--model.n_embd", "64"], "model.n_embd 64 here, 32 in the checkpoint"),
    ("validate", ["--model.size", "gpt2-2l"], "model.n_layer 2 here, 1 in the checkpoint"),
    ("last", ["--run.stage", "dpo", "--run.direction", "favor", "--run.tasks", "[0]", "--model.init_from", "CKPT"],
     "run.stage dpo (lightning_modules.dpo.PreferenceModule) here, a pretrain or sft run"),
])
def test_ckpt_path_must_be_of_the_runs_world_and_model(tiny_run, capsys, how, extra, message):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    before = snapshot(tiny_run.parent)
    extra = [str(ckpt) if arg == "CKPT" else arg for arg in extra]
    target = ["--run.name", tiny_run.name, "--ckpt_path", "last"] if how == "last" else ["--ckpt_path", str(ckpt)]
    verb = ["validate", *TINY_FIT[1:]] if how == "validate" else TINY_FIT
    code = train.main([*verb, "--run.root", str(tiny_run.parent), *target, "--trainer.max_steps", "4", *extra])
    line = assert_refused(code, capsys, message)
    assert str(tiny_run / "config.yaml") in line  # where the settings it was trained with are
    assert snapshot(tiny_run.parent) == before  # no new run directory, the checkpoint and its run untouched


def test_a_ckpt_path_that_is_a_directory_or_foreign_is_one_line(tiny_run, tmp_path, capsys):
    root = tmp_path / "runs"
    code = train.main([*TINY_FIT, "--run.root", str(root), "--ckpt_path", str(tiny_run / "hf")])
    assert_refused(code, capsys, "is a directory; pass a checkpoint file")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    code = train.main([*TINY_FIT, "--run.root", str(root), "--ckpt_path", str(foreign)])
    assert_refused(code, capsys, "was not written by train.py")
    assert not root.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--data.world.n_tasks", "5"], "data.world.n_tasks 5 here, 3 in the pretrained model"),
    (["--data.world.weights", "[1, 0, 0]"],
     "data.world.weights [1, 0, 0] here, [0.3333, 0.3333, 0.3333] in the pretrained model"),
    (["--data.context_length", "16"], "data.context_length 16 here, 32 in the pretrained model"),
    (["--model.n_embd", "64"], "model.n_embd 64 here, 32 in the pretrained model"),
    (["--model.size", "gpt2-2l"], "model.size gpt2-2l gives n_layer 2 here, 1 in the pretrained model"),
])
@pytest.mark.parametrize("source", ["checkpoints/last.ckpt", "hf"])
def test_post_training_refuses_settings_that_contradict_the_pretrained_model(tiny_run, tmp_path, capsys, extra, message,
                                                                             source):
    """Post-training takes the world and architecture of the model it starts from; a setting given that
    says otherwise is refused, not silently replaced."""
    root = tmp_path / "runs"
    before = snapshot(tiny_run)
    code = train.main([*TINY_FIT, *SFT, "--run.root", str(root), "--model.init_from", str(tiny_run / source), *extra])
    line = assert_refused(code, capsys, message)
    assert "drop the setting" in line
    assert not root.exists() and snapshot(tiny_run) == before


def test_flags_that_agree_with_the_pretrained_model_are_accepted_and_configs_give_way(tiny_run, tmp_path):
    """Flags that name the pretrained model's own world and size are no contradiction (weights of the same
    ratios are the same world); a config file's world gives way to the pretrained model's, as the stage
    configs say."""
    other_world = tmp_path / "other-world.yaml"
    other_world.write_text("data:\n  world:\n    n_tasks: 5\n    seed: 7\n")
    root = tmp_path / "runs"
    assert train.main([*TINY_FIT, "--config", str(other_world), *SFT, "--run.root", str(root), "--run.name", "sft",
                       "--data.world.weights", "[2, 2, 2]", "--model.size", "gpt2-1l", "--model.n_embd", "32",
                       "--model.init_from", str(tiny_run / "checkpoints" / "last.ckpt"), "--trainer.max_steps", "1",
                       "--run.eval_at_start", "false"]) == 0
    world = torch.load(root / "sft" / "checkpoints" / "last.ckpt",
                       weights_only=False)["datamodule_hyper_parameters"]["world"]
    assert (world["n_tasks"], world["seed"]) == (3, 0)


@pytest.mark.parametrize(("broken", "content", "message"), [
    ("config.json", b"{not json", "config.json cannot be read back: it is not valid JSON"),
    ("config.json", b"[1, 2]", "config.json cannot be read back: it holds a JSON list, not an object"),
    ("ginc_data.json", b"\xff\xfe\x00garbage", "ginc_data.json cannot be read back: it is not valid JSON"),
    ("ginc_data.json", b'{"data": {"context_length": 32, "world": {"n_tasks": 0}}}', "the world it records is not one"),
    ("ginc_data.json", b'{"step": 3}', "does not record the data settings"),
])
def test_a_broken_export_is_one_line_naming_the_file(tiny_run, tmp_path, capsys, broken, content, message):
    export = tmp_path / "hf"
    shutil.copytree(tiny_run / "hf", export)
    (export / broken).write_bytes(content)
    out = tmp_path / "curves.csv"
    code = evaluate.main(["curves", "--ckpt", str(export), "--out", str(out)])
    line = assert_refused(code, capsys, message)
    assert str(export / broken) in line
    assert not out.exists() and (export / broken).read_bytes() == content
    root = tmp_path / "runs"  # the same export as the start of post-training
    code = train.main([*TINY_FIT, *SFT, "--run.root", str(root), "--model.init_from", str(export)])
    assert_refused(code, capsys, message)
    assert not root.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--config", "DIR"], "--config DIR is a directory; a config must be a YAML file"),
    (["--config=DIR"], "--config DIR is a directory; a config must be a YAML file"),
    (["--model", "DIR"], "--model DIR is a directory; a config must be a YAML file"),
    (["--config", "EMPTY"], "config EMPTY is empty"),
    (["--config", "BINARY"], "config BINARY is not UTF-8 text"),
])
def test_config_paths_are_yaml_files(tmp_path, capsys, extra, message):
    paths = {"DIR": tmp_path / "configs", "EMPTY": tmp_path / "empty.yaml", "BINARY": tmp_path / "binary.yaml"}
    paths["DIR"].mkdir()
    paths["EMPTY"].write_text("")
    paths["BINARY"].write_bytes(b"\x80\x81\xff")
    name = lambda text: (text.replace("DIR", str(paths["DIR"])).replace("EMPTY", str(paths["EMPTY"]))  # noqa: E731
                         .replace("BINARY", str(paths["BINARY"])))
    root = tmp_path / "runs"
    code = train.main([*TINY_FIT, "--run.root", str(root), *[name(arg) for arg in extra]])
    assert_refused(code, capsys, name(message))
    assert not root.exists()
