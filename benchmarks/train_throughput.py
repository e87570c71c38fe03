"""Training and ICL-evaluation speed: the HF Trainer stack (as the research code used it) vs our Lightning path.

In one run, on one device, for each size in --layers (GPT-2 d=768, 12 heads, context 1024, vocabulary 52):
  HF Trainer  fp32, eager attention, batch 8, the Trainer's default AdamW, a map-style dataset of
              pre-generated GINC blocks
  ours        CausalLMModule + GincDataModule + lightning.Trainer: bf16-mixed, SDPA, fused AdamW,
              torch.compile, batches streamed from data workers (on a CPU: fp32, no compile, no workers)
Both are timed over --steps optimizer steps after --warmup steps (compilation falls in the warm-up), with
the device synchronised at both edges, and print tokens/s and MFU. MFU = model FLOP/s / the device's dense
bf16 peak, with 6 * N_non-embedding + 12 * n_layer * d * T FLOPs per token (PaLM, Chowdhery et al. 2022,
appendix B). The step after the window runs under CUDA's sync debug mode and reports host syncs.

Then one full ICL evaluation at the largest size (4 k x 5 tasks x --eval-prompts prompts, shots filling
the context), both from the same weights and the same prompts: ours is the module's validation
(label positions scored on the device, batched) and the peer is `transformers.Trainer.predict` (fp32,
eager, batch 8) returning the full logits to the CPU, where the label positions are picked. Both times
include building the prompts. `--loss-check` also trains both stacks for --loss-steps steps from the same
initial weights, on the same batches in the same order, with the same AdamW and schedule, and compares
their losses. The last line is `ratio_vs_hf_trainer: X`, ours / HF tokens/s, the smaller over the sizes.

    python benchmarks/train_throughput.py                 # 4 and 12 layers on the GPU (a few minutes)
    python benchmarks/train_throughput.py --loss-check    # plus the loss curves of 200 steps at 4 layers
    python benchmarks/train_throughput.py --smoke         # tiny model on the CPU, seconds (CI)
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch._dynamo.utils import counters
from transformers import GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils.logging import disable_progress_bar

from datamodules.ginc_datamodule import DocumentBlocks, GincDataModule, ICLConfig, ICLPromptSet
from datamodules.sampling import shots_for_context
from datamodules.world import WorldConfig
from lightning_modules.icl_metric import ICLCurveMetric, curve_rows
from lightning_modules.lm_module import CausalLMModule, OptimConfig, adamw_with_schedule, data_arguments
from models.gpt import GPTSpec, build_gpt, resolve_device, resolve_spec

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; first match of the name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
K_VALUES = [3, 5, 8, 10]
_START = time.perf_counter()


def say(msg: str) -> None:
    # a partial log is useful when the device time runs out
    print(f"{time.perf_counter() - _START:6.1f}s  {msg}", flush=True)


@dataclass
class BenchConfig:
    layers: list[int]
    n_embd: int = 768
    n_head: int = 12
    context: int = 1024
    warmup: int = 10
    steps: int = 30
    hf_batch: int = 8  # the Trainer's default per-device batch
    batch: int = 32  # ours
    workers: int = 4
    eval_prompts: int = 200  # per (k, task)
    eval_batch: int = 50  # ours; the peer keeps the Trainer's default eval batch of 8
    loss_steps: int = 200
    peak_tflops: float | None = None

    def spec(self, n_layer: int) -> GPTSpec:
        return resolve_spec("gpt2-4l", n_layer=n_layer, n_embd=self.n_embd, n_head=self.n_head,
                            n_positions=self.context)


# the counts that must be at least 1: their flags' help (the default shown is BenchConfig's)
COUNTS = {"warmup": "untimed optimizer steps first", "steps": "timed optimizer steps", "batch": "our batch size",
          "eval_prompts": "ICL prompts per (k, task)", "loss_steps": "steps of the loss check"}
SMOKE = dict(layers=[2], n_embd=64, n_head=4, context=128, warmup=1, steps=2, batch=8, workers=0, eval_prompts=2,
             eval_batch=4, loss_steps=4)


# ---- what is measured ------------------------------------------------------------------------------
def peak_for_name(name: str) -> tuple[float, str] | None:
    """(dense bf16 TFLOP/s, table key) of a GPU by its CUDA name, or None when unknown."""
    return next(((tflops, key) for key, tflops in PEAK_TFLOPS if key in name), None)


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The peak MFU divides by (FLOP/s) and where it came from; None on a CPU or an unknown GPU."""
    if override is not None:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on a CPU"
    name = torch.cuda.get_device_name(device)
    known = peak_for_name(name)
    if known is None:
        return None, f"unknown for {name!r}: pass --peak-tflops"
    return known[0] * 1e12, f"{known[0]:g} TFLOP/s, dense bf16 of {known[1]} (from {name!r})"


def flops_per_token(model: GPT2LMHeadModel, spec: GPTSpec) -> float:
    """6 N + 12 L d T: N excludes the token and position embeddings (the tied LM head is the token table)."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if not name.startswith(("transformer.wte", "transformer.wpe")))
    return 6 * n + 12 * spec.n_layer * spec.n_embd * spec.n_positions


class Window:
    """Wall clock between the end of optimizer step `warmup` and of step `warmup + steps`, device synchronised."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.start, self.end, self.device = warmup, warmup + steps, device
        self.times: dict[int, float] = {}

    def mark(self, step: int) -> None:
        if step in (self.start, self.end):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[step] = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.times[self.end] - self.times[self.start]


class HFClock(TrainerCallback):
    def __init__(self, window: Window) -> None:
        self.window = window

    def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001 (HF's callback signature)
        self.window.mark(state.global_step)


class LightningClock(L.Callback):
    """Marks the window, keeps every step's loss (a device tensor) and counts host syncs in the step after the window.

    It also sums the host time from the end of one step to the start of the next inside the window (the
    batch fetch from the workers, its transfer and Lightning's hooks): where that stays small, data never
    holds the step up.
    """

    def __init__(self, window: Window) -> None:
        self.window, self.losses = window, []
        self.syncs: int | None = None  # None: not measured (CPU)
        self.between_steps = 0.0
        self._catcher: warnings.catch_warnings | None = None
        self._ended = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        if self.window.start <= trainer.global_step < self.window.end:
            self.between_steps += time.perf_counter() - self._ended
        if trainer.global_step == self.window.end and self.window.device.type == "cuda":
            self._catcher = warnings.catch_warnings(record=True)
            self._seen = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: dict,
                           batch_idx: int) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
            synced = [w for w in self._seen if "synchroniz" in str(w.message)]
            self.syncs = len(synced)
            for w in synced[:3]:
                say(f"    host sync: {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")
        self.losses.append(outputs["loss"].detach())
        self.window.mark(trainer.global_step)
        self._ended = time.perf_counter()


# ---- the two stacks --------------------------------------------------------------------------------
def hf_model(spec: GPTSpec, world: WorldConfig, init_dir: Path) -> GPT2LMHeadModel:
    """The baseline's GPT-2 from seed 0 (our architecture, HF's eager attention), saved to `init_dir`
    for ours to start from."""
    torch.manual_seed(0)
    model = build_gpt(spec, world.model_vocab_size, bos_id=world.bos_id, pad_id=world.pad_id)
    model.set_attn_implementation("eager")
    model.save_pretrained(init_dir)
    return model


def block_dataset(world: WorldConfig, context: int, batch: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """Pre-generated blocks in stream order: item j is the j-th block ours trains on at the same batch size.

    Labels mask the first position, which the shifted loss never predicts: the Trainer divides the summed
    loss by the count of unmasked labels, so this makes its loss the mean over targets, as ours is.
    """
    blocks = DocumentBlocks(world, context, batch, None, "pretrain")
    rows = [row for i in range(n_batches) for row in blocks.batch(i)["input_ids"]]
    return [{"input_ids": row, "labels": torch.cat([row.new_full((1,), -100), row[1:]])} for row in rows]


def hf_trainer(model: GPT2LMHeadModel, out: str, batch: int, max_steps: int, device: torch.device,
               dataset: list | None = None, callbacks: list[TrainerCallback] | None = None,
               optimizers: tuple = (None, None), **overrides: object) -> Trainer:
    """A Trainer with its defaults but for the batch, the steps and no checkpoints, reports or progress prints."""
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=max_steps, save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu", **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks, optimizers=optimizers)
    trainer.remove_callback(PrinterCallback)
    return trainer


def precision(device: torch.device) -> str:
    """bf16-mixed on a GPU; fp32 on a CPU, where bf16 without hardware support is slower than fp32."""
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def lightning_trainer(device: torch.device, callbacks: list[L.Callback], **kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator=device.type, devices=1, precision=precision(device), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, **kwargs)


def ours_module(spec: GPTSpec, init_dir: Path, cfg: BenchConfig, world: WorldConfig,
                optim: OptimConfig | None = None) -> CausalLMModule:
    """Built for the world and the ICL prompts `eval_ours` scores."""
    return CausalLMModule(size="gpt2-4l", n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head,
                          n_positions=spec.n_positions, init_from=str(init_dir), optim=optim,
                          **data_arguments(eval_data(cfg, world)))


def train_ours(module: CausalLMModule, cfg: BenchConfig, world: WorldConfig, device: torch.device, batch: int,
               window: Window) -> LightningClock:
    clock = LightningClock(window)
    data = GincDataModule(world=world, context_length=cfg.context, batch_size=batch, num_workers=cfg.workers)
    trainer = lightning_trainer(device, [clock], max_steps=window.end + 1, limit_val_batches=0, num_sanity_val_steps=0,
                                gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)
    return clock


# ---- ICL evaluation --------------------------------------------------------------------------------
def icl_config(cfg: BenchConfig, batch: int) -> ICLConfig:
    return ICLConfig(k_values=K_VALUES, prompts_per_task=cfg.eval_prompts, batch_size=batch)


def eval_data(cfg: BenchConfig, world: WorldConfig) -> GincDataModule:
    """The ICL prompts alone (val_documents=0: no loss blocks)."""
    return GincDataModule(world=world, context_length=cfg.context, val_documents=0, icl=icl_config(cfg, cfg.eval_batch))


def eval_ours(module: CausalLMModule, cfg: BenchConfig, world: WorldConfig,
              device: torch.device) -> tuple[float, list[dict]]:
    """The module's validation on the ICL prompts alone."""
    start = time.perf_counter()
    lightning_trainer(device, []).validate(module, datamodule=eval_data(cfg, world), verbose=False)
    return time.perf_counter() - start, module.last_curve_rows


def eval_full_logits(model: GPT2LMHeadModel, cfg: BenchConfig, world: WorldConfig, device: torch.device,
                     out: str) -> tuple[float, float, list[dict]]:
    """Trainer.predict's full logits on the CPU, label positions picked there;
    returns (seconds, prompt seconds, rows)."""
    start = time.perf_counter()
    prompts = ICLPromptSet(world, icl_config(cfg, cfg.hf_batch), cfg.context)  # items of one (k, task) each
    prompt_seconds = time.perf_counter() - start
    trainer = hf_trainer(model, out, cfg.hf_batch, 1, device)
    metric = ICLCurveMetric(K_VALUES, world.n_tasks, max(shots_for_context(cfg.context, k) for k in K_VALUES))
    for k in K_VALUES:  # one predict call per prompt length, as batches of unpadded prompts must share it
        items = [item for item in prompts.items if item["k"] == k]
        preds = trainer.predict([{"input_ids": row} for item in items for row in item["input_ids"]]).predictions
        logits = preds[0] if isinstance(preds, tuple) else preds  # [N, T, V] numpy, whatever extra outputs came along
        first = 0
        for item in items:
            n, labels = len(item["labels"]), item["labels"]
            at = (item["label_pos"] - 1)[..., None].expand(-1, -1, logits.shape[-1])
            logp = torch.from_numpy(logits[first:first + n]).gather(1, at).log_softmax(-1)
            metric.update(k, item["task"], logp.gather(-1, labels[..., None]).squeeze(-1), logp.argmax(-1) == labels)
            first += n
    return time.perf_counter() - start, prompt_seconds, curve_rows(metric.compute(), K_VALUES, run="")


def max_prob_gap(a: list[dict], b: list[dict]) -> float:
    """Largest difference of mean label probability between two curve tables of the same prompts."""
    other = {(r["k"], r["task"], r["shots"]): r["prob"] for r in b}
    if len(other) != len(a) or not a:
        raise RuntimeError(f"the two evaluations scored different prompts ({len(a)} vs {len(other)} curve points)")
    return max(abs(r["prob"] - other[r["k"], r["task"], r["shots"]]) for r in a)


# ---- the run ---------------------------------------------------------------------------------------
def throughput(cfg: BenchConfig, n_layer: int, world: WorldConfig, device: torch.device, peak: float | None,
               evaluate: bool, tmp: Path) -> float:
    """Both stacks at one size (and the ICL evaluation if asked); returns ours / HF tokens/s."""
    spec = cfg.spec(n_layer)
    model = hf_model(spec, world, tmp / "init")
    fpt = flops_per_token(model, spec)

    def report(name: str, tokens_per_s: float, detail: str) -> None:
        mfu = f"{100 * tokens_per_s * fpt / peak:.1f}%" if peak else "n/a"
        say(f"[{n_layer} layers] {name:<10} {tokens_per_s:>12,.0f} tokens/s   MFU {mfu:>6}   {detail}")

    window = Window(cfg.warmup, cfg.steps, device)
    say(f"[{n_layer} layers] HF Trainer: {window.end} steps of batch {cfg.hf_batch} ...")
    hf = hf_trainer(model, str(tmp / "hf"), cfg.hf_batch, window.end, device,
                    block_dataset(world, cfg.context, cfg.hf_batch, window.end), [HFClock(window)])
    hf.train()
    hf_tps = cfg.steps * cfg.hf_batch * cfg.context / window.seconds
    report("HF Trainer", hf_tps, f"fp32, eager attention, batch {cfg.hf_batch}, {hf.args.optim.value}")

    window = Window(cfg.warmup, cfg.steps, device)
    say(f"[{n_layer} layers] ours: {window.end} steps of batch {cfg.batch} (compiling in the warm-up on a GPU) ...")
    module = ours_module(spec, tmp / "init", cfg, world)
    counters.clear()
    clock = train_ours(module, cfg, world, device, cfg.batch, window)
    ours_tps = cfg.steps * cfg.batch * cfg.context / window.seconds
    on_gpu = device.type == "cuda"  # the module compiles exactly when it runs on a GPU (compile=None)
    syncs = "n/a (CPU)" if clock.syncs is None else str(clock.syncs)
    breaks = f", graph breaks {sum(counters['graph_break'].values())}" if on_gpu else ""
    report("ours", ours_tps, f"{precision(device)}, SDPA, fused AdamW={on_gpu}, compile={on_gpu}{breaks}, "
                             f"batch {cfg.batch}, {cfg.workers} workers "
                             f"({1e3 * clock.between_steps / cfg.steps:.1f} ms/step between steps); "
                             f"host syncs in one step: {syncs}")

    if evaluate:
        n_prompts = len(K_VALUES) * world.n_tasks * cfg.eval_prompts
        say(f"[{n_layer} layers] ICL evaluation: {len(K_VALUES)} k x {world.n_tasks} tasks x "
            f"{cfg.eval_prompts} prompts = {n_prompts} ...")
        ours_s, ours_rows = eval_ours(module, cfg, world, device)
        model.load_state_dict(module.gpt.state_dict())  # the peer scores the same weights
        peer_s, prompt_s, peer_rows = eval_full_logits(model, cfg, world, device, str(tmp / "predict"))
        say(f"ICL eval ({n_layer} layers, {n_prompts} prompts): ours {ours_s:.2f} s "
            f"(batch {cfg.eval_batch}, {precision(device)}, label positions only)   "
            f"Trainer.predict full logits {peer_s:.2f} s (fp32, eager, batch {cfg.hf_batch})   "
            f"ratio {peer_s / ours_s:.1f}x   (both include {prompt_s:.2f} s of prompt sampling)   "
            f"max |prob ours - prob full logits| = {max_prob_gap(ours_rows, peer_rows):.1e}")
    return ours_tps / hf_tps


def loss_check(cfg: BenchConfig, n_layer: int, world: WorldConfig, device: torch.device, tmp: Path) -> None:
    """Both stacks from the same weights on the same batches with the same AdamW and schedule; losses compared."""
    spec, steps, batch = cfg.spec(n_layer), cfg.loss_steps, cfg.hf_batch
    optim = OptimConfig(warmup_steps=max(1, steps // 10), total_steps=steps)
    say(f"[loss check, {n_layer} layers] {steps} steps of batch {batch}, lr {optim.lr} "
        f"(warm-up {optim.warmup_steps}, cosine), both stacks ...")
    model = hf_model(spec, world, tmp / "init")
    opt = adamw_with_schedule(model, optim, steps, fused=device.type == "cuda")
    hf = hf_trainer(model, str(tmp / "hf"), batch, steps, device, block_dataset(world, cfg.context, batch, steps),
                    optimizers=(opt["optimizer"], opt["lr_scheduler"]["scheduler"]), logging_steps=1,
                    train_sampling_strategy="sequential")
    hf.train()
    hf_loss = [h["loss"] for h in hf.state.log_history if "loss" in h]

    clock = train_ours(ours_module(spec, tmp / "init", cfg, world, optim), cfg, world, device, batch,
                       Window(0, steps - 1, device))
    ours_loss = [float(x) for x in clock.losses[:steps]]
    shown = sorted({1, steps // 4, steps // 2, 3 * steps // 4, steps} - {0})
    say("  step " + "".join(f"{s:>9}" for s in shown))
    say("  HF   " + "".join(f"{hf_loss[s - 1]:>9.4f}" for s in shown))
    say("  ours " + "".join(f"{ours_loss[s - 1]:>9.4f}" for s in shown))
    tail = min(20, steps)
    diffs = torch.tensor(ours_loss[-tail:]) - torch.tensor(hf_loss[-tail:])
    se = diffs.std().item() / math.sqrt(tail) if tail > 1 else float("nan")
    say(f"  loss_difference (ours - HF, mean of the last {tail} steps): {diffs.mean().item():+.4f} +- {se:.4f} "
        f"(s.e.)   first step: {ours_loss[0] - hf_loss[0]:+.4f}")


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="2 layers, d=64, context 128, a few steps: seconds on a CPU (CI)")
    p.add_argument("--layers", type=int, nargs="+", help="model depths (default 4 12; smoke: 2)")
    for name, text in COUNTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{text} (default {getattr(BenchConfig, name)})")
    p.add_argument("--workers", type=int, help="our data workers (default 4 on a GPU, 0 on a CPU)")
    p.add_argument("--loss-check", action="store_true",
                   help="also compare the loss curves of both stacks at the smallest size")
    p.add_argument("--peak-tflops", type=float,
                   help="the peak to divide by for MFU (default: known GPUs' dense bf16 peak)")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k not in ("smoke", "loss_check")}
    cfg = BenchConfig(**{**(SMOKE if a.smoke else {"layers": [4, 12]}), **given})
    if "workers" not in given and not a.smoke and not torch.cuda.is_available():
        cfg.workers = 0
    # (flag, value, rule, whether it holds)
    rules = [*((name, getattr(cfg, name), "be >= 1", getattr(cfg, name) >= 1) for name in COUNTS),
             ("layers", cfg.layers, "all be >= 1", min(cfg.layers) >= 1),
             ("workers", cfg.workers, "be >= 0", cfg.workers >= 0),
             ("peak_tflops", cfg.peak_tflops, "be > 0", cfg.peak_tflops is None or cfg.peak_tflops > 0)]
    for name, value, rule, ok in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {value}")
    return cfg, a.loss_check


def main(argv: list[str] | None = None) -> None:
    try:
        cfg, with_loss_check = parse(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)  # keep the log to the benchmark's own lines
    disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(resolve_device("auto"))
    if device.type == "cpu":
        # CPU numbers only show the paths run; threads spinning against other jobs made them 10x slower
        torch.set_num_threads(1)
    peak, peak_label = peak_flops(device, cfg.peak_tflops)
    world = WorldConfig()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"device: {name}   torch {torch.__version__}   MFU peak: {peak_label}")
    say("MFU: model FLOP/s over the peak, 6 * N_non-embedding + 12 * n_layer * d * T FLOPs per token "
        "(PaLM, appendix B)")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_layer in cfg.layers:
            ratios.append(throughput(cfg, n_layer, world, device, peak, n_layer == max(cfg.layers),
                                     Path(tmp) / f"l{n_layer}"))
            gc.collect()  # the size's models went with its call: free them before the next size
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if with_loss_check:
            loss_check(cfg, min(cfg.layers), world, device, Path(tmp) / "loss")
    say(f"ratio_vs_hf_trainer: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
