"""The exact Bayesian learner against brute-force Bayes on a tiny world."""
import numpy as np
import pytest
import torch

from datamodules.document_reader import mixture_next_prob
from datamodules.exact import ExactLearner
from datamodules.sampling import GincSampler
from datamodules.world import GincWorld, WorldConfig


def brute_force(world: GincWorld, x: np.ndarray, y: np.ndarray, weights: np.ndarray,
                shown: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Enumerate (task, start property); a dense forward pass over all hidden states per demonstration.
    With `shown` (the "sampled" format) y is scored as the next token and the shown token is what the
    demonstration's likelihood sees."""
    cfg = world.config
    E, P, M = cfg.n_entities, cfg.n_properties, cfg.n_tasks
    emit = world.emission.reshape(-1).numpy()
    n = y.shape[0]
    px = np.zeros((M, P - 1, n))
    py = np.zeros((M, P - 1, n))
    pshown = np.zeros((M, P - 1, n))
    for m in range(M):
        T = world.transition_matrix(m).numpy()
        label = world.label_token[m].reshape(-1).numpy()
        for si, s in enumerate(range(1, P)):
            for j in range(n):
                alpha = np.zeros(E * P)
                alpha[np.arange(E) * P + s] = 1.0 / E
                alpha *= emit == x[j, 0]
                for t in range(1, x.shape[1]):
                    alpha = (alpha @ T) * (emit == x[j, t])
                px[m, si, j] = alpha.sum()
                if shown is None:
                    py[m, si, j] = alpha[label == y[j]].sum() / alpha.sum() if alpha.sum() > 0 else 0.0
                    pshown[m, si, j] = py[m, si, j]
                else:
                    nxt = alpha @ T / alpha.sum() if alpha.sum() > 0 else np.zeros(E * P)
                    py[m, si, j], pshown[m, si, j] = nxt[emit == y[j]].sum(), nxt[emit == shown[j]].sum()
    prior = np.repeat(weights[:, None] / (P - 1), P - 1, axis=1)
    prob = np.zeros(n)
    posterior = np.zeros((n + 1, M))
    seen = np.ones((M, P - 1))
    for j in range(n):
        joint = prior * seen
        posterior[j] = joint.sum(1) / joint.sum()
        w = joint * px[:, :, j]
        prob[j] = (w * py[:, :, j]).sum() / w.sum()
        seen = seen * px[:, :, j] * pshown[:, :, j]
    joint = prior * seen
    posterior[n] = joint.sum(1) / joint.sum()
    return prob, posterior


@pytest.fixture(scope="module")
def tiny() -> GincWorld:
    return GincWorld.build(WorldConfig(n_tasks=3, n_entities=3, n_properties=3, vocab_size=5, property_temperature=1.0,
                                       seed=3))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equals_brute_force(tiny, k):
    sampler, learner = GincSampler(tiny), ExactLearner(tiny)
    weights = np.asarray(tiny.config.weights)
    for task in range(3):
        p = sampler.icl_prompts(task, k, torch.arange(3), n_shots=6)
        pred = learner.predict(p)
        x, y = p.demonstrations()
        for i in range(3):
            prob, posterior = brute_force(tiny, x[i].numpy(), y[i].numpy(), weights)
            np.testing.assert_allclose(pred.prob[i].numpy(), prob, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(pred.task_posterior[i].numpy(), posterior, rtol=1e-10, atol=1e-12)


def test_non_uniform_prior_and_single_task(tiny):
    sampler = GincSampler(tiny)
    p = sampler.icl_prompts(1, 4, torch.arange(4), n_shots=5)
    x, y = p.demonstrations()
    for weights in ([0.7, 0.2, 0.1], [0.0, 1.0, 0.0]):
        pred = ExactLearner(tiny, weights).predict(p)
        for i in range(4):
            prob, _ = brute_force(tiny, x[i].numpy(), y[i].numpy(), np.asarray(weights))
            np.testing.assert_allclose(pred.prob[i].numpy(), prob, rtol=1e-10, atol=1e-12)
    # with all prior mass on one task the posterior never moves
    pred = ExactLearner(tiny, [0.0, 1.0, 0.0]).predict(p)
    assert torch.allclose(pred.task_posterior[..., 1], torch.ones(()).double())


def test_posterior_concentrates_on_the_true_task():
    world = GincWorld.build(WorldConfig())
    sampler, learner = GincSampler(world), ExactLearner(world)
    for task in range(5):
        pred = learner.predict(sampler.icl_prompts(task, 3, torch.arange(16), n_shots=40))
        true_post = pred.task_posterior[..., task].mean(0)
        assert true_post[0] == pytest.approx(0.2)
        assert true_post[-1] > 0.99
        assert true_post[10:].mean() > true_post[:3].mean()
        assert pred.prob[:, -10:].mean() > 0.9 and pred.correct[:, -10:].float().mean() > 0.9


def test_stays_finite_for_long_prompts():
    world = GincWorld.build(WorldConfig())
    pred = ExactLearner(world).predict(GincSampler(world).icl_prompts(0, 3, torch.arange(2), n_shots=1000))
    assert torch.isfinite(pred.prob).all() and torch.isfinite(pred.task_posterior).all()


@pytest.mark.parametrize("demo_format", ["label", "sampled"])
@pytest.mark.parametrize("smoothing", [0.0, 0.6])
def test_equals_brute_force_on_smoothed_worlds_in_both_formats(demo_format, smoothing):
    world = GincWorld.build(WorldConfig(n_tasks=3, n_entities=3, n_properties=4, vocab_size=6,
                                        property_smoothing=smoothing, seed=5))
    sampler, learner = GincSampler(world), ExactLearner(world, [0.5, 0.3, 0.2])
    for task in range(3):
        p = sampler.icl_prompts(task, 3, torch.arange(3), n_shots=7, demo_format=demo_format)
        pred = learner.predict(p)
        x, shown = p.demonstrations()
        for i in range(3):
            prob, posterior = brute_force(world, x[i].numpy(), p.labels[i].numpy(), np.array([0.5, 0.3, 0.2]),
                                          shown[i].numpy() if demo_format == "sampled" else None)
            np.testing.assert_allclose(pred.prob[i].numpy(), prob, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(pred.task_posterior[i].numpy(), posterior, rtol=1e-10, atol=1e-12)


def test_smoothing_mixes_each_property_transition_with_uniform():
    sharp = GincWorld.build(WorldConfig(seed=1))
    smooth = GincWorld.build(WorldConfig(seed=1, property_smoothing=0.7))
    P = sharp.config.n_properties
    torch.testing.assert_close(smooth.property_transition, 0.3 * sharp.property_transition + 0.7 / P)
    assert (smooth.property_transition > 0).all() and (sharp.property_transition == 0).any()
    assert torch.equal(smooth.label_token, sharp.label_token)  # the most likely next state is unchanged


@pytest.mark.parametrize("demo_format", ["label", "sampled"])
def test_task_terms_mixed_by_any_prior_give_brute_force_over_every_token(demo_format):
    """What a fitted prior recombines (evaluation/reader_prior.py): the prior-free terms of each task, mixed
    by a prior the learner was not built with, give brute-force Bayes' probability of every token at a label."""
    world = GincWorld.build(WorldConfig(n_tasks=3, n_entities=3, n_properties=4, vocab_size=6,
                                        property_smoothing=0.6, seed=5))
    weights = np.array([0.5, 0.3, 0.2])
    p = GincSampler(world).icl_prompts(1, 3, torch.arange(2), n_shots=5, demo_format=demo_format)
    x, shown = p.demonstrations()
    sampled = demo_format == "sampled"
    terms = ExactLearner(world).task_terms(x, p.labels, shown if sampled else None)
    pred = mixture_next_prob(torch.as_tensor(weights).log() + terms.evidence, terms.next_prob)[:, -1]
    torch.testing.assert_close(pred.sum(-1), torch.ones(2, dtype=torch.float64))
    for i in range(2):
        for v in range(world.config.vocab_size):  # the last label set to v: its probability after the others
            y = p.labels[i].numpy().copy()
            y[-1] = v
            with np.errstate(invalid="ignore"):  # a label no state gives leaves no posterior after it (unused)
                prob, _ = brute_force(world, x[i].numpy(), y, weights, shown[i].numpy() if sampled else None)
            assert float(pred[i, v]) == pytest.approx(prob[-1], rel=1e-10, abs=1e-12)
