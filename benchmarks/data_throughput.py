"""GINC data engine vs hmmlearn, on one CPU core, in the same run.

Three workloads, each produced by the peer (the way the existing research code does it) and by ours:
  documents  5-task mixture, 10,240-token documents; peer: CategoricalHMM.sample one document at a time
  prompts    ICL prompts; peer: a Python loop per prompt, shot and step (numpy choice per step)
  exact      the exact Bayesian learner; peer: per prompt, one hmmlearn score_samples call per
             demonstration and hypothesis (task, start property), combined with Bayes' rule in numpy
The exact learner's probabilities are checked against the peer's. The last line is the documents ratio.

    python benchmarks/data_throughput.py            # the numbers in docs/performance.md
    python benchmarks/data_throughput.py --smoke    # seconds, for CI
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for both sides, numpy included
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hmmlearn.hmm import CategoricalHMM  # noqa: E402

from datamodules.exact import ExactLearner  # noqa: E402
from datamodules.sampling import GincSampler, shots_for_context  # noqa: E402
from datamodules.world import GincWorld, WorldConfig  # noqa: E402


def _hmm(start: np.ndarray, trans: np.ndarray, emission: np.ndarray, vocab: int) -> CategoricalHMM:
    hmm = CategoricalHMM(n_components=len(start), n_features=vocab)
    hmm.startprob_, hmm.transmat_ = start, trans
    hmm.emissionprob_ = np.eye(vocab)[emission]
    return hmm


def peer_documents(world: GincWorld, n_docs: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    cfg = world.config
    emission = world.emission.reshape(-1).numpy()
    hmms = [_hmm(world.start[m].numpy(), world.transition_matrix(m).numpy(), emission, cfg.vocab_size)
            for m in range(cfg.n_tasks)]
    docs = []
    for _ in range(n_docs):
        task = rng.choice(cfg.n_tasks, p=np.asarray(cfg.weights))
        tokens, _ = hmms[task].sample(length, random_state=int(rng.integers(2**31)))
        docs.append(tokens[:, 0])
    return torch.from_numpy(np.stack(docs))


def peer_prompts(world: GincWorld, task: int, k: int, n_prompts: int, n_shots: int,
                 rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    cfg = world.config
    P, S = cfg.n_properties, cfg.n_states
    trans = world.transition_matrix(task).numpy()
    emission = world.emission.reshape(-1).numpy()
    label = world.label_token[task].reshape(-1).numpy()
    prompts = []
    for _ in range(n_prompts):
        start_prop = rng.integers(1, P)
        xs, ys = [], []
        for _ in range(n_shots):
            h = [rng.integers(cfg.n_entities) * P + start_prop]
            for _ in range(k - 2):
                h.append(rng.choice(S, p=trans[h[-1]]))
            xs.append(emission[h])
            ys.append(label[h[-1]])
        prompts.append((np.array(xs), np.array(ys)))
    return prompts


def peer_exact(world: GincWorld, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior predictive of each label of each prompt, with hmmlearn forward passes."""
    cfg = world.config
    E, P, M = cfg.n_entities, cfg.n_properties, cfg.n_tasks
    emission = world.emission.reshape(-1).numpy()
    hyps = []
    for m in range(M):
        trans, label = world.transition_matrix(m).numpy(), world.label_token[m].reshape(-1).numpy()
        for s in range(1, P):
            start = np.zeros(E * P)
            start[np.arange(E) * P + s] = 1.0 / E
            hyps.append((_hmm(start, trans, emission, cfg.vocab_size), label, np.log(cfg.weights[m] / (P - 1))))
    out = np.zeros(y.shape)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore")
        for i in range(x.shape[0]):
            log_seen = np.array([h[2] for h in hyps])
            for j in range(x.shape[1]):
                log_px, p_y = np.empty(len(hyps)), np.empty(len(hyps))
                for h, (hmm, label, _) in enumerate(hyps):
                    log_px[h], post = hmm.score_samples(x[i, j][:, None])
                    p_y[h] = post[-1][label == y[i, j]].sum() if np.isfinite(log_px[h]) else 0.0
                log_w = log_seen + log_px
                w = np.exp(log_w - log_w.max())
                out[i, j] = (w * p_y).sum() / w.sum()
                log_seen = log_w + np.log(p_y)
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workload for CI (seconds)")
    parser.add_argument("--doc-length", type=int, default=10240)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_peer_docs, n_docs, n_peer_prompts, n_prompts, n_peer_exact = ((2, 64, 2, 32, 1) if args.smoke
                                                                    else (24, 4096, 20, 1000, 3))
    length = 1024 if args.smoke else args.doc_length
    world = GincWorld.build(WorldConfig())
    sampler, rng = GincSampler(world), np.random.default_rng(0)
    n_shots = shots_for_context(args.context, args.k)

    _, t_peer = timed(peer_documents, world, n_peer_docs, length, rng)
    sampler.documents(torch.arange(8), 64)  # warm-up
    docs, t_ours = timed(sampler.documents, torch.arange(n_docs), length)
    peer_tps, ours_tps = n_peer_docs * length / t_peer, docs.tokens.numel() / t_ours
    print(f"documents  hmmlearn: {peer_tps:,.0f} tokens/s   ours: {ours_tps:,.0f} tokens/s   "
          f"({length}-token documents, 1 core)")

    _, t_peer = timed(peer_prompts, world, 0, args.k, n_peer_prompts, n_shots, rng)
    prompts, t_ours = timed(sampler.icl_prompts, 0, args.k, torch.arange(n_prompts), n_shots)
    peer_pps, ours_pps = n_peer_prompts / t_peer, n_prompts / t_ours
    print(f"prompts    python loop: {peer_pps:,.1f} prompts/s   ours: {ours_pps:,.0f} prompts/s   "
          f"(k={args.k}, {n_shots} shots)")

    x, y = prompts.demonstrations()
    learner = ExactLearner(world)
    learner.predict_demos(x[:2], y[:2])  # warm-up
    peer_prob, t_peer = timed(peer_exact, world, x[:n_peer_exact].numpy(), y[:n_peer_exact].numpy())
    pred, t_ours = timed(learner.predict_demos, x, y)
    gap = float(np.abs(pred.prob[:n_peer_exact].numpy() - peer_prob).max())
    peer_eps, ours_eps = n_peer_exact / t_peer, n_prompts / t_ours
    print(f"exact      hmmlearn: {peer_eps:,.3f} prompts/s   ours: {ours_eps:,.1f} prompts/s   "
          f"max |p_ours - p_hmmlearn| = {gap:.1e}")
    if not gap <= 1e-8:
        raise SystemExit(f"error: the exact learner disagrees with hmmlearn by {gap:.1e}")
    print(f"ratio_prompts_vs_loop: {ours_pps / peer_pps:,.0f}")
    print(f"ratio_exact_vs_hmmlearn: {ours_eps / peer_eps:,.0f}")
    print(f"ratio_vs_hmmlearn: {ours_tps / peer_tps:,.0f}")


if __name__ == "__main__":
    main()
