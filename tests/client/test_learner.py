"""The continual learner: blocks opened, designed and frozen in turn, consolidation when all
are used, replay only of what the source still holds, and its state across a restart."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.adapters import PERSONAL, AdapterConfig, DeviceModel
from client.continual import ReplayConfig
from client.learner import ContinualLearner, LearnerConfig, Method
from client.lora_training import LoraTrainConfig
from shared.records import Record

CONFIG = LearnerConfig(block_rank=2, blocks=3, train=LoraTrainConfig(lr=1e-2, batch_size=4))


def pairs(subject: str, count: int) -> list[Record]:
    return [
        Record(subject, "pair", prompt=f"{subject} keeps item {i} in", completion=f" box {i}.")
        for i in range(count)
    ]


class ListSource:
    def __init__(self) -> None:
        self.stored: list[Record] = []
        self.reads = 0

    def records(self) -> list[Record]:
        self.reads += 1
        return list(self.stored)


@pytest.fixture
def make_learner(tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast):
    def make(
        config: LearnerConfig = CONFIG, rank: int | None = None
    ) -> tuple[ContinualLearner, ListSource, DeviceModel]:
        adapters = AdapterConfig(rank=2, alpha=4.0, personal_rank=rank or config.layout.rank)
        device = DeviceModel(copy.deepcopy(tiny_llama), tiny_tokenizer, adapters, device="cpu")
        source = ListSource()
        learner = ContinualLearner(device.model, PERSONAL, tiny_tokenizer, source, config)
        return learner, source, device

    return make


def block_columns(learner: ContinualLearner, block: int) -> list[torch.Tensor]:
    rows = learner.config.layout.rows(block)
    return [f.b[:, rows].detach().clone() for f in learner.factors]


def test_each_block_learns_once_and_then_stays_as_it_was(make_learner) -> None:
    learner, source, _device = make_learner()
    first = pairs("ann", 4)
    source.stored += first
    learner.learn(first, steps=3, seed=0)
    assert learner.block == 0
    learned = block_columns(learner, 0)
    assert any(b.abs().max() > 0 for b in learned)
    assert all(b.abs().max() == 0 for b in block_columns(learner, 1))

    learner.start_block()
    later = pairs("bob", 4)
    source.stored += later
    learner.learn(later, steps=3, seed=1)
    assert learner.block == 1
    for before, after in zip(learned, block_columns(learner, 0), strict=True):
        assert torch.equal(before, after)
    assert any(b.abs().max() > 0 for b in block_columns(learner, 1))


def test_a_block_is_designed_from_its_first_records_then_only_b_moves(make_learner) -> None:
    learner, source, _device = make_learner()
    source.stored += pairs("ann", 6)
    learner.learn(source.stored[:3], steps=2, seed=0)
    rows = learner.config.layout.rows(0)
    designed = [f.a[rows].detach().clone() for f in learner.factors]
    learner.learn(source.stored[3:], steps=2, seed=1)
    for before, f in zip(designed, learner.factors, strict=True):
        assert torch.equal(before, f.a[rows])


def test_replay_reads_the_source_at_each_burst(make_learner) -> None:
    learner, source, _device = make_learner()
    source.stored += pairs("ann", 4)
    mixed = learner.training_set(pairs("bob", 4))
    assert {r.subject_id for r in mixed} == {"ann", "bob"}
    source.stored = [r for r in source.stored if r.subject_id != "ann"]  # ann deleted
    mixed = learner.training_set(pairs("bob", 4))
    assert {r.subject_id for r in mixed} == {"bob"}
    naive = LearnerConfig(method=Method(replay=False, subspace="none"), block_rank=2, blocks=3)
    learner, source, _device = make_learner(naive)
    source.stored += pairs("ann", 4)
    assert learner.training_set(pairs("bob", 2)) == pairs("bob", 2)
    assert source.reads == 0


def test_after_the_last_block_the_adapter_is_consolidated_into_the_others(make_learner) -> None:
    config = LearnerConfig(block_rank=2, blocks=2, train=CONFIG.train, replay=ReplayConfig(0))
    learner, source, _device = make_learner(config)
    for block, subject in enumerate(("ann", "bob")):
        if block:
            assert learner.start_block() is None
        records = pairs(subject, 4)
        source.stored += records
        learner.learn(records, steps=4, seed=block)
    products = [(f.b @ f.a).detach().clone() for f in learner.factors]

    error = learner.start_block()

    assert error is not None and 0 <= error < 1
    assert learner.block == 1 and learner.state.consolidations == 1
    last = config.layout.rows(1)
    worst = 0.0
    for before, f in zip(products, learner.factors, strict=True):
        assert f.a[last].abs().max() == 0 and f.b[:, last].abs().max() == 0
        after = f.b @ f.a
        if before.norm() > 0:
            worst = max(worst, float((after - before).norm() / before.norm()))
    assert worst == pytest.approx(error, rel=1e-3, abs=1e-6)
    records = pairs("cyd", 4)
    learner.learn(records, steps=2, seed=5)  # the freed block learns again
    assert any(f.b[:, last].abs().max() > 0 for f in learner.factors)


def test_state_survives_a_restart(make_learner) -> None:
    learner, source, _device = make_learner()
    source.stored += pairs("ann", 4)
    learner.learn(source.stored, steps=2, seed=0)
    saved = learner.export_state()
    assert saved.sketch_tokens > 0 and saved.block == 0 and saved.designed

    fresh, _source, _device = make_learner()
    fresh.restore_state(saved)
    assert fresh.block == 0 and fresh.state.designed
    assert fresh.history.tokens == saved.sketch_tokens
    for name, total in saved.sketch.items():
        assert torch.equal(fresh.history.sums[name], total)


def test_a_sketch_of_other_layers_is_refused(make_learner) -> None:
    learner, _source, _device = make_learner()
    state = learner.export_state()
    state.sketch = {name: torch.zeros(3, 3) for name in state.sketch}
    with pytest.raises(ValueError, match="does not fit"):
        learner.restore_state(state)
    assert learner.block == -1


def test_an_adapter_whose_rank_does_not_fit_the_blocks_is_refused(make_learner) -> None:
    with pytest.raises(ValueError, match="rank 4"):
        make_learner(rank=4)
