"""Statistics and determinism of the GINC sampler."""
import numpy as np
import pytest
import torch
from scipy import stats

from datamodules.sampling import GincSampler, shots_for_context
from datamodules.world import DELIMITER, GincWorld, WorldConfig


@pytest.fixture(scope="module")
def world() -> GincWorld:
    return GincWorld.build(WorldConfig(weights=[0.4, 0.3, 0.2, 0.05, 0.05]))


def _chi2_rows(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of a Pearson chi-square test that each row of counts follows the matching row of probs."""
    stat, dof = 0.0, 0
    for c, p in zip(counts, probs):
        n = c.sum()
        keep = p * n >= 5  # cells with enough expected mass; the rest are pooled into one
        expected = np.append(p[keep] * n, p[~keep].sum() * n)
        observed = np.append(c[keep], c[~keep].sum())
        if expected[-1] == 0:
            expected, observed = expected[:-1], observed[:-1]
        if n == 0 or len(expected) < 2:
            continue
        stat += ((observed - expected) ** 2 / expected).sum()
        dof += len(expected) - 1
    return float(stats.chi2.sf(stat, dof))


def _transition_counts(states: torch.Tensor, n_states: int) -> np.ndarray:
    pairs = (states[:, :-1] * n_states + states[:, 1:]).reshape(-1)
    return torch.bincount(pairs, minlength=n_states**2).reshape(n_states, n_states).numpy()


def test_transitions_match_the_task_matrix(world):
    s = GincSampler(world)
    one_hot = [0, 0, 1, 0, 0]
    docs = s.documents(torch.arange(400), 600, weights=one_hot, with_states=True)
    assert (docs.tasks == 2).all()
    counts = _transition_counts(docs.states, world.config.n_states)
    assert _chi2_rows(counts, world.transition_matrix(2).numpy()) > 1e-3
    # the same test rejects the matrix of another task: it can fail
    assert _chi2_rows(counts, world.transition_matrix(3).numpy()) < 1e-6
    # deterministic emission
    assert torch.equal(docs.tokens, world.emission.reshape(-1)[docs.states])


def test_start_and_mixture_frequencies(world):
    s = GincSampler(world)
    docs = s.documents(torch.arange(20000), 2, with_states=True)
    task_counts = np.bincount(docs.tasks.numpy(), minlength=5)
    assert stats.chisquare(task_counts, np.array(world.config.weights) * 20000).pvalue > 1e-3
    assert stats.chisquare(task_counts, np.full(5, 4000.0)).pvalue < 1e-6
    for m in range(2):
        first = docs.states[docs.tasks == m, 0]
        counts = np.bincount(first.numpy(), minlength=world.config.n_states)[None]
        assert _chi2_rows(counts, world.start[m].numpy()[None]) > 1e-3


def test_documents_are_a_function_of_seed_and_id(world):
    s = GincSampler(world)
    a = s.documents(torch.arange(10), 50)
    b = s.documents(torch.tensor([7, 3]), 50)  # other batch composition
    assert torch.equal(a.tokens[[7, 3]], b.tokens)
    again = GincSampler(GincWorld.build(WorldConfig(weights=world.config.weights)))
    assert torch.equal(again.documents(torch.arange(10), 50).tokens, a.tokens)
    other_seed = GincSampler(GincWorld.build(WorldConfig(weights=world.config.weights, seed=1)))
    assert not torch.equal(other_seed.documents(torch.arange(10), 50).tokens, a.tokens)
    assert not torch.equal(s.documents(torch.arange(10), 50, stream="sft").tokens, a.tokens)


def test_icl_prompt_structure(world):
    s = GincSampler(world)
    k, n = 5, shots_for_context(128, 5)
    assert n == 128 // 6
    p = s.icl_prompts(task=1, k=k, prompt_ids=torch.arange(6), n_shots=n)
    assert p.tokens.shape == (6, n * (k + 1)) and p.tokens.shape[1] <= 128
    assert (p.tokens[:, 0] == world.config.bos_id).all()
    delimiters = 1 + torch.arange(n - 1) * (k + 1) + k
    assert (p.tokens[:, delimiters] == DELIMITER).all()
    assert torch.equal(p.tokens.gather(1, p.label_pos), p.labels)
    assert torch.equal(p.label_pos[0], 1 + torch.arange(n) * (k + 1) + k - 1)
    x, y = p.demonstrations()
    assert x.shape == (6, n, k - 1) and torch.equal(y, p.labels)
    # each demonstration starts at the prompt's start property; the label is the argmax-next emission
    first_props = torch.stack([(world.emission[:, sp] == x[i, :, 0][:, None]).any(1)
                               for i, sp in enumerate(p.start_property)])
    assert first_props.all()
    assert ((p.start_property >= 1) & (p.start_property < world.config.n_properties)).all()
    # prompts do not depend on which other prompts are generated with them
    q = s.icl_prompts(task=1, k=k, prompt_ids=torch.tensor([4]), n_shots=n)
    assert torch.equal(q.tokens[0], p.tokens[4])


def test_icl_labels_follow_the_most_likely_next_state(world):
    s = GincSampler(world)
    k = 3
    p = s.icl_prompts(task=0, k=k, prompt_ids=torch.arange(50), n_shots=10)
    x, y = p.demonstrations()
    # every label is reachable: some state emitting x_{k-1} has it as its argmax-next emission
    ok = ((world.emission.reshape(-1)[None, None, :] == x[..., -1:])
          & (world.label_token[0].reshape(-1)[None, None, :] == y[..., None]))
    assert ok.any(-1).all()


def test_preference_pairs_come_from_their_mixtures(world):
    s = GincSampler(world)
    chosen, rejected = s.preference_pairs(torch.arange(300), 20, [1, 0, 0, 0, 0], [0, 0.25, 0.25, 0.25, 0.25])
    assert (chosen.tasks == 0).all() and (rejected.tasks != 0).all()
    assert len(rejected.tasks.unique()) == 4


def expected_pairs(world: GincWorld, task: int, k: int) -> tuple[np.ndarray, float]:
    """Exact joint law of (the (k-1)-th token, the k-th token) of a sampled demonstration, and how often
    the k-th token equals the target (the most likely next state's emission)."""
    cfg = world.config
    E, P, V = cfg.n_entities, cfg.n_properties, cfg.vocab_size
    T = world.transition_matrix(task).numpy()
    emit, label = world.emission.reshape(-1).numpy(), world.label_token[task].reshape(-1).numpy()
    d = np.zeros(E * P)
    for s in range(1, P):  # uniform start property, uniform entity
        d[np.arange(E) * P + s] += 1.0 / (E * (P - 1))
    for _ in range(k - 2):
        d = d @ T
    joint = np.zeros((V, V))
    flow = d[:, None] * T  # [h, h']
    np.add.at(joint, (emit[:, None].repeat(E * P, 1), emit[None, :].repeat(E * P, 0)), flow)
    agree = float((flow * (emit[None, :] == label[:, None])).sum())
    return joint, agree


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_sampled_demonstrations_follow_the_tasks_transitions(smoothing):
    world = GincWorld.build(WorldConfig(n_tasks=2, n_entities=3, n_properties=4, vocab_size=6,
                                        property_temperature=1.0, property_smoothing=smoothing, seed=2))
    k, N, n = 3, 500, 40
    p = GincSampler(world).icl_prompts(1, k, torch.arange(N), n_shots=n, demo_format="sampled")
    x, shown = p.demonstrations()
    V = world.config.vocab_size
    counts = np.zeros((V, V))
    np.add.at(counts, (x[..., -1].reshape(-1).numpy(), shown.reshape(-1).numpy()), 1.0)
    joint, agree = expected_pairs(world, 1, k)
    # total variation between the empirical and exact joint law of consecutive tokens
    assert 0.5 * np.abs(counts / counts.sum() - joint).sum() < 0.02
    rate = (shown == p.labels).double().mean().item()
    assert abs(rate - agree) < 4 * np.sqrt(agree * (1 - agree) / (N * n)) + 1e-9, (rate, agree)
    label = GincSampler(world).icl_prompts(1, k, torch.arange(N), n_shots=n)
    assert torch.equal(label.demonstrations()[0], x) and torch.equal(label.labels, p.labels)
