"""train.py: config errors stop before training with one line; a tiny run fills its run directory."""
from __future__ import annotations

import csv

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate
import train
from tests.conftest import REPO, TINY_ARCH, TINY_CONFIG, TINY_FIT, TINY_RUN_STEPS, TINY_WORLD
from training.console import CtrlC, quiet_lightning
from training.quickstart import run_quickstart


def run_train(tmp_path, *extra: str) -> int:
    return train.main([*TINY_FIT, "--run.root", str(tmp_path / "runs"), *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.size", "gpt2-5l"], "unknown model size 'gpt2-5l'"),
        (["--run.stage", "sft", "--run.direction", "favor", "--run.tasks", "[0]"],
         "starts from a pretrained model: set model.init_from"),
        (["--run.stage", "sft", "--model.init_from", "nowhere/last.ckpt"], "nowhere/last.ckpt does not exist"),
        (["--data.train_weights", "[1.0, 0.0]"], "train_weights has 2 entries but the world has 3 tasks"),
        (["--data.train_weights", "[0.0, 0.0, 0.0]"], "train_weights are all zero"),
        (["--run.stage", "rlhf"], "unknown run.stage 'rlhf'"),
        (["--data.context_length", "128"], "exceeds the model's n_positions 64"),
        (["--ckpt_path", "last"], "ckpt_path last needs run.name"),
        (["--run.cpu_threads", "0"], "run.cpu_threads must be >= 1"),
        (["--run.name", "../escaped"], "run.name '../escaped' would write outside"),
        (["--model.optim.lr", "-1"], "model.optim.lr = -1.0 must be > 0"),
        (["--run.root", __file__], f"run.root {__file__} is a file"),
        (["--run.name", "/tmp/elsewhere"], "run.name '/tmp/elsewhere' would write outside"),
        (["--model.class_path", "lightning_modules.dpo.PreferenceModule"],
         "stage pretrain trains lightning_modules.lm_module.CausalLMModule"),
    ],
)
def test_config_errors_give_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    assert run_train(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"]), "nothing beside the root"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("curves.csv"))


@pytest.mark.parametrize(("extra", "message"), [
    (["--model.betaa", "3"], "Parser key \"model\": Option 'betaa' is not accepted"),
    (["--data.batch_size", "x"], "Parser key \"batch_size\": Expected a <class 'int'>. Got value: x"),
    (["--trainer.max_steps", "abc"], "Parser key \"trainer.max_steps\""),
    (["--config", "nothere.yaml"], "File does not exist"),
])
def test_bad_flags_are_one_line_not_the_usage(tmp_path, capsys, extra, message):
    assert run_train(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and "--help" in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("extra", "module", "data"), [
    ([], "lightning_modules.lm_module.CausalLMModule", "datamodules.ginc_datamodule.GincDataModule"),
    (["--run.stage", "dpo"], "lightning_modules.dpo.PreferenceModule",
     "datamodules.preference_datamodule.PreferenceDataModule"),
    (["--config", "configs/dpo-favor.yaml"], "lightning_modules.dpo.PreferenceModule",
     "datamodules.preference_datamodule.PreferenceDataModule"),
    (["--run.stage=dpo"], "lightning_modules.dpo.PreferenceModule",
     "datamodules.preference_datamodule.PreferenceDataModule"),
    (["--run", "{stage: dpo, tasks: [0]}"], "lightning_modules.dpo.PreferenceModule",
     "datamodules.preference_datamodule.PreferenceDataModule"),
])
def test_the_stage_sets_the_module_and_data_classes(capsys, extra, module, data):
    """--run.stage, or run.stage in a config, picks the classes; the last one named wins, as in the parse."""
    assert train.main([*TINY_FIT, *extra, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert f"class_path: {module}" in printed and f"class_path: {data}" in printed, printed


def test_tiny_run_dir_export_and_evaluate(tiny_run, tmp_path):
    run = tiny_run
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    with (run / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    # before training, then every 10 steps
    assert {r["step"] for r in rows} == {str(step) for step in range(0, TINY_RUN_STEPS + 1, 10)}
    assert {r["run"] for r in rows} == {"gpt2-1l-d32/pretrain"} and {r["layers"] for r in rows} == {"1"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sorted(run.glob("events.out.tfevents.*"))[-1]))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # TensorBoard's HParams view
    assert "hp_metric" in events.Tags()["scalars"] and "val/excess_loss" in events.Tags()["scalars"]

    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run / "hf")  # maps the world's tokens, PAD and BOS
    assert len(tokenizer) == hf.config.vocab_size == 22
    assert tokenizer("<bos> t3 t7 <d> t19")["input_ids"] == [21, 3, 7, 0, 19]
    assert tokenizer.decode([21, 3, 0]) == "<bos> t3 <d>" and tokenizer.pad_token_id == 20
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(hf.state_dict()["transformer.h.0.mlp.c_fc.weight"], last["gpt.transformer.h.0.mlp.c_fc.weight"])

    out = tmp_path / "curves.csv"
    assert evaluate.main(["curves", "--ckpt", str(run / "checkpoints" / "last.ckpt"), str(run / "hf"),
                          "--out", str(out)]) == 0
    with out.open() as f:
        evaluated = list(csv.DictReader(f))
    final = [r for r in rows if r["step"] == str(TINY_RUN_STEPS)]
    assert len(evaluated) == 2 * len(final)  # the checkpoint and the export, same prompts
    for source in (evaluated[: len(final)], evaluated[len(final):]):
        for a, b in zip(source, final):
            assert ((a["run"], a["k"], a["task"], a["shots"], a["count"])
                    == (b["run"], b["k"], b["task"], b["shots"], b["count"]))
            assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-5)


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    code = run_train(tmp_path, "--model.optim.lr", "1e6", "--trainer.max_steps", "40",
                     "--trainer.val_check_interval", "2", "--run.name", "diverges")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "non-finite" in err[-1] or "became nan" in err[-1], err[-3:]
    run = tmp_path / "runs" / "diverges"
    assert not (run / "hf").exists()
    for ckpt in run.rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


@pytest.mark.parametrize("target", ["init_from", "resume", "curves", "hf_init"])
def test_a_broken_checkpoint_is_one_line(tiny_run_copy, tmp_path, capsys, target):
    run = tiny_run_copy
    ckpt = run / "checkpoints" / "last.ckpt"
    if target == "hf_init":
        weights = run / "hf" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        code = run_train(tmp_path, "--run.stage", "sft", "--run.direction", "favor", "--run.tasks", "[0]",
                         "--model.init_from", str(run / "hf"), "--run.name", "sft")
    else:
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
        if target == "init_from":
            code = run_train(tmp_path, "--run.stage", "sft", "--run.direction", "favor", "--run.tasks", "[0]",
                             "--model.init_from", str(ckpt), "--run.name", "sft")
        elif target == "resume":
            code = run_train(tmp_path, "--run.name", run.name, "--ckpt_path", "last")
        else:
            code = evaluate.main(["curves", "--ckpt", str(ckpt), "--out", str(tmp_path / "c.csv")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and ("not a readable checkpoint" in err[-1]
                                              or "not a loadable HF export" in err[-1]), err[-3:]
    assert not (tmp_path / "runs" / "sft").exists() and not (tmp_path / "c.csv").exists()


def test_checkpoint_every_must_be_positive(tmp_path, capsys):
    assert run_train(tmp_path, "--run.checkpoint_every", "-3") == 2
    assert "run.checkpoint_every must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "threads"), [([], 1), (["--run.cpu_threads", "2"], 2)])
@pytest.mark.slow
def test_training_runs_on_the_threads_it_is_given(tmp_path, extra, threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert run_train(tmp_path, "--trainer.max_steps", "1", "--run.eval_at_start", "false", *extra) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_validate_writes_somewhere_new_and_test_is_one_line(tiny_run_copy, tmp_path, capsys):
    run = tiny_run_copy
    config, curves = (run / "config.yaml").read_text(), (run / "curves.csv").read_text()
    assert train.main(["validate", "--config", str(TINY_CONFIG), "--run.root", str(tmp_path / "runs"),
                       "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert (run / "config.yaml").read_text() == config and (run / "curves.csv").read_text() == curves
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(f"{run.name}-validate-")]
    for verb in ("test", "predict"):
        assert train.main([verb, "--config", str(TINY_CONFIG)]) == 2
        assert f"has no {verb} split" in capsys.readouterr().err


@pytest.mark.slow
def test_best_checkpoint_holds_the_weights_its_score_was_measured_on(tmp_path):
    assert run_train(tmp_path, "--run.name", "b", "--run.checkpoint_every", "3", "--trainer.max_steps", "12",
                     "--trainer.val_check_interval", "4") == 0
    ckpts = tmp_path / "runs" / "b" / "checkpoints"
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] % 4 == 0, best["global_step"]  # saved right after a validation
    with (tmp_path / "runs" / "b" / "curves.csv").open() as f:
        steps = {int(r["step"]) for r in csv.DictReader(f)}
    assert best["global_step"] in steps
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 12


def test_no_generic_optimizer_is_offered(capsys):
    with pytest.raises(SystemExit):
        train.main(["fit", "--help"])
    assert "--optimizer" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_quickstart_reports_curves_priors_and_reemergence(tmp_path, capsys):
    """The quickstart's whole path on a few steps and prompts: five runs, the table of both ideal learners,
    the favoured task's prior from the shift analysis and the reader, re-emergence, and its outputs."""
    quiet_lightning()
    run_quickstart(str(tmp_path / "runs"),
                   {"trainer": {"max_steps": 6, "val_check_interval": 3, "enable_progress_bar": False},
                    "data": {"icl": {"prompts_per_task": 8, "k_values": [2]}, "val_documents": 16}})
    out = capsys.readouterr().out
    for line in ("favoured pretrained", "after SFT-favour", "after SFT-disfavour", "exact Bayesian", "document reader",
                 "Prior of task 0", "Shared P vs free", "Re-emergence of suppressed tasks", "quickstart took"):
        assert line in out, line
    (analysis,) = (tmp_path / "runs").glob("quickstart-*/analysis")
    assert {p.name for p in analysis.iterdir()} >= {"curves.csv", "shift", "reader_prior.csv"}
    with (analysis / "reader_prior.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"].split("/")[1] for r in rows] == ["pretrain", "sft-favor-128", "sft-favor-512", "sft-favor-2048",
                                                      "sft-disfavor-512"]
    assert all(abs(sum(float(r[f"prior_{i}"]) for i in range(3)) - 1) < 1e-9 for r in rows)


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_exit_130(tmp_path):
    """Lightning answers Ctrl-C with its own notice and sys.exit(1); train.py says what was kept instead."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_FIT, "--run.root", str(root), "--run.name", "t",
                             "--trainer.max_steps", "100000"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_output_safety
    deadline = time.time() + 120
    while not list(root.rglob("*.ckpt")):  # training is under way
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # once: a Ctrl-C that Python swallows in a finalizer is raised again (CtrlC)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("train.py did not stop on one Ctrl-C")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted; resume with") and "Traceback" not in err
    assert "KeyboardInterrupt" not in err


def test_a_ctrl_c_that_python_swallowed_still_stops_the_run(tmp_path, capsys):
    """A KeyboardInterrupt raised inside a weakref callback is dropped by Python ("Exception ignored");
    the recorded request stops the run at its next step, with one line and no report of the dropped one."""
    import signal
    import weakref

    class Thing:
        pass

    def swallowed(_):
        signal.raise_signal(signal.SIGINT)  # the handler raises here, inside a weakref callback

    import sys

    import lightning as L

    from datamodules.ginc_datamodule import GincDataModule
    from lightning_modules.lm_module import CausalLMModule, data_arguments

    thing = Thing()
    weakref.finalize(thing, swallowed, None)
    previous, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under a background CI
        CtrlC.watch()
        del thing  # runs the callback: the interrupt is raised, swallowed and recorded
        assert CtrlC.requested
        trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            callbacks=[CtrlC()], limit_val_batches=0)
        data = GincDataModule(world=TINY_WORLD, context_length=32, batch_size=4, val_documents=4,
                              icl={"k_values": [3], "prompts_per_task": 2, "batch_size": 2})
        with pytest.raises(SystemExit):  # Lightning stops on the KeyboardInterrupt the callback raises
            trainer.fit(CausalLMModule(**TINY_ARCH, **data_arguments(data)), data)
        assert trainer.global_step <= 1
        assert "Exception ignored" not in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        CtrlC.requested = False
