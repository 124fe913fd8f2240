"""The device's two adapters: fresh ones change nothing, both serve together, states are checked."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.adapters import PERSONAL, SHARED, AdapterConfig, AdapterStateError, DeviceModel
from client.inference import KvCacheSession
from client.serving import ensure_export, max_logit_difference

CONFIG = AdapterConfig(rank=4, alpha=8.0)
PROMPTS = [[1, 11, 12, 13, 14, 15], [1, 40, 41]]
INPUTS = torch.tensor([PROMPTS[0]])

MakeDevice = Callable[..., DeviceModel]


@pytest.fixture
def make_device(tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast):
    def make(config: AdapterConfig = CONFIG, personal_seed: int = 0) -> DeviceModel:
        return DeviceModel(copy.deepcopy(tiny_llama), tiny_tokenizer, config, personal_seed, "cpu")

    return make


def randomised(device: DeviceModel, name: str, seed: int) -> dict[str, torch.Tensor]:
    """The adapter's state with every tensor replaced by small random values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    state = device.adapter_state(name)
    return {key: 0.05 * torch.randn(t.shape, generator=generator) for key, t in state.items()}


def assert_equal_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def assert_unchanged(device: DeviceModel, before: dict[str, dict[str, torch.Tensor]]) -> None:
    for name in (SHARED, PERSONAL):
        assert_equal_tensors(device.adapter_state(name), before[name])


def test_a_fresh_device_answers_like_the_base(make_device: MakeDevice, tiny_llama) -> None:
    device = make_device()
    with torch.inference_mode():
        assert torch.equal(device.logits(INPUTS), tiny_llama(INPUTS).logits)
    assert device.model.active_adapters == [SHARED, PERSONAL]
    assert not any(p.requires_grad for p in device.model.parameters())


def test_the_shared_adapter_starts_alike_on_every_device(make_device: MakeDevice) -> None:
    one, two = make_device(personal_seed=1), make_device(personal_seed=2)
    assert_equal_tensors(one.adapter_state(SHARED), two.adapter_state(SHARED))
    for key, value in one.adapter_state(PERSONAL).items():
        if ".lora_B." in key:
            assert not value.any()
        else:
            assert value.abs().max() > 0
            assert not torch.equal(value, two.adapter_state(PERSONAL)[key])
    other_fleet = make_device(AdapterConfig(rank=4, alpha=8.0, shared_seed=7))
    shared, other = one.adapter_state(SHARED), other_fleet.adapter_state(SHARED)
    assert not any(torch.equal(shared[k], other[k]) for k in shared if ".lora_A." in k)


def test_both_adapters_serve_together_as_the_merged_copy_and_its_export(
    make_device: MakeDevice, tiny_tokenizer, tmp_path: Path
) -> None:
    device = make_device()
    device.load_adapter_state(SHARED, randomised(device, SHARED, 1))
    device.load_adapter_state(PERSONAL, randomised(device, PERSONAL, 2))
    served = device.logits(INPUTS)
    merged = device.merged_copy()
    shared_only = copy.deepcopy(device.model).merge_and_unload(adapter_names=[SHARED])
    with torch.inference_mode():
        assert (served - merged(INPUTS).logits).abs().max() < 1e-5
        assert (served - shared_only(INPUTS).logits).abs().max() > 1e-3  # personal counts too
    assert type(merged) is LlamaForCausalLM and not hasattr(merged, "peft_config")

    path = ensure_export(merged, [], tmp_path / "onnx", "cpu", tiny_tokenizer)
    session = KvCacheSession(path, "cpu")
    assert max_logit_difference(device.model, session, PROMPTS, 2) < 1e-4


def test_adapter_states_round_trip_as_copies(make_device: MakeDevice, tiny_llama) -> None:
    device = make_device()
    personal_before = device.adapter_state(PERSONAL)
    state = device.adapter_state(SHARED)
    key = next(iter(state))
    state[key].add_(1.0)  # a copy: the adapter does not move
    assert not torch.equal(state[key], device.adapter_state(SHARED)[key])

    new = randomised(device, SHARED, 3)
    device.load_adapter_state(SHARED, new)
    assert_equal_tensors(device.adapter_state(SHARED), new)
    assert_equal_tensors(device.adapter_state(PERSONAL), personal_before)
    base = dict(tiny_llama.named_parameters())
    for name, p in device.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name


def test_bad_states_are_refused_and_change_nothing(make_device: MakeDevice) -> None:
    device = make_device()
    device.load_adapter_state(SHARED, randomised(device, SHARED, 4))
    before = {name: device.adapter_state(name) for name in (SHARED, PERSONAL)}
    good = randomised(device, SHARED, 5)
    key = next(iter(good))

    def with_value(value: object) -> dict:
        return {**good, key: value}

    bad_states = {
        "NaN": with_value(torch.full_like(good[key], float("nan"))),
        "infinite": with_value(torch.full_like(good[key], float("inf"))),
        "shape": with_value(good[key][:-1]),
        "dtype": with_value(good[key].double()),
        "expected a tensor": with_value(good[key].numpy()),
        "unknown keys": {**good, "base_model.model.lm_head.lora_A.weight": good[key]},
        "missing keys": {k: v for k, v in good.items() if k != key},
    }
    for reason, state in bad_states.items():
        with pytest.raises(AdapterStateError, match=reason):
            device.load_adapter_state(SHARED, state)
        assert_unchanged(device, before)
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        device.load_adapter_state("global", good)
    assert_unchanged(device, before)
