"""ICL curves of a local HF causal LM: one-pass scoring vs a per-shot reference, answer spans, bad input."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import evaluate
from evaluation.llm_curves import LLMCurveConfig, build_prompts, group_by_type, llm_curve_rows, load_local_lm
from evaluation.manyshot import build_prompt, load_shots, render, resolve_format, train_tokenizer
from tests.conftest import REPO

DATASET = REPO / "examples" / "manyshot" / "pirate_persona.jsonl"


def save_tiny_lm(directory: Path, chat: bool) -> Path:
    shots = load_shots(DATASET)
    tokenizer = train_tokenizer([f"{s.question}\n{s.answer}" for s in shots], vocab_size=400, chat=chat)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["plain", "chat"])
def model_dir(request, tmp_path_factory) -> Path:
    """A tiny GPT-2 whose tokenizer has a chat template (directory name `chat...`) or none (`plain...`)."""
    return save_tiny_lm(tmp_path_factory.mktemp(request.param), chat=request.param == "chat")


def curves_cli(argv: list[str]) -> int:
    return evaluate.main(["curves", *argv])


@torch.no_grad()
def reference_rows(model, prompts: dict, ks: list[int]) -> dict[tuple, tuple]:
    """One forward pass per shot, each over the prompt cut right after that shot's answer."""
    acc: dict[tuple, list] = {}
    for task, name in enumerate(sorted(prompts)):
        for p in prompts[name]:
            for shot, (start, end) in enumerate(p.answer_spans):
                ids = torch.tensor([p.input_ids[:end]])
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                for k in ks:
                    pos = range(start, min(start + k, end))
                    lp = sum(logp[q - 1, p.input_ids[q]].item() for q in pos)
                    hit = all(logp[q - 1].argmax().item() == p.input_ids[q] for q in pos)
                    acc.setdefault((k, task, shot), []).append((lp, hit))
    return {key: (sum(math.exp(lp) for lp, _ in v) / len(v), -sum(lp for lp, _ in v) / len(v),
                  sum(h for _, h in v) / len(v), len(v)) for key, v in acc.items()}


def test_one_pass_curves_equal_per_shot_reference(model_dir: Path) -> None:
    model, tokenizer = load_local_lm(model_dir, "cpu")
    # A short context truncates shuffles at different shots, so the batch holds unequal lengths (padding).
    config = LLMCurveConfig(run="tiny", ks=(1, 3), shuffles=3, max_length=160, batch_size=2)
    by_type = group_by_type(load_shots(DATASET), None)
    rows = llm_curve_rows(model, tokenizer, by_type, config)
    reference = reference_rows(model, build_prompts(tokenizer, by_type, config, 160), [1, 3])
    assert len({len(p.input_ids) for ps in build_prompts(tokenizer, by_type, config, 160).values() for p in ps}) > 1
    assert {(r["k"], r["task"], r["shots"]) for r in rows} == set(reference)
    assert {r["answer_type"] for r in rows if r["task"] == 0} == {"pirate"}
    for r in rows:
        prob, nll, acc, count = reference[(r["k"], r["task"], r["shots"])]
        assert r["prob"] == pytest.approx(prob, rel=1e-4)
        assert r["nll"] == pytest.approx(nll, rel=1e-4)
        assert (r["acc"], r["count"]) == (acc, count)
    assert all(r["count"] == 3 for r in rows if r["shots"] == 0)
    # three answer tokens are jointly less likely than the first one alone
    first = {(r["task"], r["shots"]): r["prob"] for r in rows if r["k"] == 1}
    assert all(r["prob"] < first[(r["task"], r["shots"])] for r in rows if r["k"] == 3)


def test_answer_spans_decode_exactly_to_the_answers(model_dir: Path) -> None:
    _, tokenizer = load_local_lm(model_dir, "cpu")
    prompt_format = resolve_format(tokenizer, "auto")
    assert model_dir.name.startswith(prompt_format)
    shots = load_shots(DATASET)[:12]
    text, _ = render(tokenizer, shots, prompt_format)
    marker = "<|assistant|>\n" if prompt_format == "chat" else "\nAssistant:"
    assert text.count(marker) == len(shots)
    full = build_prompt(tokenizer, shots, prompt_format, max_length=10_000)
    assert len(full.answer_spans) == len(shots)
    for shot, (start, end) in zip(shots, full.answer_spans):
        assert tokenizer.decode(full.input_ids[start:end]).strip() == shot.answer
        assert tokenizer.decode(full.input_ids[:start]).rstrip().endswith(marker.strip())
    cut = build_prompt(tokenizer, shots, prompt_format, max_length=full.answer_spans[5][1] - 1)
    assert cut.answer_spans == full.answer_spans[:5]
    assert cut.input_ids == full.input_ids[: full.answer_spans[4][1]]


def test_cli_writes_curves_with_answer_types(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.csv"
    assert curves_cli(["--hf-model", str(model_dir), "--dataset", str(DATASET), "--out", str(out), "--run", "tiny/base",
                       "--shots", "6", "--prompts", "2", "--k", "2", "--device", "cpu"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:9] == ["run", "k", "task", "shots", "prob", "nll", "acc", "count", "answer_type"]
    assert len(rows) == 2 * 6
    assert {(r["task"], r["answer_type"]) for r in rows} == {("0", "pirate"), ("1", "plain")}
    assert {r["run"] for r in rows} == {"tiny/base"} and {r["count"] for r in rows} == {"2"}
    assert all(0 < float(r["prob"]) < 1 and float(r["nll"]) == pytest.approx(-math.log(float(r["prob"])), rel=0.5)
               for r in rows)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case, needle", [
    ("no model", "no config.json there; give a model directory written by save_pretrained"),
    ("no answer", "bad.jsonl:2: row has no 'answer'; every row needs non-empty strings question, answer, answer_type"),
    ("too few rows", "answer type 'pirate' has 40 rows but shots asks for 41; lower shots or add rows"),
])
def test_bad_input_fails_with_one_clear_line(case: str, needle: str, tmp_path: Path, capsys) -> None:
    model = tmp_path / "empty_model"
    model.mkdir()
    dataset, flags = DATASET, []
    if case == "no answer":
        dataset = _write_jsonl(tmp_path / "bad.jsonl", [
            {"question": "Q1?", "answer": "A1.", "answer_type": "x"}, {"question": "Q2?", "answer_type": "x"}])
    if case == "too few rows":
        flags = ["--shots", "41"]
    out = tmp_path / "curves.csv"
    assert curves_cli(["--hf-model", str(model), "--dataset", str(dataset), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not out.exists()


def test_llm_curve_settings_check_themselves():
    """A notebook building the settings gets the same one-line errors as the CLI's flags."""
    for field in ("shuffles", "batch_size", "max_length"):
        with pytest.raises(ValueError, match=f"^{field} 0: must be a positive integer"):
            LLMCurveConfig("r", **{field: 0})
    with pytest.raises(ValueError, match="^ks 0: must be a positive integer"):
        LLMCurveConfig("r", ks=(1, 0))
    assert LLMCurveConfig("r", ks=(1, 4), shots=3).ks == (1, 4)
