"""The GINC world: a mixture of hidden Markov models, each one a "task" (Xie et al., 2021).

Hidden state = (entity, property). The two coordinates move as independent Markov chains: entities
by a transition shared by all tasks and biased to stay put, properties by a transition of each task
(a softmax-weighted mixture of random permutations, so nearly deterministic at low temperature).
Emission is a fixed table: (entity, property) -> token, with property 0 emitting the delimiter 0.
Token ids: 0 delimiter, 1..vocab_size-1 emissions, then PAD = vocab_size and BOS = vocab_size + 1.
The whole world is a pure function of `WorldConfig`, its seed included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from user_errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DELIMITER = 0


class WorldConfigError(UserError):
    """A GINC world parameter is out of range; the message names it and the fix."""


@dataclass
class WorldConfig:
    n_tasks: int = 5
    n_entities: int = 10
    n_properties: int = 10
    vocab_size: int = 50
    property_temperature: float = 0.1  # softmax temperature of each task's permutation mixture
    entity_temperature: float = 0.1  # same for the shared entity transition
    entity_identity_bias: float = 0.9  # weight of "stay on the same entity"
    start_temperature: float = 10.0  # softmax temperature of each task's start distribution
    # mix each task's property transition with uniform, prop <- (1 - s) prop + s / P: every transition
    # possible, so one demonstration no longer rules tasks out and ICL rises over many shots
    property_smoothing: float = 0.0
    weights: list[float] | None = None  # mixture weights = ground-truth task prior; None -> uniform
    distinct_emissions: bool = False  # give every (entity, property>0) its own token
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_tasks", "n_entities"):
            if getattr(self, name) < 1:
                raise WorldConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_properties < 2:
            raise WorldConfigError(f"n_properties must be >= 2 (property 0 is the delimiter), got {self.n_properties}")
        needed = self.n_entities * (self.n_properties - 1) + 1 if self.distinct_emissions else 2
        if self.vocab_size < needed:
            raise WorldConfigError(
                f"vocab_size {self.vocab_size} is smaller than the emission table needs ({needed}: the delimiter plus "
                f"{'one token per (entity, property>0)' if self.distinct_emissions else 'one token'}); raise vocab_size"
            )
        for name in ("property_temperature", "entity_temperature", "start_temperature"):
            if not getattr(self, name) > 0:
                raise WorldConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.property_smoothing <= 1.0:
            raise WorldConfigError(f"property_smoothing must be in [0, 1], got {self.property_smoothing}")
        if not 0.0 <= self.entity_identity_bias <= 1.0:
            raise WorldConfigError(f"entity_identity_bias must be in [0, 1], got {self.entity_identity_bias}")
        self.weights = list(check_weights(self.weights, self.n_tasks, "weights"))

    @property
    def n_states(self) -> int:
        return self.n_entities * self.n_properties

    @property
    def pad_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1

    @property
    def model_vocab_size(self) -> int:
        """Token ids a language model must cover: emissions, PAD and BOS."""
        return self.vocab_size + 2


def check_weights(weights: object, n_tasks: int, name: str = "weights") -> np.ndarray:
    """Validate mixture weights (None -> uniform) and return them normalised, float64."""
    if weights is None:
        return np.full(n_tasks, 1.0 / n_tasks)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n_tasks:
        raise WorldConfigError(f"{name} has {w.shape[0]} entries but the world has {n_tasks} tasks; give one weight per task")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise WorldConfigError(f"{name} must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise WorldConfigError(f"{name} are all zero; give at least one task a positive weight")
    return w / w.sum()


def _softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _permutation_mixture(rng: np.random.Generator, n: int, temperature: float) -> np.ndarray:
    """Softmax(temperature)-weighted sum of n random permutation matrices: a doubly stochastic matrix."""
    mixing = _softmax(rng.random(n) - 0.5, temperature)
    perms = np.stack([np.eye(n)[rng.permutation(n)] for _ in range(n)])
    return np.einsum("p,pij->ij", mixing, perms)


@dataclass
class GincWorld:
    """The tensors of one world (float64 on CPU; `to(device)` for the GPU)."""

    config: WorldConfig
    emission: torch.Tensor  # [E, P] long: token of each (entity, property)
    entity_transition: torch.Tensor  # [E, E], shared by all tasks
    property_transition: torch.Tensor  # [M, P, P], one per task
    start: torch.Tensor  # [M, E*P] over hidden states h = entity * P + property
    weights: torch.Tensor  # [M], the mixture (ground-truth prior)
    label_token: torch.Tensor = field(init=False)  # [M, E, P]: emission of the most likely next state

    def __post_init__(self) -> None:
        next_entity = self.entity_transition.argmax(-1)  # [E]
        next_property = self.property_transition.argmax(-1)  # [M, P]
        self.label_token = self.emission[next_entity[None, :, None], next_property[:, None, :]]

    @classmethod
    def build(cls, config: WorldConfig) -> "GincWorld":
        rng = np.random.default_rng(config.seed)
        E, P, M = config.n_entities, config.n_properties, config.n_tasks
        if config.distinct_emissions:
            body = rng.permutation(E * (P - 1)).reshape(E, P - 1) + 1
        else:
            body = rng.integers(1, config.vocab_size, size=(E, P - 1))
        emission = np.concatenate([np.full((E, 1), DELIMITER), body], axis=1)
        b = config.entity_identity_bias
        entity = (1 - b) * _permutation_mixture(rng, E, config.entity_temperature) + b * np.eye(E)
        prop = np.stack([_permutation_mixture(rng, P, config.property_temperature) for _ in range(M)])
        prop = (1.0 - config.property_smoothing) * prop + config.property_smoothing / P
        start = np.stack([_softmax(rng.random(E * P) - 0.5, config.start_temperature) for _ in range(M)])
        t = lambda a, dtype=torch.float64: torch.as_tensor(a, dtype=dtype)  # noqa: E731
        return cls(config, t(emission, torch.long), t(entity), t(prop), t(start), t(np.asarray(config.weights)))

    def to(self, device: torch.device | str) -> "GincWorld":
        moved = {k: getattr(self, k).to(device) for k in ("emission", "entity_transition", "property_transition", "start", "weights")}
        return GincWorld(self.config, **moved)

    @property
    def device(self) -> torch.device:
        return self.emission.device

    def transition_matrix(self, task: int) -> torch.Tensor:
        """The [E*P, E*P] transition over hidden states of one task (Kronecker product of the two chains)."""
        return torch.kron(self.entity_transition, self.property_transition[task])

    def transition_matrices(self) -> torch.Tensor:
        """Every task's transition over hidden states, [M, E*P, E*P]."""
        return torch.stack([self.transition_matrix(m) for m in range(self.config.n_tasks)])


def world_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the world's token ids, for exported models: `<d>` the delimiter (0), `t1` ..
    `t{vocab_size-1}` the emissions, then `<pad>` and `<bos>`; text is tokens separated by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<d>", *[f"t{i}" for i in range(1, vocab_size)], "<pad>", "<bos>"]
    core = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>", unk_token="<pad>")
