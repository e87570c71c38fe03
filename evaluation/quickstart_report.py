"""What the quickstart prints: ICL accuracy before and after SFT beside both ideal learners, and which
of them the pretrained model is closer to."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from datamodules.ginc_datamodule import GincDataModule
from evaluation.ginc_curves import exact_curve_rows, reader_curve_rows


def accuracy_table(curves: dict[str, list[dict]], k: int, favoured: Sequence[int], shots: Sequence[int]) -> str:
    """ICL accuracy by shots, averaged over the favoured tasks and over the others, for each named curve set."""
    lines = [f"{'':28}" + "".join(f"{s:>7}" for s in shots)]
    for group in ("favoured", "others"):
        for name, rows in curves.items():
            acc = [[r["acc"] for r in rows if r["k"] == k and r["shots"] == s and (r["task"] in favoured) == (group == "favoured")] for s in shots]
            lines.append(f"{group if name == next(iter(curves)) else '':9}{name:19}"
                         + "".join(f"{sum(a) / len(a):7.2f}" if a else f"{'-':>7}" for a in acc))
    return "\n".join(lines)


def curve_gap(rows: list[dict], reference: list[dict], k: int) -> float:
    """Mean absolute accuracy difference at k over the (task, shots >= 1) points both curves have."""
    ref = {(r["task"], r["shots"]): float(r["acc"]) for r in reference if r["k"] == k and r["shots"] >= 1}
    diffs = [abs(float(r["acc"]) - ref[r["task"], r["shots"]]) for r in rows if r["k"] == k and (r["task"], r["shots"]) in ref]
    return sum(diffs) / max(len(diffs), 1)


def quickstart_report(pretrained: list[dict], after_sft: list[dict], data: GincDataModule, favoured: Sequence[int],
                      loss: Mapping[str, float]) -> str:
    """The table and the verdict, from the two runs' final curve rows, the ideal learners' rows on the same
    prompts, and the pretrained model's validation `loss` (val/loss, val/excess_loss)."""
    curves = {"pretrained": pretrained, "after SFT-favour": after_sft,
              "exact Bayesian": exact_curve_rows(data), "document reader": reader_curve_rows(data)}
    k = min(data.icl.k_values)
    n = max(r["shots"] for r in curves["exact Bayesian"] if r["k"] == k)
    shots = sorted({0, 1, 2, 4, 8, n} & set(range(n + 1)))
    others = [t for t in range(data.world.n_tasks) if t not in favoured]
    gap = {name: curve_gap(curves["pretrained"], curves[name], k) for name in ("exact Bayesian", "document reader")}
    return "\n".join([
        f"\nICL accuracy by shots, k={k}: favoured = task(s) {favoured}, others = mean of tasks {others}",
        accuracy_table(curves, k, favoured, shots),
        f"The exact learner knows the prompt format; the document reader is the best a model of documents alone can do "
        f"('-': no prompt it can read). The pretrained model ({loss['val/loss']:.3f} nats/token, "
        f"{loss['val/excess_loss']:.3f} above the world's floor) is closer to the "
        f"{min(gap, key=gap.get)} (mean accuracy gap after 1+ shots: exact {gap['exact Bayesian']:.2f}, "
        f"reader {gap['document reader']:.2f})."])
