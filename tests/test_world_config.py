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


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"property_temperature": float("inf")}, "property_temperature must be > 0 and finite"),
        ({"start_temperature": float("nan")}, "start_temperature must be > 0 and finite"),
        ({"entity_temperature": 1e-320}, "entity_temperature must be > 0 and finite (at least 2.2e-308)"),
        ({"entity_identity_bias": float("nan")}, "entity_identity_bias must be in [0, 1]"),
        ({"property_smoothing": "0.1"}, "property_smoothing must be in [0, 1], got '0.1'"),
        ({"n_tasks": 2.0}, "n_tasks must be a whole number >= 1, got 2.0"),
        ({"n_entities": True}, "n_entities must be a whole number >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"weights": [1, "1", 1, 1, 1]}, "weights must be finite numbers >= 0, one per task"),
        ({"weights": [1e308, 1e308, 1, 1, 1]}, "weights sum to more than a float holds"),
        ({"distinct_emissions": 1}, "distinct_emissions must be true or false"),
    ],
)
def test_world_values_are_typed_finite_and_in_range(kwargs, fragment):
    """nan passed every `> 0` and `<= 1` check by failing it silently, and inf built a world of NaN."""
    with pytest.raises(WorldConfigError) as err:
        WorldConfig(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_world_settings_are_named_where_they_were_given():
    from datamodules.world import world_config

    with pytest.raises(WorldConfigError,
                       match=r"^data\.world\.n_taks is not a world setting; the world's settings are n_tasks, "):
        world_config({"n_taks": 3}, "data.world.")
    with pytest.raises(WorldConfigError, match=r"^data\.world\.start_temperature must be > 0 and finite"):
        world_config({"start_temperature": float("nan")}, "data.world.")
    with pytest.raises(WorldConfigError, match=r"^world\.n_taks is not a world setting"):
        GincDataModule(world={"n_taks": 3})
    assert world_config({"weights": [2, 2, 2], "n_tasks": 3}) == WorldConfig(n_tasks=3)  # the same mixture
