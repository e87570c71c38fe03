"""The ablation runner: a tiny grid end to end, resumed after an interruption, with a failing cell."""
import csv
from pathlib import Path

import pytest
import yaml

import ablate
from tests.conftest import REPO

BASE = REPO / "configs" / "ablations" / "tiny-base.yaml"


def _grid(tmp_path: Path, root: str, **extra) -> Path:
    cfg = {
        "name": "t", "root": str(tmp_path / root), "sizes": ["gpt2-1l"], "base_configs": [str(BASE)],
        "pretrain_steps": 30, "pretrain_overrides": ["--model.optim.lr", "3e-3", "--model.optim.warmup_steps", "5"],
        "posttrain_overrides": ["--model.optim.lr", "1e-3", "--model.optim.warmup_steps", "1"],
        "overrides": ["--data.context_length", "32", "--model.n_positions", "32",
                      "--data.icl", "{k_values: [3], prompts_per_task: 8, batch_size: 8}",
                      "--data.world.property_smoothing", "0.5"],
        "methods": ["sft", "dpo"], "directions": ["favor"], "tasks": [0], "amounts": [0, 32], "batch_size": 16,
        "evals_per_cell": 1, "fit_fraction": 0.5, "laws": ["power", "bayesian_sampling"], "shift_resamples": 4,
        "reader_prompts": 4, "gap_prompts": 4, **extra,
    }
    path = tmp_path / f"{root}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _table(path: Path) -> list[dict]:
    with path.open() as f:
        return sorted(csv.DictReader(f), key=lambda r: (r["run"], r["k"], r["task"], int(r["shots"])))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ablate")
    assert ablate.main(["--config", str(_grid(tmp, "whole"))]) == 0
    return tmp


@pytest.mark.slow
def test_grid_writes_curves_fits_and_shift(finished):
    out = finished / "whole" / "t"
    rows = _table(out / "curves.csv")
    runs = {r["run"] for r in rows}
    assert len(runs) == 3 and any(r.endswith("/pretrain") for r in runs)
    assert {r["method"] for r in rows} == {"", "sft", "dpo"} and {r["amount"] for r in rows} == {"", "32"}
    assert (out / "fits" / "fits.csv").is_file() and (out / "shift" / "gpt2-1l" / "shift.csv").is_file()
    report = (out / "report.md").read_text()
    assert "| gpt2-1l/sft-favor-32 | done |" in report


@pytest.mark.slow
def test_grid_reports_what_it_found(finished):
    """Every cell's law-fitted and reader prior beside each other, the verdicts, and the gap to the reader."""
    out = finished / "whole" / "t"
    with (out / "reader_prior.csv").open() as f:
        reader = {r["run"]: r for r in csv.DictReader(f)}
    assert set(reader) == {r["run"] for r in _table(out / "curves.csv")}
    assert all(abs(sum(float(r[f"prior_{i}"]) for i in range(3)) - 1) < 1e-9
               and float(r["kl"]) <= float(r["kl_world"]) + 1e-9
               for r in reader.values())
    with (out / "reader_gap.csv").open() as f:
        gaps = list(csv.DictReader(f))
    assert [(g["run"], g["k"]) for g in gaps] == [("gpt2-1l-d64/pretrain", "3")] and float(gaps[0]["gap_se"]) > 0
    report = (out / "report.md").read_text()
    for line in ("### k = 3: task 0's prior", "- sft favor: law prior", "- dpo favor: law prior", "reader prior",
                 "by BIC, all amounts (32)", "graded at", "| KL / base |", "- prior-only account ", "### Reemergence",
                 "## Laws in extrapolation", "Pretrained models against the document reader",
                 "![favoured prior](favoured_prior.png)", "| rise (model / learner) |", "](learner_curves.png)"):
        assert line in report, line
    assert (out / "favoured_prior.png").stat().st_size > 1000 and (out / "learner_curves.png").stat().st_size > 1000
    assert report.index("- sft favor: law prior") < report.index("- dpo favor: law prior")  # SFT before DPO
    sft = next(line for line in report.splitlines() if line.startswith("| sft-favor | 32 |"))
    assert f"{float(reader['gpt2-1l-d64/sft-favor-32']['prior_0']):.3f}" in sft


@pytest.mark.slow
def test_interrupted_grid_resumes_to_the_same_table(finished, tmp_path):
    config = _grid(tmp_path, "resumed")
    assert ablate.main(["--config", str(config), "--stop-after", "2"]) == 0  # pretraining and one cell, then "killed"
    out = tmp_path / "resumed" / "t"
    assert not (out / "curves.csv").exists() and (out / "gpt2-1l" / "sft-favor-32" / "DONE").is_file()
    assert ablate.main(["--config", str(config)]) == 0
    resumed, whole = _table(out / "curves.csv"), _table(finished / "whole" / "t" / "curves.csv")
    assert [(r["run"], r["task"], r["shots"]) for r in resumed] == [(r["run"], r["task"], r["shots"]) for r in whole]
    for a, b in zip(resumed, whole):
        assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-6)


@pytest.mark.parametrize("launch", [["--parallel", "1"], ["--parallel", "2"],
                                    pytest.param(["--launcher", "slurm"], marks=pytest.mark.slurm)])
@pytest.mark.slow
def test_failed_cell_is_reported_and_the_others_finish(finished, tmp_path, launch):
    if "slurm" in launch:
        _needs_slurm()
    pretrained = finished / "whole" / "t" / "gpt2-1l" / "pretrain" / "hf"
    # disfavouring every task leaves an all-zero mixture: that cell fails, the favour cell runs
    config = _grid(tmp_path, "failing", pretrained={"gpt2-1l": str(pretrained)}, methods=["sft"],
                   directions=["favor", "disfavor"], tasks=[0, 1, 2])
    assert ablate.main(["--config", str(config), *launch]) == 1
    out = tmp_path / "failing" / "t"
    report = (out / "report.md").read_text()
    assert "| gpt2-1l/sft-disfavor-32 | failed" in report and "| gpt2-1l/sft-favor-32 | done |" in report
    # the reason, not just the verdict
    assert "all zero" in report.split("sft-disfavor-32 | failed", 1)[1].splitlines()[0]
    assert any(r["run"].endswith("sft-favor-32") for r in _table(out / "curves.csv"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.slow
def test_a_diverging_cell_is_reported_failed(finished, tmp_path, method):
    """Every stage gets the same guard: a diverging cell, SFT or DPO, is failed, not DONE, and exports nothing.
    The lr that diverges is given to that method alone (method_overrides): the other method's cell trains."""
    pretrained = finished / "whole" / "t" / "gpt2-1l" / "pretrain" / "hf"
    config = _grid(tmp_path, "diverging", pretrained={"gpt2-1l": str(pretrained)}, directions=["favor"],
                   method_overrides={method: ["--model.optim.lr", "1e30"]})
    assert ablate.main(["--config", str(config)]) == 1
    out = tmp_path / "diverging" / "t"
    report = (out / "report.md").read_text()
    assert f"| gpt2-1l/{method}-favor-32 | failed" in report and "non-finite" in report
    other = ({"sft", "dpo"} - {method}).pop()
    assert f"| gpt2-1l/{other}-favor-32 | done |" in report
    assert not (out / "gpt2-1l" / f"{method}-favor-32" / "DONE").exists()
    assert not (out / "gpt2-1l" / f"{method}-favor-32" / "hf").exists()


@pytest.mark.slow
def test_a_given_pretrained_model_is_measured_on_the_cells_prompts(finished, tmp_path):
    """The grid's overrides give its cells 12 prompts per (k, task); the given checkpoint was trained with 8.
    The shift compares them point by point, so the baseline is measured on the cells' prompts too."""
    pretrained = finished / "whole" / "t" / "gpt2-1l" / "pretrain" / "hf"
    overrides = ["--data.context_length", "32", "--model.n_positions", "32", "--data.world.property_smoothing", "0.5",
                 "--data.icl", "{k_values: [3], prompts_per_task: 12, batch_size: 8}"]
    config = _grid(tmp_path, "given", pretrained={"gpt2-1l": str(pretrained)}, methods=["sft"], overrides=overrides)
    assert ablate.main(["--config", str(config)]) == 0
    rows = _table(tmp_path / "given" / "t" / "curves.csv")
    assert {r["run"] for r in rows} == {"gpt2-1l-d64/pretrain", "gpt2-1l-d64/sft-favor-32"}
    assert {r["count"] for r in rows} == {"12"}


def test_bad_ablation_config(tmp_path, capsys):
    assert ablate.main(["--config", str(_grid(tmp_path, "bad", methods=["rlhf"]))]) == 2
    assert "unknown method 'rlhf'" in capsys.readouterr().err
    assert ablate.main(["--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("text, message", [
    ("name: x\nsizes: [gpt2-1l]\npretrain_steps: abc\n", "pretrain_steps is 'abc', which is not an integer"),
    ("name: x\nsizes: [gpt2-1l]\namounts: 32\n", "amounts is 32, which is not a list of an integer"),
    ("name: x\nsizes: [gpt2-1l\n", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping of settings"),
    ("name: x\nsizes: [gpt2-1l]\nfit_fraction: 0.5\nlaws: [power, 3]\n",
     "laws is ['power', 3], which is not a list of text or null"),
    ("name: ../../escape\nsizes: [gpt2-1l]\n", "name '../../escape' would write outside"),
    (f"name: x\nroot: {__file__}\nsizes: [gpt2-1l]\n", f"root {__file__} is a file"),
    ("name: x\nsizes: [gpt2-1l]\nfit_fraction: 5\n", "fit fractions [5] must lie strictly between 0 and 1"),
    ("name: x\nsizes: [gpt2-1l]\nlaws: [bogus]\n", "unknown law 'bogus'"),
    ("name: x\nsizes: [gpt2-1l]\nshift_resamples: 1\n", "resamples 1 must be at least 2"),
    ("name: x\nsizes: [gpt2-1l]\namounts: [32, 32]\n", "amounts lists 32 more than once"),
    ("name: x\nsizes: [gpt2-1l, gpt2-1l]\n", "sizes lists 'gpt2-1l' more than once"),
    ("name: x\nsizes: [gpt2-1l]\ntasks: [-1]\n", "tasks must be task indices >= 0"),
    ("name: x\nsizes: [gpt2-1l]\nmethod_overrides: {rlhf: [--model.beta, '1']}\n", "unknown method 'rlhf'"),
    ("name: x\nsizes: [gpt2-1l]\nmethod_overrides: {dpo: --model.beta}\n",
     "which is not a mapping of text to a list of text"),
])
def test_bad_ablation_yaml_is_one_line(tmp_path, capsys, text, message):
    import ablate

    cfg = tmp_path / "grid.yaml"
    cfg.write_text(text)
    assert ablate.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_trajectory_verdict_counts_steps_back_and_whether_they_leave_the_intervals():
    from evaluation.grid_findings import trajectory_verdict

    assert trajectory_verdict("favor", [0, 32, 64], [0.3, 0.5, 0.9]) == "monotone"
    assert trajectory_verdict("disfavor", [0, 64, 32], [0.3, 0.05, 0.1]) == "monotone"  # ordered by amount
    assert trajectory_verdict("favor", [0, 32, 64], [0.3, 1.0, 0.99], [0.2, 0.9, 0.95], [0.4, 1.0, 1.0]) == \
        "not monotone (1 of 2 steps go the other way, 0 beyond their intervals)"
    assert trajectory_verdict("favor", [0, 32, 64], [0.3, 0.9, 0.5], [0.2, 0.8, 0.4], [0.4, 1.0, 0.6]) == \
        "not monotone (1 of 2 steps go the other way, 1 beyond their intervals)"


@pytest.mark.slow
def test_finished_cells_are_not_reused_under_other_settings(finished, capsys):
    """A rerun with another task (or steps, or overrides) must not skip every cell and report the old ones."""
    config = yaml.safe_load(_grid(finished, "whole").read_text())
    config["tasks"] = [1]
    changed = finished / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    before = (finished / "whole" / "t" / "report.md").read_text()
    assert ablate.main(["--config", str(changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cell gpt2-1l/sft-favor-32 and 1 more finished under other settings" in err[0], err
    assert (finished / "whole" / "t" / "report.md").read_text() == before


@pytest.mark.slow
def test_cells_in_parallel_processes_give_the_same_table(finished, tmp_path):
    """--parallel 2: each cell a `python train.py` process of its own, a size's cells after its
    pretraining; the curves equal those of the grid trained in one process, to the last digit."""
    assert ablate.main(["--config", str(_grid(tmp_path, "parallel")), "--parallel", "2"]) == 0
    out = tmp_path / "parallel" / "t"
    assert _table(out / "curves.csv") == _table(finished / "whole" / "t" / "curves.csv")
    assert all((out / "gpt2-1l" / cell / "train.log").stat().st_size > 0
               for cell in ("pretrain", "sft-favor-32", "dpo-favor-32"))
    assert "| gpt2-1l/dpo-favor-32 | done |" in (out / "report.md").read_text()


def _slurm_up() -> str:
    """Why SLURM cannot run the test here, or '' when a cluster answers (scripts/slurm-local.sh start)."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        return "no SLURM client here (apt-get install slurm-wlm munge, then scripts/slurm-local.sh start)"
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return "" if up.returncode == 0 and up.stdout.strip() else "no SLURM cluster answers (scripts/slurm-local.sh start)"


def _needs_slurm() -> None:
    import os

    reason = _slurm_up()
    if reason:
        if os.environ.get("SLURM_REQUIRED"):  # CI starts a local cluster: there the tests must run
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.slurm
def test_grid_through_slurm_gives_the_same_table(finished, tmp_path, capsys):
    """Each size's pretraining a SLURM job and its cells one job array after it, on a real cluster: --no-wait
    submits and exits, a rerun collects without submitting again, and the curves equal the one-process grid's."""
    import json
    import subprocess

    _needs_slurm()
    settings = {"slurm": {"cpus_per_cell": 1, "mem_gb": 2, "time_min": 20}}
    config = _grid(tmp_path, "slurm", **settings)
    assert ablate.main(["--config", str(config), "--launcher", "slurm", "--no-wait"]) == 0
    out = tmp_path / "slurm" / "t"
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    pretrain = jobs["gpt2-1l/pretrain"]["id"]
    subprocess.run(["scontrol", "hold", pretrain], capture_output=True)  # queued (or running) until released
    assert "[ablate] SLURM jobs: gpt2-1l/pretrain " in capsys.readouterr().out and not (out / "curves.csv").exists()
    arrays = {jobs[f"gpt2-1l/{cell}"]["id"].split("_")[0] for cell in ("sft-favor-32", "dpo-favor-32")}
    assert len(arrays) == 1 and "_" not in pretrain, jobs  # the cells are one array
    _grid(tmp_path, "slurm", epochs=2, **settings)  # the grid asks other things of cells whose jobs are queued
    assert ablate.main(["--config", str(config), "--launcher", "slurm"]) == 2
    assert "queued under other settings; scancel" in capsys.readouterr().err
    _grid(tmp_path, "slurm", **settings)
    subprocess.run(["scontrol", "release", pretrain], capture_output=True)
    assert ablate.main(["--config", str(config), "--launcher", "slurm"]) == 0
    assert json.loads((out / "slurm" / "jobs.json").read_text()) == jobs  # collected, not submitted again
    assert _table(out / "curves.csv") == _table(finished / "whole" / "t" / "curves.csv")
    assert list((out / "slurm").glob("*_log.out")), "submitit's job logs"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_preempted_slurm_cell_resumes_from_its_checkpoint(tmp_path):
    """SLURM signals a job (USR2) before its time runs out: submitit calls the cell's checkpoint hook and
    requeues it, and the cell resumes from its last.ckpt to the curves of a run that was never stopped.
    (Under 10 minutes of time_min submitit takes any USR2 for the time limit, the case that needs the hook.)"""
    import json
    import subprocess
    import time

    _needs_slurm()
    longer = {"pretrain_steps": 400, "methods": ["sft"], "directions": ["favor"],
              "pretrain_overrides": ["--model.optim.lr", "3e-3", "--model.optim.warmup_steps", "5",
                                     "--run.checkpoint_every", "20"]}
    assert ablate.main(["--config", str(_grid(tmp_path, "local", **longer))]) == 0
    config = _grid(tmp_path, "slurm", slurm={"cpus_per_cell": 1, "mem_gb": 2, "time_min": 5}, **longer)
    assert ablate.main(["--config", str(config), "--launcher", "slurm", "--no-wait"]) == 0
    out = tmp_path / "slurm" / "t"
    job = json.loads((out / "slurm" / "jobs.json").read_text())["gpt2-1l/pretrain"]["id"]
    began = time.monotonic()
    while not (out / "gpt2-1l" / "pretrain" / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() - began < 300, "the pretraining job wrote no checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    while (state := subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"],
                                   capture_output=True, text=True).stdout.strip()) != "PENDING":
        assert state and time.monotonic() - began < 300, f"the job was not requeued (state {state or 'gone'})"
        time.sleep(0.2)
    # SLURM holds a requeued job back for about two minutes; the test need not wait for that
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    assert ablate.main(["--config", str(config), "--launcher", "slurm"]) == 0
    log = (out / "slurm" / f"{job}_0_log.out").read_text()
    assert "--ckpt_path last" in log, "the requeued job resumed from the checkpoint"
    assert "this job is timed-out" in (out / "slurm" / f"{job}_0_log.err").read_text()
    resumed, whole = _table(out / "curves.csv"), _table(tmp_path / "local" / "t" / "curves.csv")
    assert [(r["run"], r["task"], r["shots"]) for r in resumed] == [(r["run"], r["task"], r["shots"]) for r in whole]
    for a, b in zip(resumed, whole):
        assert float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-6)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_slurm_job_that_ends_without_a_result_is_a_failed_cell(tmp_path):
    """A cancelled pretraining job: SLURM cancels the cell array waiting for it, and each cell is reported
    failed with the reason and its log, instead of being waited for forever."""
    import json
    import subprocess
    import threading

    import submitit

    from training.grid.slurm import wait

    _needs_slurm()
    config = _grid(tmp_path, "cancelled", slurm={"cpus_per_cell": 1, "mem_gb": 2, "time_min": 20})
    assert ablate.main(["--config", str(config), "--launcher", "slurm", "--no-wait"]) == 0
    out = tmp_path / "cancelled" / "t"
    recorded = json.loads((out / "slurm" / "jobs.json").read_text())
    subprocess.run(["scancel", recorded["gpt2-1l/pretrain"]["id"]], check=True)
    status = {}
    jobs = {name: submitit.SlurmJob(out / "slurm", job["id"]) for name, job in recorded.items()}
    waiting = threading.Thread(target=wait, args=(jobs, status, 0.5), daemon=True)
    waiting.start()
    waiting.join(timeout=120)
    assert not waiting.is_alive(), f"still waiting on {sorted(jobs)}"
    lines = {name: str(s) for name, s in status.items()}
    assert lines["gpt2-1l/pretrain"].startswith("failed: SLURM job") and "cancelled" in lines["gpt2-1l/pretrain"]
    assert all("its pretraining (gpt2-1l/pretrain) failed" in lines[f"gpt2-1l/{cell}"]
               and "_log.err" in lines[f"gpt2-1l/{cell}"]
               for cell in ("sft-favor-32", "dpo-favor-32")), lines
