"""Seconds per many-shot prompt of a randomly initialised 1B-class LM (Llama 3.2 1B shape), no download.

    python benchmarks/llm_prompt_time.py            # 1B shape, bf16 on GPU
    python benchmarks/llm_prompt_time.py --smoke    # tiny shape, seconds on a CPU

Builds the model from a config with random weights, saves it with a tokenizer trained on the example
dataset into a temp dir, runs `evaluate.py curves --hf-model` on it once (end to end, which also warms
the device up), then times the curve measurement of the loaded model alone. Random weights cost the
same compute as trained ones; the prompts are as long as the example dataset's (more with --repeat).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.arguments import run_commands  # noqa: E402
from evaluation.cli import COMMANDS  # noqa: E402
from evaluation.llm_curves import LLMCurveConfig, group_by_type, llm_curve_rows, load_local_lm  # noqa: E402
from evaluation.manyshot import load_shots, train_tokenizer  # noqa: E402
from models.gpt import resolve_device  # noqa: E402

DATASET = Path(__file__).resolve().parents[1] / "examples" / "manyshot" / "pirate_persona.jsonl"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2000, max_position_embeddings=8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, for a CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--shuffles", type=int, default=8, help="prompts per answer type in the timed run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="tile the dataset's rows this many times (longer prompts)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--k", type=int, default=1, help="answer tokens scored")
    args = parser.parse_args()
    device = resolve_device(args.device)
    shots = load_shots(DATASET)
    tokenizer = train_tokenizer([f"{s.question}\n{s.answer}" for s in shots], vocab_size=2000)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "random-1b"
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES["smoke" if args.smoke else "1b"]))
        model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        del model

        # End to end once, through the real command line.
        argv = ["curves", "--hf-model", str(model_dir), "--dataset", str(DATASET),
                "--out", str(Path(tmp) / "curves.csv"), "--prompts", "1", "--k", str(args.k), "--device", device,
                "--batch-size", str(args.batch_size)]
        run_commands(COMMANDS, argv, "evaluate.py")

        start = time.perf_counter()
        model, tokenizer = load_local_lm(model_dir, device)
        load_s = time.perf_counter() - start
        rows = [s for _ in range(args.repeat) for s in shots]
        config = LLMCurveConfig(run="random-1b", ks=(args.k,), shuffles=args.shuffles, batch_size=args.batch_size)
        by_type = group_by_type(rows, None)
        start = time.perf_counter()
        llm_curve_rows(model, tokenizer, by_type, config)
        seconds = time.perf_counter() - start
    prompts = args.shuffles * len(by_type)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{n_params / 1e6:.1f}M params on {name} ({next(model.parameters()).dtype}), load {load_s:.1f} s: "
          f"{seconds / prompts:.3f} s per prompt ({prompts} prompts, {len(rows) // len(by_type)} shots each, "
          f"prompt building included)")


if __name__ == "__main__":
    main()
