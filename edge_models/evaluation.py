"""How well a model knows text: exact match of answers and next-token accuracy.

One implementation used by the model build report, the tests and the
benchmarks, so that every figure the project quotes is computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def normalise_answer(text: str) -> str:
    """The comparable part of an answer: the first line, without the closing full stop."""
    return text.strip().split("\n")[0].strip().removesuffix(".").strip().lower()


@torch.inference_mode()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of `prompts` (batched, left padded), decoded without specials."""
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = [
            tokenizer.bos_token + p if tokenizer.bos_token else p
            for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return out


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
) -> float:
    """Fraction of prompts whose greedy answer equals the expected one (normalised)."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if not prompts:
        return float("nan")
    got = greedy_answers(model, tokenizer, prompts)
    hits = sum(
        normalise_answer(g) == normalise_answer(a) for g, a in zip(got, answers, strict=True)
    )
    return hits / len(prompts)


@torch.inference_mode()
def next_token_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 64,
) -> float:
    """Fraction of tokens (after the first) that the model predicts exactly, teacher forced."""
    device = next(model.parameters()).device
    correct = total = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(texts), batch_size):
        chunk = [tokenizer.bos_token + t for t in texts[start : start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        logits = model(**enc).logits[:, :-1]
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool() & enc["attention_mask"][:, :-1].bool()
        correct += int(((logits.argmax(-1) == target) & mask).sum())
        total += int(mask.sum())
    model.train(was_training)
    return correct / total if total else float("nan")
