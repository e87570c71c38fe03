"""The GINC world: a mixture of hidden Markov models, each one a "task" (Xie et al., 2021).

Hidden state = (entity, property). The two coordinates move as independent Markov chains: entities
by a transition shared by all tasks and biased to stay put, properties by a transition of each task
(a softmax-weighted mixture of random permutations, so nearly deterministic at low temperature).
Emission is a fixed table: (entity, property) -> token, with property 0 emitting the delimiter 0.
Token ids: 0 delimiter, 1..vocab_size-1 emissions, then PAD = vocab_size and BOS = vocab_size + 1.
The whole world is a pure function of `WorldConfig`, its seed included.
"""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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
        check_world_values(vars(self))
        self.weights = check_weights(self.weights, self.n_tasks, "weights").tolist()

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


_INTS = {"n_tasks": 1, "n_entities": 1, "n_properties": 2, "vocab_size": 2, "seed": 0}  # the least each may be
_TEMPERATURES = ("property_temperature", "entity_temperature", "start_temperature")
_SHARES = ("entity_identity_bias", "property_smoothing")
# below the smallest normal float, a softmax's logits x / temperature (|x| < 0.5) overflow to inf and the world is NaN
_LEAST_TEMPERATURE = sys.float_info.min


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_world_values(values: Mapping[str, object], prefix: str = "") -> None:
    """Every world setting in `values` is known, of its type, finite and in range, or one WorldConfigError
    naming the first that is not as `prefix` + its name (train.py passes "data.world.", so the line names
    the flag) with its valid range. Settings left out take WorldConfig's defaults."""
    known = [f.name for f in fields(WorldConfig)]
    unknown = [key for key in values if key not in known and not str(key).startswith("__")]
    if unknown:
        raise WorldConfigError(f"{prefix}{unknown[0]} is not a world setting; "
                               f"the world's settings are {', '.join(known)}")
    v = {f.name: f.default for f in fields(WorldConfig)} | {k: values[k] for k in known if k in values}
    for name, least in _INTS.items():
        if not _is_int(v[name]):
            raise WorldConfigError(f"{prefix}{name} must be a whole number >= {least}, got {v[name]!r}")
    for name in ("n_tasks", "n_entities", "seed"):
        if v[name] < _INTS[name]:
            raise WorldConfigError(f"{prefix}{name} must be >= {_INTS[name]}, got {v[name]}")
    if v["n_properties"] < 2:
        raise WorldConfigError(f"{prefix}n_properties must be >= 2 (property 0 is the delimiter), "
                               f"got {v['n_properties']}")
    if not isinstance(v["distinct_emissions"], (bool, np.bool_)):
        raise WorldConfigError(f"{prefix}distinct_emissions must be true or false, got {v['distinct_emissions']!r}")
    needed = v["n_entities"] * (v["n_properties"] - 1) + 1 if v["distinct_emissions"] else 2
    if v["vocab_size"] < needed:
        raise WorldConfigError(
            f"{prefix}vocab_size {v['vocab_size']} is smaller than the emission table needs "
            f"({needed}: the delimiter plus "
            f"{'one token per (entity, property>0)' if v['distinct_emissions'] else 'one token'}); raise vocab_size"
        )
    for name in _TEMPERATURES:
        if not (_is_real(v[name]) and math.isfinite(v[name]) and v[name] >= _LEAST_TEMPERATURE):
            raise WorldConfigError(f"{prefix}{name} must be > 0 and finite (at least {_LEAST_TEMPERATURE:.1e}), "
                                   f"got {v[name]!r}")
    for name in _SHARES:
        if not (_is_real(v[name]) and 0.0 <= v[name] <= 1.0):
            raise WorldConfigError(f"{prefix}{name} must be in [0, 1], got {v[name]!r}")
    weights = v["weights"]
    if weights is not None:
        if not isinstance(weights, (list, tuple, np.ndarray)) or not all(_is_real(w) for w in weights):
            raise WorldConfigError(f"{prefix}weights must be finite numbers >= 0, one per task (or null: uniform), "
                                   f"got {weights!r}")
        check_weights(weights, v["n_tasks"], f"{prefix}weights")


def world_config(values: Mapping[str, object] | WorldConfig | None, prefix: str = "") -> WorldConfig:
    """The WorldConfig of a mapping of settings (None: the default world), checked by `check_world_values`."""
    if isinstance(values, WorldConfig):
        return values
    values = {k: v for k, v in (values or {}).items() if not str(k).startswith("__")}
    check_world_values(values, prefix)
    return WorldConfig(**values)


def world_differences(here: WorldConfig, there: WorldConfig) -> list[tuple[str, object, object]]:
    """(setting, value here, value there) for each setting in which two worlds differ, in WorldConfig's
    order. Weights compare normalised and up to rounding, so null and equal weights, or weights saved
    normalised and given raw, are the same world."""
    def same(name: str) -> bool:
        a, b = getattr(here, name), getattr(there, name)
        if name == "weights":
            return len(a) == len(b) and bool(np.allclose(a, b, rtol=1e-9, atol=1e-12))
        return a == b

    return [(f.name, getattr(here, f.name), getattr(there, f.name)) for f in fields(WorldConfig) if not same(f.name)]


def check_weights(weights: object, n_tasks: int, name: str = "weights") -> np.ndarray:
    """Validate mixture weights (None -> uniform) and return them normalised, float64."""
    if weights is None:
        return np.full(n_tasks, 1.0 / n_tasks)
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise WorldConfigError(f"{name} must be a list of one number per task, got {weights!r}") from None
    if w.shape[0] != n_tasks:
        raise WorldConfigError(f"{name} has {w.shape[0]} entries but the world has {n_tasks} tasks; "
                               "give one weight per task")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise WorldConfigError(f"{name} must be finite and >= 0, got {w.tolist()}")
    with np.errstate(over="ignore"):  # an overflow is refused below
        total = w.sum()
    if total <= 0:
        raise WorldConfigError(f"{name} are all zero; give at least one task a positive weight")
    if not np.isfinite(total):
        raise WorldConfigError(f"{name} sum to more than a float holds; scale them down (only their ratios matter)")
    return w / total


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
    def build(cls, config: WorldConfig) -> GincWorld:
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

    def to(self, device: torch.device | str) -> GincWorld:
        moved = {k: getattr(self, k).to(device)
                 for k in ("emission", "entity_transition", "property_transition", "start", "weights")}
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
