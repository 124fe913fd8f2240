"""Edits as their own deltas: attached by hooks they act like folded weights, survive a new
adapter state, travel as arrays, and are re-solved in closed form when the weights under them
move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.adapters import SHARED, AdapterConfig, DeviceModel, is_lora_b
from client.unlearning.device import settle
from client.unlearning.edits import (
    LayerEdit,
    corrected,
    edits_from_arrays,
    edits_to_arrays,
    effective_weight,
    find_module,
    residual,
)

LAYER = "model.layers.3.mlp.down_proj"


def an_edit(d_out: int, d_in: int, n: int = 3, seed: int = 0, name: str = "e1") -> LayerEdit:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_in, n, generator=gen)
    u = 0.05 * torch.randn(d_out, n, generator=gen)
    v = torch.randn(d_in, n, generator=gen)
    return LayerEdit(name, LAYER, u, v, keys, torch.zeros(d_out, n))


@pytest.fixture
def device_model(
    tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> DeviceModel:
    import copy

    return DeviceModel(copy.deepcopy(tiny_llama), tiny_tokenizer, AdapterConfig(), device="cpu")


def test_attached_edits_equal_folded_weights_and_survive_a_new_adapter(
    device_model: DeviceModel,
) -> None:
    module = find_module(device_model.model, LAYER)
    d_out, d_in = effective_weight(module).shape
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain = device_model.logits(ids)
    device_model.device_edits.replace([an_edit(d_out, d_in)])
    edited = device_model.logits(ids)
    assert (edited - plain).abs().max() > 1e-4
    # A new shared adapter arrives (a federated round): the edit stays in force.
    state = device_model.adapter_state(SHARED)
    state = {k: (v + 0.01 if is_lora_b(k) else v) for k, v in state.items()}
    device_model.load_adapter_state(SHARED, state)
    with_new_shared = device_model.logits(ids)
    merged = device_model.merged_copy()
    with torch.no_grad():
        folded = merged(input_ids=ids).logits
    assert torch.allclose(folded, with_new_shared, atol=1e-5)
    with device_model.device_edits.suspended():
        without = device_model.logits(ids)
    assert (without - with_new_shared).abs().max() > 1e-4


def test_edits_travel_as_arrays_and_refuse_malformed_ones() -> None:
    edits = [an_edit(8, 12, name="shared:r1:aa"), an_edit(8, 12, n=2, seed=1, name="shared:r2:bb")]
    back = edits_from_arrays(edits_to_arrays(edits))
    assert [e.edit_id for e in back] == ["shared:r1:aa", "shared:r2:bb"]
    assert all(
        torch.equal(a.u, b.u) and torch.equal(a.keys, b.keys)
        for a, b in zip(edits, back, strict=True)
    )
    arrays = edits_to_arrays(edits[:1])
    with pytest.raises(ValueError):
        edits_from_arrays({k: v for k, v in arrays.items() if not k.endswith("|v")})
    with pytest.raises(ValueError):
        edits_from_arrays({"no-separator": np.zeros((2, 2), dtype=np.float32)})
    bad = dict(arrays)
    key = next(k for k in bad if k.endswith("|u"))
    bad[key] = np.full_like(bad[key], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        edits_from_arrays(bad)
    flat = dict(arrays)
    flat[key] = flat[key][:, 0]
    with pytest.raises(ValueError, match="matrix"):
        edits_from_arrays(flat)


def test_served_edits_carry_no_activations_of_the_forgotten_text() -> None:
    edit = an_edit(8, 12, n=2)
    served = edits_from_arrays(edits_to_arrays([edit.factors_only()]))[0]
    assert served.keys.numel() == 0 and served.targets.numel() == 0
    assert torch.equal(served.delta, edit.delta)  # what the model computes is unchanged


def test_a_drifted_edit_is_re_solved_onto_its_targets() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 12, generator=gen)
    keys = torch.randn(12, 3, generator=gen)
    targets = weight @ keys + torch.randn(8, 3, generator=gen)
    v = torch.linalg.pinv(keys).T  # row space of the keys
    u = (targets - weight @ keys) @ torch.linalg.inv(v.T @ keys)
    edit = LayerEdit("e", LAYER, u, v, keys, targets)
    assert residual(edit, weight) < 1e-4
    moved = weight + 0.5 * torch.randn(8, 12, generator=gen)  # training moved the layer
    assert residual(edit, moved) > 0.1
    fixed = corrected(edit, moved)
    assert residual(fixed, moved) < 1e-4
    assert torch.equal(fixed.v, edit.v)  # the same row space: the same retained keys spared


def test_settle_re_solves_only_what_drifted(device_model: DeviceModel) -> None:
    module = find_module(device_model.model, LAYER)
    weight = effective_weight(module)
    keys = torch.randn(weight.shape[1], 2)
    v = torch.linalg.pinv(keys).T
    on_target = LayerEdit("fine", LAYER, torch.zeros(weight.shape[0], 2), v, keys, weight @ keys)
    drifted = LayerEdit(
        "drifted", LAYER, torch.zeros(weight.shape[0], 2), v, keys, weight @ keys + 1
    )
    settled, changed = settle(device_model.model, [on_target, drifted])
    assert changed == 1
    assert settled[0] is on_target and settled[1] is not drifted
