"""Bad GINC parameters fail with one clear error each."""
import pytest
import torch

from datamodules.ginc_datamodule import GincDataModule
from datamodules.sampling import GincSampler, shots_for_context
from datamodules.world import GincWorld, WorldConfig, WorldConfigError


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"weights": [1, -1, 1, 1, 1]}, "finite and >= 0"),
        ({"weights": [0, 0, 0, 0, 0]}, "all zero"),
        ({"weights": [1, 1]}, "one weight per task"),
        ({"n_tasks": 0}, "n_tasks must be >= 1"),
        ({"n_properties": 1}, "n_properties must be >= 2"),
        ({"vocab_size": 1}, "vocab_size 1 is smaller than the emission table needs"),
        ({"distinct_emissions": True, "vocab_size": 50}, "smaller than the emission table needs (91"),
        ({"entity_identity_bias": 1.5}, "entity_identity_bias"),
        ({"property_temperature": 0}, "property_temperature must be > 0"),
    ],
)
def test_bad_world_parameters(kwargs, fragment):
    with pytest.raises(WorldConfigError) as err:
        WorldConfig(**kwargs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_prompt_parameters():
    s = GincSampler(GincWorld.build(WorldConfig()))
    with pytest.raises(WorldConfigError, match="k must be >= 2"):
        s.icl_prompts(0, 1, torch.arange(2), 4)
    with pytest.raises(WorldConfigError, match="too short for one example"):
        shots_for_context(4, 5)
    with pytest.raises(WorldConfigError, match="out of range"):
        s.icl_prompts(7, 3, torch.arange(2), 4)


def test_bad_datamodule_parameters():
    with pytest.raises(WorldConfigError, match="too short for one example"):
        GincDataModule(context_length=8, icl={"k_values": [10]})
    with pytest.raises(WorldConfigError, match="train_weights has 2 entries"):
        GincDataModule(train_weights=[1, 0])
    with pytest.raises(WorldConfigError, match="k must be >= 2"):
        GincDataModule(icl={"k_values": [1]})


def test_distinct_emissions_are_injective():
    w = GincWorld.build(WorldConfig(distinct_emissions=True, vocab_size=91))
    body = w.emission[:, 1:].reshape(-1)
    assert len(body.unique()) == body.numel() and body.min() >= 1
