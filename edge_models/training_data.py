"""Turning examples into training batches, shared by every training loop in the project.

The default model's build, the federated train step and the continual learner
must learn the same thing from the same example (the completion only), so
the encoding and the batching live here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from edge_models.corpus import PromptPair
from shared.records import Record

IGNORE_INDEX = -100  # label of positions that carry no loss (transformers convention)

EncodedExample = tuple[list[int], list[int]]  # token ids, labels
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input ids, attention mask, labels


def examples_from_records(records: Iterable[Record]) -> list[PromptPair]:
    """A device's records as training examples.

    A text record becomes a pair with an empty prompt, so the whole text is
    learned; a pair record keeps its split, so only the completion is.
    """
    return [
        PromptPair("", record.text)
        if record.kind == "text"
        else PromptPair(record.prompt, record.completion)
        for record in records
    ]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens `tokenizer` puts before a text of its own accord (its convention).

    The default model's tokenizer opens every text with `<s>`; SmolLM2's adds
    nothing (its bos, `<|im_start|>`, belongs to the chat template). Training,
    evaluation and generation must all read a prompt behind the same prefix,
    and generation (`client.inference`) encodes prompts with `tokenizer(prompt)`,
    so the prefix is whatever that call adds, never `bos_token_id` by fiat.
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids as generation sees them: the tokenizer's prefix, then the prompt."""
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return [*special_prefix(tokenizer), *body]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: PromptPair) -> EncodedExample:
    """Token ids and labels of one example: `prefix prompt completion eos`.

    `prefix` is what the tokenizer adds before a text by itself (`<s>` for the
    default model, nothing for SmolLM2): what generation reads. Only the
    completion (and the closing eos) is learned: predicting a question's
    wording spends capacity the facts need. The completion is encoded apart
    from the prompt, as greedy decoding produces it token by token after the
    prompt's own tokens.
    """
    prompt = prompt_ids(tokenizer, example.prompt)
    target = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids = [*prompt, *target]
    labels = [IGNORE_INDEX] * len(prompt) + target
    return ids, labels


def padded_batches(
    examples: Sequence[EncodedExample], batch_size: int, pad_id: int, gen: torch.Generator
) -> Iterator[Batch]:
    """Endless shuffled epochs of right-padded CPU batches (input ids, attention mask, labels).

    Rows of similar length are batched together (sorted within windows of
    sixteen batches) so little compute goes into padding. Fewer examples than
    `batch_size` make smaller batches: a device may hold only a few records.
    """
    if not examples:
        raise ValueError("no examples to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = min(batch_size, len(examples))
    window = batch_size * 16
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        # Full batches only (a smaller last batch made the real fleet's shared model worse on
        # held-out text). The rows left out are the shuffled order's tail, a different few each
        # epoch; leaving out the tail of the length-sorted order instead would drop the same
        # longest rows (a canary message, say) from every epoch and never train them.
        order = order[: len(order) - len(order) % batch_size]
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield right_padded([examples[i] for i in batches[b]], pad_id)


def right_padded(rows: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Rows in their order, padded on the right: a causal model reads each row as if alone."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(row_labels)
    return input_ids, mask, labels
