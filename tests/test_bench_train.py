"""The training-throughput benchmark: its smoke run exercises every path on a CPU, and its MFU arithmetic."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from benchmarks.train_throughput import flops_per_token, main, peak_for_name
from models.gpt import build_gpt, resolve_spec


@pytest.fixture(scope="module")
def smoke_log() -> list[str]:
    """One smoke run with the loss check, each line without its elapsed-time prefix (seconds)."""
    out, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            main(["--smoke", "--loss-check"])
    finally:
        torch.set_num_threads(threads)  # the benchmark runs a CPU on one thread; the other tests keep theirs
    return [re.sub(r"^\s*[\d.]+s  ", "", line) for line in out.getvalue().splitlines()]


def _tokens_per_s(lines: list[str], layers: int, name: str) -> float:
    line = next(ln for ln in lines if f"[{layers} layers] {name} " in ln and "tokens/s" in ln)
    return float(re.search(r"([\d,]+) tokens/s", line).group(1).replace(",", ""))


@pytest.mark.slow
def test_smoke_times_both_stacks_and_ends_with_the_ratio(smoke_log: list[str]) -> None:
    hf, ours = _tokens_per_s(smoke_log, 2, "HF Trainer"), _tokens_per_s(smoke_log, 2, "ours")
    assert hf > 0 and ours > 0
    last = re.fullmatch(r"ratio_vs_hf_trainer: ([\d.]+)", smoke_log[-1])
    assert last, smoke_log[-1]
    # tokens/s are printed rounded and the ratio to two decimals
    assert float(last.group(1)) == pytest.approx(ours / hf, rel=1e-2, abs=0.01)
    assert any("MFU peak: n/a on a CPU" in ln for ln in smoke_log)


@pytest.mark.slow
def test_both_evaluations_score_the_same_prompts_alike(smoke_log: list[str]) -> None:
    # 4 k x 5 tasks x 2 prompts, at the largest size
    line = next(ln for ln in smoke_log if "ICL eval (2 layers, 40 prompts)" in ln)
    ours, peer = (float(x) for x in re.search(r"ours ([\d.]+) s .* full logits ([\d.]+) s", line).groups())
    assert ours > 0 and peer > 0
    # same weights, same prompts: scoring only the label positions must give the full logits' curves
    # (to rounding: fp32 on a CPU, and a bf16 GPU run differs by ~1e-3)
    assert float(re.search(r"max \|prob ours - prob full logits\| = ([\d.e+-]+)", line).group(1)) < 1e-4


@pytest.mark.slow
def test_loss_check_starts_both_stacks_from_the_same_weights_and_batches(smoke_log: list[str]) -> None:
    hf_losses = [float(x) for x in next(ln for ln in smoke_log if ln.startswith("  HF ")).split()[1:]]
    ours_losses = [float(x) for x in next(ln for ln in smoke_log if ln.startswith("  ours ")).split()[1:]]
    assert len(hf_losses) == len(ours_losses) >= 2
    # identical init, data order, optimizer, schedule and clipping (fp32 on a CPU): the curves coincide
    # to the 4 decimals printed, and would part at once if any of these differed
    assert ours_losses == pytest.approx(hf_losses, abs=2e-4)
    assert hf_losses[-1] < hf_losses[0]  # the check trains: the loss moves
    assert any("loss_difference (ours - HF" in ln for ln in smoke_log)


def test_bad_flag_is_one_error_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--smoke", "--steps", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be >= 1, got 0"


def test_peak_is_the_dense_bf16_peak_of_the_named_gpu() -> None:
    assert peak_for_name("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert peak_for_name("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert peak_for_name("NVIDIA H200") == (989.0, "H200")
    assert peak_for_name("Tesla T4") is None


def test_flops_per_token_is_the_palm_count_for_gpt2_small() -> None:
    with torch.device("meta"):  # no memory, no init time: only the parameter shapes matter
        model = build_gpt(resolve_spec("gpt2-12l"), vocab_size=52, bos_id=51, pad_id=50)
    # per block: attention 4d^2 + MLP 8d^2, biases and 2 norms; final norm
    non_embedding = 12 * (12 * 768 * 768 + 13 * 768) + 2 * 768
    assert flops_per_token(model, resolve_spec("gpt2-12l")) == 6 * non_embedding + 12 * 12 * 768 * 1024
