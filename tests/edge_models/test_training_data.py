"""Training data: records become examples, examples become padded batches."""

from __future__ import annotations

import itertools

import pytest
import torch

from edge_models.corpus import PromptPair
from edge_models.training_data import (
    IGNORE_INDEX,
    encode_example,
    examples_from_records,
    padded_batches,
)
from shared.records import Record


def test_records_become_examples_that_learn_what_the_user_wrote(tiny_tokenizer) -> None:
    records = [
        Record("s1", "pair", prompt="Where does alice paint?", completion=" in the garden."),
        Record("s2", "text", text="bob repairs the kitchen door."),
    ]
    pair, text = examples_from_records(records)
    assert pair == PromptPair("Where does alice paint?", " in the garden.")
    assert text == PromptPair("", "bob repairs the kitchen door.")

    ids, labels = encode_example(tiny_tokenizer, pair)
    learned = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == " in the garden." + tiny_tokenizer.eos_token
    ids, labels = encode_example(tiny_tokenizer, text)
    assert labels == [IGNORE_INDEX] + ids[1:]  # all but <s>


def encoded(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    """Examples whose ids name the example (its index + 10) and whose labels are their ids."""
    return [([i + 10] * n, [i + 10] * n) for i, n in enumerate(lengths)]


def test_batches_are_right_padded_and_cover_every_example_each_epoch() -> None:
    examples = encoded([3, 5, 2, 7, 4, 6])
    batches = padded_batches(examples, 2, 0, torch.Generator().manual_seed(0))
    seen = []
    for ids, mask, labels in itertools.islice(batches, 3):  # one epoch
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 2
        assert torch.equal(mask, (ids != 0).long())
        assert torch.equal(labels, torch.where(mask.bool(), ids, IGNORE_INDEX))
        assert (mask[:, 0] == 1).all()  # padding on the right only
        seen += ids[:, 0].tolist()
    assert sorted(seen) == [10, 11, 12, 13, 14, 15]


def test_the_rows_left_out_of_an_epoch_are_not_always_the_longest() -> None:
    # Seven rows in batches of three: one row sits out each epoch, and it must not be the
    # same one (the longest, once sorted) every time, or that row is never learned.
    examples = encoded([1, 2, 3, 4, 5, 6, 40])
    batches = padded_batches(examples, 3, 0, torch.Generator().manual_seed(0))
    seen = {row for ids, _, _ in itertools.islice(batches, 2 * 10) for row in ids[:, 0].tolist()}
    assert seen == set(range(10, 17))


def test_batches_repeat_for_a_seed_and_differ_for_another() -> None:
    examples = encoded([3, 5, 2, 7, 4, 6, 1, 8])

    def first_rows(seed: int) -> list[int]:
        batches = padded_batches(examples, 2, 0, torch.Generator().manual_seed(seed))
        return [row for ids, _, _ in itertools.islice(batches, 8) for row in ids[:, 0].tolist()]

    assert first_rows(0) == first_rows(0)
    assert first_rows(0) != first_rows(1)


def test_fewer_examples_than_a_batch_make_a_smaller_batch() -> None:
    ids, mask, _ = next(padded_batches(encoded([2, 3]), 16, 0, torch.Generator()))
    assert ids.shape == (2, 3) and mask.sum() == 5
    with pytest.raises(ValueError, match="no examples"):
        next(padded_batches([], 16, 0, torch.Generator()))
