"""DPO on a tiny pretrained GPT-2: preference data, the direction of the effect, a frozen reference, bad input."""
from __future__ import annotations

import csv
import itertools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import train
from datamodules.ginc_datamodule import BlockStream
from datamodules.preference_datamodule import PreferenceDataModule
from datamodules.sampling import GincSampler
from datamodules.world import GincWorld, WorldConfig, WorldConfigError
from evaluation.ginc_curves import load_model
from lightning_modules.dpo import PreferenceModule, sequence_logps
from lightning_modules.lm_module import CausalLMModule, data_arguments
from models.gpt import ModelConfigError
from tests.conftest import TINY_ARCH, TINY_FIT, TINY_WORLD

pytestmark = pytest.mark.usefixtures("single_thread")
ICL = dict(k_values=[3], prompts_per_task=4, batch_size=4)
CONTEXT = 32
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=5)


def pair_data(train_weights, **kw) -> PreferenceDataModule:
    args = dict(world=TINY_WORLD, context_length=CONTEXT, batch_size=8, train_weights=train_weights, train_documents=64,
                val_documents=8, icl=ICL)
    return PreferenceDataModule(**{**args, **kw})


@pytest.fixture
def pretrained(tiny_run) -> str:
    return str(tiny_run / "checkpoints" / "last.ckpt")


def dpo_module(data: PreferenceDataModule, **model_kw) -> PreferenceModule:
    """A module built as train.py builds it: what the data fixes, its pairs included, from the datamodule."""
    return PreferenceModule(**TINY_ARCH, optim=dict(lr=1e-3, warmup_steps=2, weight_decay=0.0),
                            train_pairs=data.train_pairs, **data_arguments(data), **model_kw)


def dpo_run(init_from: str, train_weights, steps: int = 30, **model_kw) -> tuple[PreferenceModule, L.Trainer]:
    L.seed_everything(0)
    data = pair_data(train_weights)
    module = dpo_module(data, init_from=init_from, **model_kw)
    trainer = L.Trainer(max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, **TRAINER)
    trainer.fit(module, data)
    return module, trainer


@torch.no_grad()
def task_loglik(model) -> torch.Tensor:
    """Mean log-likelihood per token [n_tasks] of 64 held-out documents of each task (a stream no run trains on)."""
    world = WorldConfig(**TINY_WORLD)
    sampler, out = GincSampler(GincWorld.build(world)), []
    for task in range(world.n_tasks):
        docs = sampler.documents(torch.arange(64), CONTEXT - 1, torch.eye(world.n_tasks)[task].tolist(),
                                 stream="heldout")
        ids = torch.cat([torch.full((64, 1), world.bos_id), docs.tokens], 1)
        out.append(sequence_logps(model.eval(), ids).mean() / (CONTEXT - 1))
    return torch.stack(out)


def relative(loglik: torch.Tensor, task: int) -> float:
    """Log-likelihood of `task` minus the mean of the other tasks'."""
    others = [t for t in range(loglik.shape[0]) if t != task]
    return (loglik[task] - loglik[others].mean()).item()


@torch.no_grad()
def heldout_margin(module: PreferenceModule, train_weights) -> float:
    """Mean chosen-minus-rejected log-ratio to the reference on 64 pairs the run never saw."""
    pairs = pair_data(train_weights, train_stream="heldout-pairs").train_blocks().pairs(torch.arange(64))
    ratio = {h: sequence_logps(module.gpt.eval(), pairs[h]) - sequence_logps(module.reference, pairs[h])
             for h in ("chosen_ids", "rejected_ids")}
    return (ratio["chosen_ids"] - ratio["rejected_ids"]).mean().item()


# ---- data ------------------------------------------------------------------------------------------
def test_pairs_come_from_the_chosen_and_rejected_sets_and_repeat_for_a_seed():
    blocks = pair_data([1.0, 0.0, 0.0]).train_blocks()
    batch = blocks.batch(2)
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (8, CONTEXT)
    assert (batch["chosen_ids"][:, 0] == WorldConfig(**TINY_WORLD).bos_id).all()
    assert (batch["chosen_tasks"] == 0).all() and (batch["rejected_tasks"] != 0).all()
    rejected = blocks.pairs(torch.arange(400))["rejected_tasks"]  # the others, in the world's (uniform) proportions
    assert set(rejected.tolist()) == {1, 2} and 0.4 < (rejected == 1).float().mean() < 0.6
    assert torch.equal(pair_data([1.0, 0.0, 0.0]).train_blocks().batch(2)["chosen_ids"], batch["chosen_ids"])
    flipped = pair_data([0.0, 0.5, 0.5]).train_blocks().batch(2)  # disfavour task 0: the reverse roles
    assert (flipped["chosen_tasks"] != 0).all() and (flipped["rejected_tasks"] == 0).all()
    assert pair_data([1.0, 0.0, 0.0], pair_length=16).train_blocks().batch(0)["chosen_ids"].shape == (8, 16)


def test_pairs_are_a_finite_amount_sharded_by_rank_and_resumable():
    blocks = pair_data([1.0, 0.0, 0.0], batch_size=4, train_documents=12).train_blocks()
    take = lambda stream, n: [b["pair_ids"] for b in itertools.islice(iter(DataLoader(stream, batch_size=None)), n)]  # noqa: E731
    single = take(BlockStream(blocks), 6)
    assert sorted(torch.cat(single[:3]).tolist()) == list(range(12)) == sorted(torch.cat(single[3:]).tolist())
    ranks = [take(BlockStream(blocks, rank=r, world_size=2), 3) for r in range(2)]
    assert all(torch.equal(a, b) for r in range(2) for a, b in zip(ranks[r], single[r::2]))
    assert torch.equal(take(BlockStream(blocks, start=4), 1)[0], single[4])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(train_weights=None), "needs a chosen mixture"),
        (dict(train_weights=[1.0, 0.0, 0.0], rejected_weights=[1.0, 0.0, 0.0]), "both chosen and rejected"),
        (dict(train_weights=[1.0, 1.0, 1.0]), "nothing is left to reject"),
        (dict(train_weights=[1.0, 0.0, 0.0], pair_length=64), "pair_length must be in"),
    ],
)
def test_bad_preference_data_fails_with_one_line(kw, message):
    with pytest.raises(WorldConfigError, match=message) as err:
        pair_data(**kw)
    assert "\n" not in str(err.value)


# ---- training --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_favour_raises_the_task_and_disfavour_lowers_it(pretrained):
    favour, trainer = dpo_run(pretrained, [1.0, 0.0, 0.0])
    disfavour, _ = dpo_run(pretrained, [0.0, 0.5, 0.5])
    loglik = {"pretrained": task_loglik(CausalLMModule.load_from_checkpoint(pretrained, map_location="cpu").gpt),
              "favour 0": task_loglik(favour.gpt), "disfavour 0": task_loglik(disfavour.gpt)}
    # the policy now prefers held-out chosen documents over rejected ones, relative to the reference (0 at the start)
    margins = {"pretrained": 0.0, "favour 0": heldout_margin(favour, [1.0, 0.0, 0.0]),
               "disfavour 0": heldout_margin(disfavour, [0.0, 0.5, 0.5])}
    for name, ll in loglik.items():  # the table in docs/guide.md: pytest -s shows it
        print(f"{name:12} log-lik/token of tasks 0, 1, 2: {ll.numpy().round(3)}, "
              f"task 0 minus others {relative(ll, 0):+.3f}, held-out margin {margins[name]:.3g}")
    before, after_favour, after_disfavour = (relative(ll, 0) for ll in loglik.values())
    assert after_favour > before + 0.05 and after_disfavour < before - 0.05
    assert margins["favour 0"] > 1.0 and margins["disfavour 0"] > 1.0
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/reward_acc", "train/reward_chosen", "train/reward_rejected", "train/margin",
                 "train/kl", "lr", "val/loss"):
        assert torch.isfinite(logged[name]), name
    assert logged["train/margin"] > 0 and logged["train/kl"] > 0
    assert favour.reference_cache is not None  # 240 pairs trained of 64: the reference was scored once per pair
    # validation measured the ICL curves exactly as the causal-LM module does: every task, every shot count
    assert ({r["task"] for r in favour.last_curve_rows} == {0, 1, 2}
            and all(r["count"] == 4 for r in favour.last_curve_rows))


def test_reference_stays_frozen_and_out_of_the_optimizer(pretrained):
    start = CausalLMModule.load_from_checkpoint(pretrained, map_location="cpu").gpt.state_dict()
    module, trainer = dpo_run(pretrained, [1.0, 0.0, 0.0], steps=10, loss="ipo")
    assert not module.reference.training and not any(p.requires_grad for p in module.reference.parameters())
    assert all(torch.equal(v, start[k]) for k, v in module.reference.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in module.gpt.state_dict().items())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in module.reference.parameters()}


def test_checkpoint_holds_the_policy_only_and_resumes_with_the_same_reference(pretrained, tmp_path):
    module, trainer = dpo_run(pretrained, [1.0, 0.0, 0.0], steps=4)
    path = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(path)
    assert not any(k.startswith("reference.") for k in torch.load(path, weights_only=False)["state_dict"])
    evaluated = load_model(path)  # what `evaluate.py curves --ckpt` scores
    assert all(torch.equal(v, module.gpt.state_dict()[k]) for k, v in evaluated.state_dict().items())
    data = pair_data([1.0, 0.0, 0.0])
    resumed = dpo_module(data, init_from=pretrained)
    again = L.Trainer(max_steps=6, **TRAINER)
    again.fit(resumed, data, ckpt_path=path)
    start = CausalLMModule.load_from_checkpoint(pretrained, map_location="cpu").gpt.state_dict()
    assert again.global_step == 6 and all(torch.equal(v, start[k]) for k, v in resumed.reference.state_dict().items())


def test_cached_reference_trains_like_the_live_one(pretrained):
    cached, _ = dpo_run(pretrained, [1.0, 0.0, 0.0], steps=12, cache_reference=True)  # 96 pairs seen of 64: revisited
    live, _ = dpo_run(pretrained, [1.0, 0.0, 0.0], steps=12, cache_reference=False)
    assert (cached.reference_cache is not None and cached.reference_cache.shape == (2, 64)
            and live.reference_cache is None)
    pairs = pair_data([1.0, 0.0, 0.0]).train_blocks().pairs(torch.arange(64))
    with torch.no_grad():
        assert torch.allclose(cached.reference_cache[0], sequence_logps(cached.reference, pairs["chosen_ids"]),
                              atol=1e-4)
    for (name, a), b in zip(cached.gpt.state_dict().items(), live.gpt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_bad_model_settings_fail_before_training(pretrained):
    with pytest.raises(ModelConfigError, match="beta must be > 0"):
        PreferenceModule(beta=0.0, init_from=pretrained, **TINY_ARCH)
    with pytest.raises(ModelConfigError, match="unknown model.loss"):
        PreferenceModule(loss="kto", init_from=pretrained, **TINY_ARCH)
    with pytest.raises(ModelConfigError, match="cache_reference needs a finite set of pairs"):
        dpo_module(pair_data([1.0, 0.0, 0.0], train_documents=None), init_from=pretrained, cache_reference=True)
    data = pair_data([1.0, 0.0, 0.0])
    with pytest.raises(ModelConfigError, match="starts from a pretrained model"):
        L.Trainer(max_steps=1, **TRAINER).fit(dpo_module(data), data)


# ---- train.py ----------------------------------------------------------------------------------------
def cli(tmp_path, *extra: str) -> int:
    return train.main([*TINY_FIT, "--config", "configs/dpo-favor.yaml",
                       "--run.root", str(tmp_path / "runs"),
                       "--trainer.precision", "32-true", "--data.num_workers", "0", "--data.batch_size", "8", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "stage dpo starts from a pretrained model: set model.init_from"),
        (["--model.beta", "0"], "model.beta must be > 0"),
        (["--data.rejected_weights", "[1.0, 0.0, 0.0]"], "task(s) [0] are both chosen and rejected"),
    ],
)
def test_cli_bad_input_gives_one_error_line(tmp_path, capsys, pretrained, extra, message):
    init = [] if not extra else ["--model.init_from", pretrained]
    assert cli(tmp_path, *init, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-3:]
    assert not any((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_cli_dpo_run_writes_curves_labelled_dpo(tmp_path, pretrained):
    assert cli(tmp_path, "--model.init_from", pretrained, "--run.name", "dpo", "--trainer.max_steps", "4",
               "--trainer.val_check_interval", "4", "--data.train_documents", "16", "--model.loss", "ipo") == 0
    run = tmp_path / "runs" / "dpo"
    with (run / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["step"] for r in rows} == {"0", "4"}  # before training and after it
    assert ({(r["run"], r["method"], r["direction"], r["amount"], r["target"]) for r in rows}
            == {("gpt2-1l-d32/dpo-favor-16", "dpo", "favor", "16", "0")})
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"]) and ckpt["hyper_parameters"]["loss"] == "ipo"
    # what the data fixes came linked from the datamodule; the pairs themselves are data, not a hyperparameter
    hparams = ckpt["hyper_parameters"]
    assert hparams["vocab_size"] == WorldConfig(**TINY_WORLD).model_vocab_size and "train_pairs" not in hparams
    assert hparams["icl_eval"] == {"k_values": [2, 3], "n_tasks": 3, "max_shots": 10}  # 10 shots of k=2 fill 32 tokens


def test_a_dpo_checkpoint_of_non_finite_weights_is_refused(pretrained, tmp_path):
    """The weight check every stage gets: DPO's own on_save_checkpoint used to skip it."""
    from lightning_modules.lm_module import NonFiniteError

    module, trainer = dpo_run(pretrained, [1.0, 0.0, 0.0], steps=2)
    with torch.no_grad():
        next(module.gpt.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="the weights became non-finite"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
