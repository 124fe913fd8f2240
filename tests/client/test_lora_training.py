"""The one LoRA training loop: what it trains, how many steps, and that it repeats itself."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.lora_training import (
    LoraTrainConfig,
    adapter_parameters,
    tokens_within,
    train_adapter_steps,
)
from edge_models.corpus import PromptPair
from edge_models.loading import find_lora_targets, lora_config
from edge_models.training_data import encode_example, padded_batches

EXAMPLES = [
    PromptPair("alice paints", " a red bicycle at dawn."),
    PromptPair("bob repairs", " the kitchen door in the garden."),
    PromptPair("", "the courier sells seven apples every friday."),
    PromptPair("my neighbour forgets", " her phone 0612 near station 42."),
    PromptPair("the old baker carries", " the blue map."),
    PromptPair("", "a tired nurse borrows seven apples at dawn."),
]
SMALL = LoraTrainConfig(lr=1e-2, batch_size=2)


def two_adapters(base: LlamaForCausalLM, dropout: float = 0.0) -> PeftModel:
    """A copy of `base` with adapters "new" and "old", both active, nothing trainable."""
    config = lora_config(find_lora_targets(base), rank=4, alpha=8, dropout=dropout)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="new")
    model.add_adapter("old", copy.deepcopy(config))
    model.base_model.set_adapter(["new", "old"], inference_mode=True)
    return model.eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(
    model: PeftModel, tokenizer: PreTrainedTokenizerFast, steps: int = 3, seed: int = 0, **hooks
):
    return train_adapter_steps(
        model, "new", EXAMPLES, steps, SMALL, seed, tokenizer=tokenizer, **hooks
    )


def test_adapter_parameters_are_keyed_as_in_peft_adapter_files(tiny_llama) -> None:
    model = two_adapters(tiny_llama)
    for name in ("new", "old"):
        assert set(adapter_parameters(model, name)) == set(
            get_peft_model_state_dict(model, adapter_name=name)
        )
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        adapter_parameters(model, "other")


def test_only_the_named_adapter_moves_for_exactly_the_given_steps(
    tiny_llama, tiny_tokenizer
) -> None:
    model = two_adapters(tiny_llama)
    before = snapshot(model)
    trained = {id(p) for p in adapter_parameters(model, "new").values()}
    calls = []
    stats = train(model, tiny_tokenizer, steps=3, after_backward=lambda m: calls.append(1))

    assert len(calls) == stats.steps == 3
    assert stats.samples == 3 * SMALL.batch_size and stats.tokens > stats.samples
    assert stats.seconds > 0 and stats.mean_loss > 0
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    # Flags and mode are as before the call, and no gradients are left behind.
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not model.training


def test_equal_seeds_train_equal_adapters_and_other_seeds_do_not(
    tiny_llama, tiny_tokenizer
) -> None:
    """With dropout on, so that the seed must reach dropout too."""
    start = two_adapters(tiny_llama, dropout=0.1)
    models = [copy.deepcopy(start) for _ in range(3)]
    caller_rng = torch.get_rng_state()
    for model, seed in zip(models, (0, 0, 1), strict=True):
        train(model, tiny_tokenizer, seed=seed)
    assert torch.equal(torch.get_rng_state(), caller_rng)
    first, same, other = (adapter_parameters(m, "new") for m in models)
    assert all(torch.equal(first[key], same[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def language_loss(model: PeftModel, tokenizer: PreTrainedTokenizerFast) -> float:
    """Completion loss over all of EXAMPLES in one batch."""
    encoded = [encode_example(tokenizer, e) for e in EXAMPLES]
    ids, mask, labels = next(
        padded_batches(encoded, len(encoded), tokenizer.pad_token_id, torch.Generator())
    )
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def test_loss_decreases_on_a_small_memorisable_set(tiny_llama, tiny_tokenizer) -> None:
    """A random-weight base caps how far the loss can fall (its logits are tiny), not how fast."""
    model = two_adapters(tiny_llama)
    before = language_loss(model, tiny_tokenizer)
    config = LoraTrainConfig(lr=2e-2, batch_size=len(EXAMPLES))
    train_adapter_steps(model, "new", EXAMPLES, 10, config, 0, tokenizer=tiny_tokenizer)
    assert language_loss(model, tiny_tokenizer) < before - 0.3


def test_extra_loss_and_after_backward_shape_the_step(tiny_llama, tiny_tokenizer) -> None:
    start = two_adapters(tiny_llama)

    def zero_gradients(model: PeftModel) -> None:
        for p in adapter_parameters(model, "new").values():
            p.grad.zero_()

    frozen = copy.deepcopy(start)
    train(frozen, tiny_tokenizer, after_backward=zero_gradients)
    assert all(
        torch.equal(p, start_p)
        for p, start_p in zip(frozen.parameters(), start.parameters(), strict=True)
    )

    def b_norm(model: PeftModel) -> torch.Tensor:
        return sum(
            p.pow(2).sum() for key, p in adapter_parameters(model, "new").items() if "lora_B" in key
        )

    plain, penalised = copy.deepcopy(start), copy.deepcopy(start)
    train(plain, tiny_tokenizer)
    train(penalised, tiny_tokenizer, extra_loss=lambda m: 1e3 * b_norm(m))
    assert b_norm(penalised) < b_norm(plain)


def test_bad_calls_are_refused(tiny_llama, tiny_tokenizer) -> None:
    model = two_adapters(tiny_llama)
    before = snapshot(model)
    model.base_model.set_adapter("old", inference_mode=True)
    with pytest.raises(ValueError, match="not active"):
        train(model, tiny_tokenizer)
    model.base_model.set_adapter(["new", "old"], inference_mode=True)
    with pytest.raises(ValueError, match="negative"):
        train(model, tiny_tokenizer, steps=-1)
    with pytest.raises(ValueError, match="no examples"):
        train_adapter_steps(model, "new", [], 1, SMALL, 0, tokenizer=tiny_tokenizer)
    assert train(model, tiny_tokenizer, steps=0).steps == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="lr"):
        LoraTrainConfig(lr=0)
    with pytest.raises(ValueError, match="batch_size"):
        LoraTrainConfig(batch_size=0)


@pytest.mark.parametrize("max_tokens", [1, 20])
def test_a_batch_run_in_chunks_takes_the_same_step_as_the_whole_batch(
    tiny_llama, tiny_tokenizer, max_tokens: int
) -> None:
    """One row per chunk (max_tokens 1) and several rows per chunk: the gradient is the
    whole batch's, so the adapters agree to float rounding."""
    whole = two_adapters(tiny_llama)
    chunked = copy.deepcopy(whole)
    config = LoraTrainConfig(lr=1e-2, batch_size=len(EXAMPLES))
    first = train_adapter_steps(whole, "new", EXAMPLES, 3, config, 0, tokenizer=tiny_tokenizer)
    bounded = LoraTrainConfig(lr=1e-2, batch_size=len(EXAMPLES), max_batch_tokens=max_tokens)
    second = train_adapter_steps(chunked, "new", EXAMPLES, 3, bounded, 0, tokenizer=tiny_tokenizer)
    assert second.mean_loss == pytest.approx(first.mean_loss, rel=1e-5)
    assert (second.samples, second.tokens) == (first.samples, first.tokens)
    a, b = adapter_parameters(whole, "new"), adapter_parameters(chunked, "new")
    assert not all(torch.equal(a[key], torch.zeros_like(a[key])) for key in a if "lora_B" in key)
    for key in a:
        # Adam divides by the gradient's own size, so rounding in near-zero coordinates shows.
        assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_the_chunk_bound_follows_the_models_size(tiny_llama) -> None:
    from transformers import AutoConfig

    assert tokens_within(tiny_llama.config, 512) > 5_000  # the default model's shape
    smollm2_shape = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        vocab_size=49152,
    )
    # Calibrated there: 768 tokens took 2.8 GB.
    assert 120 < tokens_within(smollm2_shape, 512) < 200
    with pytest.raises(ValueError, match="max_batch_tokens"):
        LoraTrainConfig(max_batch_tokens=0)
