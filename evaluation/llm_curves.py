"""ICL curves of a pretrained causal LM on disk, from many-shot prompts (`evaluate.py curves --hf-model`).

For each answer type (the "task"), several shuffles of that type's rows become many-shot prompts;
ONE forward pass per prompt scores every demonstration's answer at once (causal attention makes the
logits at a position depend only on the prefix, so this equals one pass per shot). A point of the
curve is the joint probability of the first k answer tokens given everything before them.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from contracts.curves_table import curve_row
from contracts.run_artifacts import DATA_FILE
from evaluation.manyshot import ManyShotPrompt, Shot, build_prompt, load_shots, resolve_format
from models.gpt import resolve_device
from user_errors import UserError

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class LLMCurveConfig:
    """How the many-shot prompts of one model are built and scored.

    Args:
        run: run label of the rows
        ks: answer tokens scored; one forward pass serves every k
        shuffles: prompts per answer type
        shots: demonstrations per prompt; None: all rows of the type that fit
        max_length: prompt tokens; None: the model's context length
        prompt_format: chat template or plain User:/Assistant: turns; auto: chat when the tokenizer has a template
        seed: seed of the shuffles
        batch_size: prompts per forward pass (long prompts take memory: 1-4)
    """

    run: str
    ks: tuple[int, ...] = (1,)
    shuffles: int = 5
    shots: int | None = None
    max_length: int | None = None
    prompt_format: str = "auto"
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("ks", "shuffles", "shots", "max_length", "batch_size"):
            values = getattr(self, name)
            for value in values if name == "ks" else [values]:
                if value is not None and value < 1:
                    raise UserError(f"{name} {value}: must be a positive integer (LLMCurveConfig.{name})")
        if not self.ks:
            raise UserError("ks: give at least one number of answer tokens to score (LLMCurveConfig.ks)")


@dataclass
class PromptScores:
    """Per demonstration of one prompt: log-prob and argmax hit of each of its first k_max answer tokens.

    Columns past an answer's length hold log-prob 0 and hit True, so a sum over the first k columns
    is the joint over min(k, answer length) tokens.
    """

    logp: torch.Tensor  # (shots, k_max) float64
    hit: torch.Tensor  # (shots, k_max) bool


def load_local_lm(model_dir: str | Path, device: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, never from the network.

    bf16 on GPU, float32 on CPU; spread over GPUs with device_map="auto" when the weights do not fit
    the first GPU's free memory (which needs accelerate).
    """
    model_dir = Path(model_dir)
    hint = "give a model directory written by save_pretrained (config.json, weights, tokenizer files)"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model directory {model_dir}: no config.json there; {hint}")
    weight_bytes = sum(f.stat().st_size for pattern in _WEIGHT_PATTERNS for f in model_dir.glob(pattern))
    if weight_bytes == 0:
        raise UserError(f"model directory {model_dir}: no weight files (*.safetensors or *.bin); {hint}")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"model directory {model_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); {hint}")
    device = resolve_device(device)
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise UserError(f"device {device}: no GPU is visible; use the device cpu or auto")
    kwargs: dict = {"local_files_only": True, "dtype": torch.bfloat16 if on_gpu else torch.float32}
    if on_gpu and torch.cuda.device_count() > 1 and weight_bytes > 0.8 * torch.cuda.mem_get_info(0)[0]:
        try:
            import accelerate  # noqa: F401  (device_map needs it)
        except ImportError:
            raise UserError(f"model directory {model_dir}: {weight_bytes / 2**30:.1f} GiB of weights need several "
                            "GPUs; pip install accelerate") from None
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:  # corrupt or foreign files fail in many library-specific ways; name the first line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model directory {model_dir}: cannot load it ({reason}); {hint}") from None
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval(), tokenizer


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest prompt the model takes: its position limit, or the tokenizer's when smaller."""
    limits = [getattr(model.config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**8]
    if not limits:
        raise UserError("the model declares no context length; give max_length, the prompt tokens")
    return min(limits)


def group_by_type(shots: Sequence[Shot], n_shots: int | None) -> dict[str, list[Shot]]:
    """Rows per answer type, types in sorted order (a type's index is its task); checks each has n_shots rows."""
    by_type: dict[str, list[Shot]] = {}
    for shot in shots:
        by_type.setdefault(shot.answer_type, []).append(shot)
    for name, rows in sorted(by_type.items()):
        if n_shots is not None and n_shots > len(rows):
            raise UserError(f"answer type '{name}' has {len(rows)} rows but shots asks for {n_shots}; lower shots or "
                            "add rows")
    return {name: by_type[name] for name in sorted(by_type)}


def build_prompts(tokenizer: PreTrainedTokenizerBase, by_type: dict[str, list[Shot]], config: LLMCurveConfig,
                  max_length: int) -> dict[str, list[ManyShotPrompt]]:
    """`config.shuffles` prompts per answer type, each a seeded shuffle of that type's rows."""
    prompt_format = resolve_format(tokenizer, config.prompt_format)
    prompts: dict[str, list[ManyShotPrompt]] = {}
    for t, (name, rows) in enumerate(by_type.items()):
        prompts[name] = []
        for s in range(config.shuffles):
            order = np.random.default_rng([config.seed, t, s]).permutation(len(rows))[: config.shots]
            prompts[name].append(build_prompt(tokenizer, [rows[i] for i in order], prompt_format, max_length))
    return prompts


@torch.no_grad()
def score_prompts(model: PreTrainedModel, prompts: Sequence[ManyShotPrompt], k_max: int,
                  batch_size: int = 4) -> list[PromptScores]:
    """Score the first k_max tokens of every answer of every prompt, one forward pass per batch of prompts."""
    device = model.get_input_embeddings().weight.device
    # Only the logits at scored positions are projected onto the vocabulary when the model allows it:
    # full logits of long prompts would dwarf the model's own memory.
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    scores: list[PromptScores | None] = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[b : b + batch_size]]
        length = max(len(p.input_ids) for p in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        targets = []  # per prompt: (shots, k_max) positions of scored tokens, -1 past an answer's end
        for row, p in enumerate(batch):
            ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[row, : len(p.input_ids)] = 1
            pos = torch.full((len(p.answer_spans), k_max), -1, dtype=torch.long)
            for j, (start, end) in enumerate(p.answer_spans):
                n = min(k_max, end - start)
                pos[j, :n] = torch.arange(start, start + n)
            targets.append(pos)
        # The logits that predict token at position q sit at q - 1. The index stays on the CPU: with a
        # device_map the last layers, and so the logits, may sit on another GPU than the inputs.
        needed = torch.unique(torch.cat([pos[pos >= 0] for pos in targets]) - 1)
        kwargs = {"logits_to_keep": needed} if keep_arg else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        if not keep_arg:
            logits = logits[:, needed]
        out = logits.device
        ids = ids.to(out)
        slot = torch.full((length,), -1, dtype=torch.long)
        slot[needed] = torch.arange(len(needed))
        # Per prompt, on the device: only (shots, k_max) numbers travel back, never vocabulary-sized rows.
        for row, pos in enumerate(targets):
            valid = pos >= 0
            at = slot[(pos - 1).clamp(min=0)].to(out)
            token = ids[row, pos.clamp(min=0).to(out)]
            logp = torch.log_softmax(logits[row, at].float(), dim=-1)
            lp = logp.gather(-1, token[..., None])[..., 0].double().cpu()
            hit = (logp.argmax(-1) == token).cpu()
            scores[order[b + row]] = PromptScores(torch.where(valid, lp, 0.0), torch.where(valid, hit, True))
    return scores


def answer_type_rows(scores: dict[str, list[PromptScores]], config: LLMCurveConfig) -> list[dict]:
    """Average the prompts of each answer type (task) into curve rows, one per (k, task, shots)."""
    rows = []
    for task, name in enumerate(sorted(scores)):
        for k in config.ks:
            by_shot: dict[int, list[tuple[float, bool]]] = {}
            for s in scores[name]:
                joint = s.logp[:, :k].sum(-1)
                hits = s.hit[:, :k].all(-1)
                for shot, (lp, hit) in enumerate(zip(joint.tolist(), hits.tolist())):
                    by_shot.setdefault(shot, []).append((lp, hit))
            for shot, vals in sorted(by_shot.items()):
                lps = [lp for lp, _ in vals]
                rows.append(curve_row(config.run, k, task, shot, sum(math.exp(lp) for lp in lps) / len(vals),
                                      -sum(lps) / len(vals), sum(hit for _, hit in vals) / len(vals), len(vals),
                                      answer_type=name))
    return rows


def llm_curve_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, by_type: dict[str, list[Shot]],
                   config: LLMCurveConfig) -> list[dict]:
    """Build the prompts, score them and return the curve rows; reports the time per prompt on stderr."""
    max_length = config.max_length or context_length(model, tokenizer)
    prompts = build_prompts(tokenizer, by_type, config, max_length)
    flat = [p for name in sorted(prompts) for p in prompts[name]]
    start = time.perf_counter()
    scored = score_prompts(model, flat, max(config.ks), config.batch_size)
    seconds = time.perf_counter() - start
    tokens = sum(len(p.input_ids) for p in flat) / len(flat)
    print(f"scored {len(flat)} prompts of {tokens:.0f} tokens on average in {seconds:.2f} s "
          f"({seconds / len(flat):.3f} s per prompt)", file=sys.stderr)
    it = iter(scored)
    return answer_type_rows({name: [next(it) for _ in prompts[name]] for name in sorted(prompts)}, config)


def check_not_ginc_export(model_dir: str | Path) -> None:
    """Refuse an HF export of a GINC run trained here: its tokens are the world's, so English prompts
    score nothing it learned, and its curves come from `--ckpt`, on its own world's prompts."""
    if (Path(model_dir) / DATA_FILE).is_file():
        raise UserError(f"model directory {model_dir} is the export of a GINC run trained here (it has {DATA_FILE}), "
                        f"whose vocabulary is its world's tokens, not text; measure it on its own world's prompts "
                        f"(checkpoint_curve_rows, `evaluate.py curves --ckpt {model_dir}`)")


def hf_curve_rows(model_dir: str | Path, dataset: str | Path, config: LLMCurveConfig,
                  device: str = "auto") -> list[dict]:
    """The curve rows of a local HF causal LM on a JSONL dataset of {question, answer, answer_type} rows."""
    check_not_ginc_export(model_dir)
    by_type = group_by_type(load_shots(dataset), config.shots)  # before the model: bad data fails fast
    model, tokenizer = load_local_lm(model_dir, device)
    return llm_curve_rows(model, tokenizer, by_type, config)
