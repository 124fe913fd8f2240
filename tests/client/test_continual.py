"""The continual learner's pieces: replay mixing, the block mask, O-LoRA's penalty, InfLoRA's
block design and the input sketch it stands on."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.continual import (
    BlockLayout,
    BlockMask,
    ComplementProjection,
    InputCovariance,
    OrthogonalityConfig,
    OrthogonalityPenalty,
    ReplayConfig,
    design_block,
    lora_factors,
    mix_replay,
)
from client.lora_training import LoraTrainConfig, train_adapter_steps
from client.record_store import RecordStore
from edge_models.corpus import PromptPair
from edge_models.loading import find_lora_targets, lora_config
from edge_models.training_data import encode_example
from shared.records import Record

LAYOUT = BlockLayout(block_rank=2, blocks=3)
EXAMPLES = [
    PromptPair("alice paints", " a red bicycle at dawn."),
    PromptPair("bob repairs", " the kitchen door in the garden."),
    PromptPair("", "the courier sells seven apples every friday."),
    PromptPair("my neighbour forgets", " her phone 0612 near station 42."),
]
LATER = [
    PromptPair("the old baker carries", " the blue map."),
    PromptPair("", "a tired nurse borrows seven apples at dawn."),
    PromptPair("bob sells", " seven apples near station 42."),
]


def texts(subject: str, count: int) -> list[Record]:
    return [
        Record(subject_id=subject, kind="text", text=f"{subject} says {i}") for i in range(count)
    ]


class ListSource:
    def __init__(self, records: list[Record]) -> None:
        self.stored = records

    def records(self) -> list[Record]:
        return list(self.stored)


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (0.5, 10), (0.75, 30), (0.2, 2)])
def test_replay_takes_its_share_of_the_mix(fraction: float, expected: int) -> None:
    new = texts("new", 10)
    source = ListSource(texts("old", 100) + new)  # the store already holds the new records
    mixed = mix_replay(new, source, ReplayConfig(fraction), random.Random(0))
    assert mixed[:10] == new
    replay = mixed[10:]
    assert len(replay) == expected
    assert len(set(replay)) == expected and not set(replay) & set(new)
    assert expected == 0 or len(replay) / len(mixed) == pytest.approx(fraction, abs=0.05)


def test_replay_uses_the_whole_store_when_it_is_small() -> None:
    old = texts("old", 3)
    mixed = mix_replay(texts("new", 10), ListSource(old), ReplayConfig(0.5), random.Random(0))
    assert sorted(mixed[10:], key=str) == sorted(old, key=str)


def test_replay_samples_every_stored_record_evenly() -> None:
    old = texts("old", 20)
    counts = dict.fromkeys(old, 0)
    rng = random.Random(1)
    for _ in range(2000):
        for record in mix_replay(texts("new", 5), ListSource(old), ReplayConfig(0.5), rng)[5:]:
            counts[record] += 1
    # 2000 draws of 5 out of 20: each record 500 times on average.
    assert 400 < min(counts.values()) and max(counts.values()) < 600


def test_replay_never_yields_a_deleted_subject(tmp_path: Path) -> None:
    with RecordStore.open(tmp_path / "records.db", tmp_path / "keyfile") as store:
        store.ingest(texts("alice", 20) + texts("bob", 20) + texts("carol", 20))
        store.delete_subject("bob")
        new = texts("dave", 10)
        store.ingest(new)
        for seed in range(20):
            mixed = mix_replay(new, store, ReplayConfig(0.8), random.Random(seed))
            assert len(mixed) == 50
            assert {r.subject_id for r in mixed[10:]} <= {"alice", "carol"}


def test_replay_fraction_must_leave_room_for_new_records() -> None:
    with pytest.raises(ValueError, match="replay fraction"):
        ReplayConfig(1.0)


def adapted(base: LlamaForCausalLM) -> PeftModel:
    config = lora_config(find_lora_targets(base), rank=LAYOUT.rank, alpha=LAYOUT.rank, dropout=0.0)
    return get_peft_model(copy.deepcopy(base), config, adapter_name="personal").eval()


def test_lora_factors_pair_each_layers_a_and_b(tiny_llama: LlamaForCausalLM) -> None:
    factors = lora_factors(adapted(tiny_llama), "personal")
    # 4 layers x (q, k, v, o, gate, up, down)
    assert len(factors) == 28
    for f in factors:
        assert f.a.shape[0] == f.b.shape[1] == LAYOUT.rank
        assert f.module.lora_A["personal"].weight is f.a


def test_orthogonality_penalty_is_zero_only_for_orthogonal_blocks(
    tiny_llama: LlamaForCausalLM,
) -> None:
    model = adapted(tiny_llama)
    factors = lora_factors(model, "personal")
    penalty = OrthogonalityPenalty(factors, LAYOUT, 1, OrthogonalityConfig(weight=1.0))
    with torch.no_grad():
        for f in factors:
            f.a.zero_()
            f.a[0, 0] = f.a[1, 1] = 1.0  # block 0
            f.a[2, 2] = f.a[3, 3] = 1.0  # block 1, orthogonal to block 0
            f.a[4, 0] = 1.0  # block 2, overlapping block 0, is not block 1's business
    assert penalty(model).item() == 0.0

    torch.manual_seed(0)
    with torch.no_grad():
        for f in factors:
            f.a.copy_(torch.randn_like(f.a))
    before = penalty(model)
    assert before.item() > 0
    before.backward()
    with torch.no_grad():
        for f in factors:
            assert f.a.grad[: LAYOUT.rows(1).start].abs().sum() == 0  # earlier blocks are constants
            f.a.sub_(1e-3 * f.a.grad)
    assert penalty(model).item() < before.item()


def test_block_mask_keeps_only_the_blocks_gradients(tiny_llama: LlamaForCausalLM) -> None:
    model = adapted(tiny_llama)
    factors = lora_factors(model, "personal")
    rows = LAYOUT.rows(1)
    for train_a in (True, False):
        loss = sum((f.a.sum() + 1) * (f.b.sum() + 1) for f in factors)
        loss.backward()
        expected = {f.name: (f.a.grad.clone(), f.b.grad.clone()) for f in factors}
        BlockMask(factors, rows, train_a=train_a)(model)
        for f in factors:
            a_grad, b_grad = expected[f.name]
            if train_a:
                assert torch.equal(f.a.grad[rows], a_grad[rows])
            assert f.a.grad[rows].abs().sum() > 0 if train_a else f.a.grad.abs().sum() == 0
            assert f.a.grad[: rows.start].abs().sum() == f.a.grad[rows.stop :].abs().sum() == 0
            assert torch.equal(f.b.grad[:, rows], b_grad[:, rows])
            assert (
                f.b.grad[:, : rows.start].abs().sum() == f.b.grad[:, rows.stop :].abs().sum() == 0
            )
            f.a.grad = f.b.grad = None


def test_complement_leaves_out_the_top_energy_directions(tiny_llama: LlamaForCausalLM) -> None:
    factors = lora_factors(adapted(tiny_llama), "personal")
    sketch = InputCovariance(factors)
    name, d = factors[0].name, factors[0].a.shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    energies = torch.zeros(d, dtype=torch.float64)
    energies[:3] = torch.tensor([6.0, 3.0, 1.0])
    sketch.sums[name] = rotation @ torch.diag(energies) @ rotation.T
    sketch.tokens = 1
    for energy, protected in ((0.5, 1), (0.6, 1), (0.85, 2), (0.9, 2), (0.95, 3), (1.0, 3)):
        basis = sketch.complement(energy)[name]
        assert basis.shape == (d, d - protected)
        assert torch.allclose(basis.T @ basis, torch.eye(d - protected), atol=1e-5)
        assert (basis.T.double() @ rotation[:, :protected]).abs().max() < 1e-6


def test_inflora_block_leaves_earlier_inputs_exactly_alone(
    tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Block 1 is designed and trained after block 0: on inputs of the protected subspace
    its update is zero, so each layer's output on them does not move at all."""
    model = adapted(tiny_llama)
    factors = lora_factors(model, "personal")
    config = LoraTrainConfig(lr=1e-2, batch_size=2)
    train_adapter_steps(
        model,
        "personal",
        EXAMPLES,
        5,
        config,
        seed=0,
        after_backward=BlockMask(factors, LAYOUT.rows(0), train_a=True),
        tokenizer=tiny_tokenizer,
    )
    history = InputCovariance(factors)
    history.observe(model, tiny_tokenizer, EXAMPLES)
    assert history.tokens == sum(len(encode_example(tiny_tokenizer, e)[0]) for e in EXAMPLES)
    complement = history.complement(0.95)
    new = InputCovariance(factors)
    new.observe(model, tiny_tokenizer, LATER)
    design_block(factors, LAYOUT, 1, complement, new)
    before = {f.name: f.b.detach() @ f.a.detach() for f in factors}
    a_before = {f.name: f.a.detach().clone() for f in factors}
    train_adapter_steps(
        model,
        "personal",
        LATER,
        5,
        config,
        seed=1,
        after_backward=BlockMask(factors, LAYOUT.rows(1), train_a=False),
        tokenizer=tiny_tokenizer,
    )
    for f in factors:
        rows = LAYOUT.rows(1)
        a = f.a.detach()
        assert torch.equal(a, a_before[f.name])  # A is designed, not trained
        block = a[rows]
        live = block.abs().sum(1) > 0
        assert torch.allclose(block[live] @ block[live].T, torch.eye(int(live.sum())), atol=1e-5)
        basis = complement[f.name]
        protected = torch.eye(basis.shape[0]) - basis @ basis.T  # projector on old inputs
        assert (block @ protected).abs().max() < 1e-5
        moved = f.b.detach() @ a - before[f.name]
        assert moved.abs().max() > 0  # the block learned something
        assert (moved @ protected).abs().max() < 1e-5


def test_complement_projection_trains_a_only_outside_the_protected_subspace(
    tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    model = adapted(tiny_llama)
    factors = lora_factors(model, "personal")
    history = InputCovariance(factors)
    history.observe(model, tiny_tokenizer, EXAMPLES)
    complement = history.complement(0.9)
    new = InputCovariance(factors)
    new.observe(model, tiny_tokenizer, LATER)
    rows = LAYOUT.rows(1)
    design_block(factors, LAYOUT, 1, complement, new)
    projection = ComplementProjection(factors, rows, complement)
    protected = {
        name: torch.eye(basis.shape[0]) - basis @ basis.T for name, basis in complement.items()
    }

    loss = sum((f.a.pow(2).sum() + 1) * (f.b.sum() + 1) for f in factors)
    loss.backward()
    raw = {f.name: f.a.grad.clone() for f in factors}
    projection(model)
    for f in factors:
        assert (f.a.grad[rows] @ protected[f.name]).abs().max() < 1e-6
        assert f.a.grad[rows].abs().sum() > 0
        assert torch.equal(f.a.grad[: rows.start], raw[f.name][: rows.start])
        f.a.grad = f.b.grad = None

    mask = BlockMask(factors, rows, train_a=True)
    train_adapter_steps(
        model,
        "personal",
        LATER,
        5,
        LoraTrainConfig(lr=1e-2, batch_size=2),
        seed=0,
        after_backward=lambda m: (mask(m), projection(m)),
        tokenizer=tiny_tokenizer,
    )
    projection.settle()
    for f in factors:
        assert (f.a.detach()[rows] @ protected[f.name]).abs().max() < 1e-6
