"""How well a model knows text: exact match of answers and next-token accuracy.

One implementation used by the model build report, the tests and the
benchmarks, so that every figure the project quotes is computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edge_models.corpus import PromptPair
from edge_models.training_data import (
    IGNORE_INDEX,
    encode_example,
    prompt_ids,
    right_padded,
    special_prefix,
)


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
    """Greedy continuations of `prompts` (batched, left padded), decoded without specials.

    Prompts are encoded as generation on the device encodes them (the
    tokenizer's own prefix, `edge_models.training_data.prompt_ids`).
    """
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, width:]
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
    """Fraction of tokens (after the first) that the model predicts exactly, teacher forced.

    Texts are read behind the tokenizer's own prefix (`<s>` for the default model).
    """
    device = next(model.parameters()).device
    prefix = special_prefix(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = total = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(texts), batch_size):
        encoded = [
            prefix + tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts[start : start + batch_size]
        ]
        rows = [(row, row) for row in encoded]  # labels unused: the targets are the ids
        ids, attention, _ = right_padded(rows, pad)
        ids, attention = ids.to(device), attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        target = ids[:, 1:]
        mask = attention[:, 1:].bool() & attention[:, :-1].bool()
        correct += int(((logits.argmax(-1) == target) & mask).sum())
        total += int(mask.sum())
    model.train(was_training)
    return correct / total if total else float("nan")


@dataclass(frozen=True)
class CompletionFit:
    """How well a model knows examples' completions, teacher forced, one entry per example.

    `exact[i]`: the argmax is the target at every learned position of example
    i (its completion and the closing eos): greedy decoding after the prompt
    produces exactly that completion and stops. `loss[i]`: its mean
    cross-entropy (nats per learned token).
    """

    exact: list[bool]
    loss: list[float]

    def match(self, which: Sequence[int] | None = None) -> float:
        picked = range(len(self.exact)) if which is None else which
        values = [self.exact[i] for i in picked]
        return sum(values) / len(values) if values else float("nan")

    def mean_loss(self, which: Sequence[int] | None = None) -> float:
        picked = range(len(self.loss)) if which is None else which
        values = [self.loss[i] for i in picked]
        return sum(values) / len(values) if values else float("nan")


@torch.inference_mode()
def completion_fit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PromptPair],
    batch_size: int = 16,
) -> CompletionFit:
    """Teacher-forced exact match and loss of each example's completion, in one forward pass.

    The same encoding as training (`encode_example`), so what is measured is
    what was trained; rows are batched by length so little goes into padding.
    The model is put in eval mode for the measurement (no dropout) and back.
    """
    device = next(model.parameters()).device
    encoded = [encode_example(tokenizer, e) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    exact = [False] * len(encoded)
    loss = [float("nan")] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            ids, mask, labels = right_padded([encoded[i] for i in picked], pad)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            target = labels[:, 1:]
            learned = target != IGNORE_INDEX
            safe = target.clamp_min(0)
            token_loss = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), safe, reduction="none"
            )
            right = (logits.argmax(-1) == safe) | ~learned
            counts = learned.sum(1).clamp_min(1)
            row_loss = (token_loss * learned).sum(1) / counts
            for row, i in enumerate(picked):
                exact[i] = bool(right[row].all())
                loss[i] = float(row_loss[row])
    finally:
        model.train(was_training)
    return CompletionFit(exact, loss)
