"""`train(config)`: a run from typed settings, the same run as train.py's flags ask for."""
import json

import pytest

import train
from tests.conftest import TINY_CONFIG, TINY_FIT
from training.config import ClassConfig, RunConfig, RunConfigError, TrainConfig
from training.run import train as train_run

SHORT = {"trainer": {"max_steps": 4, "val_check_interval": 2}}


def test_configs_layer_in_order_and_the_stage_names_the_classes():
    config = TrainConfig.from_files(TINY_CONFIG, "configs/dpo-favor.yaml", overrides={"model": {"loss": "ipo"}})
    assert config.run == RunConfig(stage="dpo", direction="favor", tasks=[0])
    assert config.model.init_args == {"loss": "ipo"}  # the setting asked for by name; the files' lie under it
    settings = config.as_settings()
    assert (settings["model"]["init_args"]["n_embd"] == 32  # tiny's width
            and settings["model"]["init_args"]["loss"] == "ipo")
    assert (settings["model"]["init_args"]["optim"]["lr"] == 1e-4
            and settings["data"]["init_args"]["train_stream"] == "preference")
    assert settings["model"]["class_path"] == "lightning_modules.dpo.PreferenceModule"
    assert settings["data"]["class_path"] == "datamodules.preference_datamodule.PreferenceDataModule"
    sft = TrainConfig(run=RunConfig(stage="sft"), model=ClassConfig("lightning_modules.lm_module.CausalLMModule"))
    assert sft.as_settings()["model"]["class_path"] == "lightning_modules.lm_module.CausalLMModule"
    dpo = TrainConfig(run=RunConfig(stage="dpo"))  # the base classes give way to the stage's
    assert dpo.as_settings()["model"]["class_path"] == "lightning_modules.dpo.PreferenceModule"


def test_equal_configs_have_equal_json_and_unknown_sections_are_refused():
    a = TrainConfig.from_files(TINY_CONFIG, overrides=SHORT)
    b = TrainConfig.from_settings(json.loads(a.to_json()))
    assert (b == a and a.to_json() == b.to_json()
            and a.to_json() != TrainConfig.from_files(TINY_CONFIG).to_json())
    with pytest.raises(RunConfigError, match="unknown section.*trainr"):
        TrainConfig.from_settings({"trainr": {"max_steps": 3}})
    with pytest.raises(RunConfigError, match="unknown run setting.*stag"):
        TrainConfig.from_settings({"run": {"stag": "sft"}})


@pytest.mark.slow
def test_train_from_python_is_the_run_train_py_makes(tmp_path):
    """The same settings from Python and from flags give the same curves, to the last digit."""
    config = TrainConfig.from_files(TINY_CONFIG,
                                    overrides={**SHORT, "run": {"root": str(tmp_path / "api"), "name": "tiny"}})
    result = train_run(config)
    assert result.run_dir == tmp_path / "api" / "tiny" and result.last_checkpoint.is_file()
    assert result.info.run == "gpt2-1l-d32/pretrain" and result.metrics["val/loss"] > 0
    assert train.main([*TINY_FIT, "--trainer.max_steps", "4",
                       "--trainer.val_check_interval", "2",
                       "--run.root", str(tmp_path / "cli"), "--run.name", "tiny"]) == 0
    assert (tmp_path / "cli" / "tiny" / "curves.csv").read_bytes() == (result.run_dir / "curves.csv").read_bytes()


@pytest.mark.slow
def test_a_post_training_setting_that_contradicts_the_pretrained_model_is_refused(tmp_path):
    pre = train_run(TrainConfig.from_files(TINY_CONFIG, overrides={
        "trainer": {"max_steps": 2, "val_check_interval": 2},
        "run": {"root": str(tmp_path), "name": "pre", "eval_at_start": False}}))
    sft = {"run": {"stage": "sft", "direction": "favor", "tasks": [0], "root": str(tmp_path), "name": "sft"},
           "model": {"init_from": str(pre.last_checkpoint)}, "trainer": {"max_steps": 1}}
    with pytest.raises(RunConfigError, match="data.world.seed 7 here, 0 in the pretrained model"):
        train_run(TrainConfig.from_files(TINY_CONFIG, overrides={**sft, "data": {"world": {"seed": 7}}}))
    assert not (tmp_path / "sft").exists()
    result = train_run(TrainConfig.from_files(TINY_CONFIG,
                                              overrides={**sft, "run": {**sft["run"], "eval_at_start": False}}))
    assert result.info.run == "gpt2-1l-d32/sft-favor-stream" and result.config.run.tasks == [0]
