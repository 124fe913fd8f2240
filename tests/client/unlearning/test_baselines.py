"""Training-based unlearning baselines: gradient ascent and NPO make a device's personal
adapter forget a person, move nothing else, stop when told, and NPO starts from its
reference (a loss of (2/beta) ln 2 on the first step)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.adapters import PERSONAL, AdapterConfig, DeviceModel
from client.lora_training import LoraTrainConfig, train_adapter_steps
from client.unlearning.baselines import UnlearnTrainConfig, gradient_ascent, npo
from edge_models.corpus import PromptPair, build_corpus, fact_pairs
from edge_models.default_model import default_llama_config, training_examples
from edge_models.evaluation import exact_match
from edge_models.tokenizer import train_tokenizer

CORPUS = build_corpus(0)
# Two private people with three facts each: the device forgets the first, keeps the second.
FORGOTTEN, KEPT = (dataclasses.replace(s, facts=s.facts[:3]) for s in CORPUS.split("private")[:2])
FORGET = [pair for _, pair in fact_pairs((FORGOTTEN,))]
RETAIN = [pair for _, pair in fact_pairs((KEPT,))]
ADAPTERS = AdapterConfig(rank=8, alpha=16.0)
CONFIG = UnlearnTrainConfig(
    train=LoraTrainConfig(lr=1e-3, batch_size=6), max_steps=40, check_every=2
)

MakeDevice = Callable[[], DeviceModel]


@pytest.fixture(scope="module")
def make_device() -> MakeDevice:
    """Devices whose personal adapter has learned both people (the default architecture and
    tokenizer recipe, random base weights), each a fresh copy."""
    tokenizer = train_tokenizer([e.prompt + e.completion for e in training_examples(CORPUS)], 2048)
    torch.manual_seed(0)
    base = LlamaForCausalLM(default_llama_config(len(tokenizer))).eval()
    device = DeviceModel(copy.deepcopy(base), tokenizer, ADAPTERS, device="cpu")
    examples = FORGET + RETAIN
    train = LoraTrainConfig(lr=3e-3, batch_size=len(examples))  # one batch: every pair, each step
    train_adapter_steps(device.model, PERSONAL, examples, 80, train, 0, tokenizer=tokenizer)
    learned = device.adapter_state(PERSONAL)

    def make() -> DeviceModel:
        fresh = DeviceModel(copy.deepcopy(base), tokenizer, ADAPTERS, device="cpu")
        fresh.load_adapter_state(PERSONAL, learned)
        return fresh

    return make


def known(device: DeviceModel, pairs: list[PromptPair]) -> float:
    tokenizer: PreTrainedTokenizerFast = device.tokenizer
    return exact_match(
        device.model, tokenizer, [p.prompt for p in pairs], [p.completion for p in pairs]
    )


def forgotten(device: DeviceModel) -> Callable[[int], bool]:
    """A stop check: the device no longer answers any forget prompt."""
    return lambda _step: known(device, FORGET) == 0.0


def frozen_part(device: DeviceModel) -> dict[str, torch.Tensor]:
    """Every parameter but the personal adapter's: the base and the shared adapter."""
    return {
        name: p.detach().clone()
        for name, p in device.model.named_parameters()
        if f".{PERSONAL}." not in name
    }


@pytest.mark.parametrize("method", [gradient_ascent, npo])
def test_a_baseline_forgets_the_person_and_moves_only_the_personal_adapter(
    make_device: MakeDevice, method
) -> None:
    device = make_device()
    assert known(device, FORGET) >= 0.8 and known(device, RETAIN) >= 0.8
    frozen = frozen_part(device)
    personal = device.adapter_state(PERSONAL)

    report = method(device, FORGET, CONFIG, forgotten(device))

    assert known(device, FORGET) == 0.0
    assert report.stopped_early and report.steps < CONFIG.max_steps
    assert report.steps % CONFIG.check_every == 0 and report.seconds > 0
    for name, before in frozen.items():
        assert torch.equal(before, dict(device.model.named_parameters())[name]), name
    after = device.adapter_state(PERSONAL)
    assert any(not torch.equal(personal[k], after[k]) for k in personal)


def test_a_retain_set_keeps_what_gradient_ascent_alone_destroys(make_device: MakeDevice) -> None:
    alone, with_retain = make_device(), make_device()

    gradient_ascent(alone, FORGET, CONFIG, forgotten(alone))
    report = gradient_ascent(with_retain, FORGET, CONFIG, forgotten(with_retain), retain=RETAIN)

    assert report.stopped_early and known(with_retain, FORGET) == 0.0
    assert known(with_retain, RETAIN) >= 0.8 > known(alone, RETAIN)


def test_should_stop_is_asked_every_check_every_steps(make_device: MakeDevice) -> None:
    asked: list[int] = []

    def third_time(step: int) -> bool:
        asked.append(step)
        return len(asked) == 3

    config = dataclasses.replace(CONFIG, check_every=3)
    report = gradient_ascent(make_device(), FORGET, config, third_time)
    assert asked == [3, 6, 9] and report.steps == 9 and report.stopped_early

    unbounded = npo(make_device(), FORGET, dataclasses.replace(CONFIG, max_steps=4))
    assert unbounded.steps == 4 and not unbounded.stopped_early and unbounded.method == "npo"


def test_npo_starts_at_its_reference(make_device: MakeDevice) -> None:
    """On the first step the model is its own reference, so every sequence's log-ratio is 0."""
    config = dataclasses.replace(CONFIG, max_steps=1, npo_beta=0.5)
    report = npo(make_device(), FORGET, config)
    assert report.mean_loss == pytest.approx(2 / 0.5 * math.log(2), rel=1e-4)
