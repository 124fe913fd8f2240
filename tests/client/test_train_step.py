"""The federated train step: exactly q steps from the global adapter, a delta that rebuilds it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.adapters import (
    PERSONAL,
    SHARED,
    AdapterConfig,
    AdapterStateError,
    DeviceModel,
    is_lora_b,
)
from client.lora_training import LoraTrainConfig
from client.train_step import SharedUpdate, train_shared
from edge_models.training_data import examples_from_records
from shared.records import Record

RECORDS = [
    Record("s1", "pair", prompt="alice paints", completion=" a red bicycle at dawn."),
    Record("s1", "text", text="bob repairs the kitchen door in the garden."),
    Record("s2", "pair", prompt="the courier sells", completion=" seven apples every friday."),
    Record("s2", "text", text="my neighbour forgets her phone 0612 near station 42."),
    Record("s3", "pair", prompt="the old baker carries", completion=" the blue map."),
]
EXAMPLES = examples_from_records(RECORDS)
CONFIG = LoraTrainConfig(lr=1e-2, batch_size=2)
Q_STEPS = 3


@pytest.fixture
def device(tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> DeviceModel:
    """A device whose personal adapter has learned something, so that it matters."""
    model = DeviceModel(
        copy.deepcopy(tiny_llama),
        tiny_tokenizer,
        AdapterConfig(rank=4),
        personal_seed=1,
        device="cpu",
    )
    generator = torch.Generator().manual_seed(1)
    personal = model.adapter_state(PERSONAL)
    model.load_adapter_state(
        PERSONAL, {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in personal.items()}
    )
    return model


def global_state(device: DeviceModel) -> dict[str, torch.Tensor]:
    """The global B factors after some rounds: not the device's own starting point."""
    generator = torch.Generator().manual_seed(2)
    shared = device.adapter_state(SHARED)
    return {
        k: 0.05 * torch.randn(v.shape, generator=generator)
        for k, v in shared.items()
        if is_lora_b(k)
    }


def step(device: DeviceModel, seed: int = 0) -> SharedUpdate:
    return train_shared(device, global_state(device), EXAMPLES, Q_STEPS, CONFIG, seed)


def test_the_delta_rebuilds_the_trained_shared_adapter(device: DeviceModel) -> None:
    personal = device.adapter_state(PERSONAL)
    base = {n: p.clone() for n, p in device.model.named_parameters() if "lora_" not in n}
    start = global_state(device)
    shared_a = device.adapter_state(SHARED)
    update = step(device)

    trained = device.adapter_state(SHARED)
    assert update.delta.keys() == start.keys() == {k for k in trained if is_lora_b(k)}
    for key in start:
        assert update.delta[key].dtype == np.float32
        rebuilt = start[key] + torch.from_numpy(update.delta[key])
        assert torch.allclose(rebuilt, trained[key], rtol=0, atol=1e-7), key
    # A is fixed fleet-wide: it is what every device drew from the shared seed.
    for key, value in trained.items():
        if not is_lora_b(key):
            assert torch.equal(value, shared_a[key]), key
    assert any(np.abs(d).max() > 0 for d in update.delta.values())
    # Only the shared adapter trained: personal adapter and base are bit for bit as they were.
    assert all(torch.equal(personal[k], v) for k, v in device.adapter_state(PERSONAL).items())
    for name, p in device.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name


def test_exactly_q_steps_with_the_measurements_the_scheduler_needs(device: DeviceModel) -> None:
    update = step(device)
    assert update.samples == Q_STEPS * CONFIG.batch_size
    assert update.tokens > update.samples
    assert update.seconds_per_step > 0 and np.isfinite(update.loss) and update.loss > 0


def test_equal_inputs_give_equal_updates(device: DeviceModel) -> None:
    twin = copy.deepcopy(device)
    first, same, other = step(device), step(twin), step(copy.deepcopy(twin), seed=1)
    assert all(np.array_equal(first.delta[k], same.delta[k]) for k in first.delta)
    assert not all(np.array_equal(first.delta[k], other.delta[k]) for k in first.delta)


def test_a_bad_global_adapter_or_step_count_trains_nothing(device: DeviceModel) -> None:
    before = device.adapter_state(SHARED)
    bad = global_state(device)
    bad[next(iter(bad))][0, 0] = float("nan")
    with pytest.raises(AdapterStateError, match="NaN"):
        train_shared(device, bad, EXAMPLES, Q_STEPS, CONFIG, 0)
    with_a = {**global_state(device), **{k: v for k, v in before.items() if not is_lora_b(k)}}
    with pytest.raises(AdapterStateError, match="exactly the"):
        train_shared(device, with_a, EXAMPLES, Q_STEPS, CONFIG, 0)
    with pytest.raises(ValueError, match="q_steps"):
        train_shared(device, global_state(device), EXAMPLES, 0, CONFIG, 0)
    assert all(torch.equal(before[k], v) for k, v in device.adapter_state(SHARED).items())


def test_the_shared_adapter_trains_on_the_fleets_model_not_this_devices(
    device: DeviceModel,
) -> None:
    # The fleet's objective is the loss of base + shared on every device's records: what
    # this device's personal adapter knows must not change the update.
    with_personal = step(device)
    device.load_adapter_state(
        PERSONAL, {k: torch.zeros_like(v) for k, v in device.adapter_state(PERSONAL).items()}
    )
    without_personal = step(device)
    for key, value in with_personal.delta.items():
        assert np.allclose(value, without_personal.delta[key], atol=1e-6)
    # ... and the personal adapter is back in the served model afterwards.
    assert PERSONAL in device.model.active_adapters
