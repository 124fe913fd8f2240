"""Generation with ONNX Runtime: batching, sampling and stop conditions, against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.inference import OnnxGenerator, SamplingParams, choose_tokens, left_pad
from edge_models.onnx_export import export_causal_lm

PROMPTS = ["alice paints", "the old baker sells seven apples", "bob"]


@pytest.fixture(scope="module")
def generator(
    tiny_llama: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    tmp_path_factory: pytest.TempPathFactory,
) -> OnnxGenerator:
    directory = tmp_path_factory.mktemp("export")
    export_causal_lm(tiny_llama, directory)
    tiny_tokenizer.save_pretrained(directory)
    return OnnxGenerator.load(directory, device="cpu")


def prompt_ids(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def test_greedy_batch_equals_transformers_generate(
    generator: OnnxGenerator, tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Left-padded batch through ORT's cache gives the tokens transformers' own generate gives."""
    prompts = prompt_ids(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    ours = [c.token_ids for c in generator.generate_ids(prompts, params)]
    input_ids, mask = left_pad(prompts, pad_token_id=0)
    with torch.inference_mode():
        theirs = tiny_llama.generate(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
        )[:, input_ids.shape[1] :]
    assert ours == [tuple(row) for row in theirs.tolist()]


def test_a_prompt_generates_the_same_alone_or_in_a_padded_batch(
    generator: OnnxGenerator, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = prompt_ids(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=10, stop_at_eos=False)
    batched = generator.generate_ids(prompts, params)
    alone = [generator.generate_ids([prompt], params)[0] for prompt in prompts]
    assert batched == alone


def test_text_is_the_decoded_tokens(
    generator: OnnxGenerator, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    completions = generator.generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_at_eos=False))
    assert len(completions) == len(PROMPTS)
    for completion in completions:
        assert len(completion.token_ids) == 8 and completion.finish_reason == "length"
        assert completion.text == tiny_tokenizer.decode(completion.token_ids)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(generator: OnnxGenerator):
    def sample(seed: int) -> list[tuple[int, ...]]:
        params = SamplingParams(
            max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=seed, stop_at_eos=False
        )
        return [c.token_ids for c in generator.generate(PROMPTS, params)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_eos_ends_a_row_and_the_others_go_on(
    generator: OnnxGenerator, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = prompt_ids(tiny_tokenizer)
    free = generator.generate_ids(prompts, SamplingParams(max_new_tokens=10, stop_at_eos=False))
    end = free[0].token_ids[3]  # treat the first row's fourth token as end of sequence
    params = SamplingParams(max_new_tokens=10, eos_token_ids=(end,))
    stopped = generator.generate_ids(prompts, params)
    for before, after in zip(free, stopped, strict=True):
        if end in before.token_ids:
            cut = before.token_ids.index(end) + 1
            assert (after.token_ids, after.finish_reason) == (before.token_ids[:cut], "eos")
        else:
            assert after == before


def test_stop_string_ends_generation_and_is_cut_from_the_text(
    generator: OnnxGenerator, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    free = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, stop_at_eos=False))
    text = free[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(max_new_tokens=16, stop_at_eos=False, stop_strings=("@@", stop))
    (stopped,) = generator.generate(PROMPTS[:1], params)
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert len(stopped.token_ids) < len(free[0].token_ids)
    assert stop in tiny_tokenizer.decode(stopped.token_ids)


def test_too_long_a_request_is_refused(generator: OnnxGenerator) -> None:
    positions = generator.session.manifest.max_positions
    with pytest.raises(ValueError, match="positions"):
        generator.generate_ids([[5] * (positions - 10)], SamplingParams(max_new_tokens=11))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_stop_strings_need_a_tokenizer(generator: OnnxGenerator) -> None:
    bare = OnnxGenerator(generator.session, tokenizer=None)
    assert len(bare.generate_ids([[5, 6]], SamplingParams(max_new_tokens=3))[0].token_ids) <= 3
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate_ids([[5, 6]], SamplingParams(stop_strings=("x",)))


def test_load_takes_the_exports_own_tokenizer(generator: OnnxGenerator) -> None:
    assert generator.tokenizer is not None and generator.tokenizer.pad_token_id == 0


LOGITS = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))


def draws(**params: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return choose_tokens(LOGITS, SamplingParams(**params), rng)


def test_sampling_follows_the_softmax() -> None:
    frequencies = np.bincount(draws(temperature=1.0), minlength=4) / len(LOGITS)
    assert np.allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens() -> None:
    assert set(draws(temperature=1.0, top_k=2).tolist()) == {0, 1}
    assert set(draws(temperature=1.0, top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(temperature=1.0, top_p=0.5).tolist()) == {0}
    frequencies = np.bincount(draws(temperature=1.0, top_k=2), minlength=4) / len(LOGITS)
    assert np.allclose(frequencies[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    assert set(draws(temperature=0.05).tolist()) == {0}
    flat = np.bincount(draws(temperature=100.0), minlength=4) / len(LOGITS)
    assert np.allclose(flat, 0.25, atol=0.03)
    assert (draws(temperature=0.0) == 0).all()
