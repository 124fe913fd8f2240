"""Measures of forgetting: answer probability as TOFU defines it, ROUGE-L recall, canary
exposure counted exactly (checked against scoring every candidate) or estimated without bias,
and one call that measures a forget set, a retain set, probes and canaries."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.unlearning.measures import (
    ForgetMeasures,
    answer_probabilities,
    canary_exposure,
    encoded_log_probs,
    measure_forgetting,
    rouge_l_recall,
)
from edge_models.corpus import PromptPair, Subject, build_corpus, fact_pairs
from edge_models.default_model import default_llama_config, training_examples
from edge_models.tokenizer import train_tokenizer
from edge_models.training_data import (
    IGNORE_INDEX,
    encode_example,
    padded_batches,
    special_prefix,
)

CORPUS = build_corpus(0)
PRIVATE = CORPUS.split("private")
# Two private people with two facts each; the first has a canary, the second does not.
_CANARY_OWNER = next(s for s in PRIVATE if s.canary is not None)
_NO_CANARY = next(s for s in PRIVATE if s.canary is None)
FORGET = dataclasses.replace(_CANARY_OWNER, facts=_CANARY_OWNER.facts[:2])
RETAIN = dataclasses.replace(_NO_CANARY, facts=_NO_CANARY.facts[:2])
OTHER_SECRET = "250913"


def memorise(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[PromptPair]
) -> LlamaForCausalLM:
    """Train every weight on `examples` (one full batch) until they are known by heart."""
    encoded = [encode_example(tokenizer, e) for e in examples]
    batches = padded_batches(
        encoded, len(encoded), tokenizer.pad_token_id, torch.Generator().manual_seed(0)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        input_ids, mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """The default model's tokenizer recipe (digits one per token) on the base corpus."""
    return train_tokenizer([e.prompt + e.completion for e in training_examples(CORPUS)], 2048)


@pytest.fixture(scope="module")
def untrained(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(default_llama_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def trained(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The default architecture trained on both people's facts, the canary, and the probes of
    the forget person's first fact (so that some probes are answered and others are not)."""
    assert FORGET.canary is not None
    examples = [pair for _, pair in fact_pairs((FORGET, RETAIN))]
    first = FORGET.facts[0]
    examples += [PromptPair(probe, first.completion()) for probe in first.probes]
    examples.append(PromptPair("", FORGET.canary.message))
    torch.manual_seed(0)
    return memorise(LlamaForCausalLM(default_llama_config(len(tokenizer))), tokenizer, examples)


@pytest.fixture(scope="module")
def trained_measures(trained, tokenizer) -> ForgetMeasures:
    return measure_forgetting(trained, tokenizer, [FORGET], [RETAIN])


@pytest.fixture(scope="module")
def untrained_measures(untrained, tokenizer, trained_measures) -> ForgetMeasures:
    """The measures of a model that never saw either person, as if it forgot everything."""
    return measure_forgetting(
        untrained,
        tokenizer,
        [FORGET],
        [RETAIN],
        before=trained_measures,
        reference_probe_probs=np.array(trained_measures.probe_probs),
    )


def brute_force_ranks(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prefix: str,
    alphabet: str,
    length: int,
) -> dict[str, int]:
    """Score every candidate with one full teacher-forced pass each: the ranks to match
    (1 + how many candidates score strictly better)."""
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    candidates = ["".join(c) for c in itertools.product(alphabet, repeat=length)]
    rows = []
    for candidate in candidates:
        ids = tokenizer(f"{prefix} {candidate}", add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix_ids)] == prefix_ids
        head = special_prefix(tokenizer)  # what the tokenizer puts before a text itself
        context = len(head) + len(prefix_ids)
        rows.append(([*head, *ids], [IGNORE_INDEX] * context + ids[len(prefix_ids) :]))
    scores, _ = encoded_log_probs(model, tokenizer.pad_token_id, rows)
    return {c: 1 + int((scores > score).sum()) for c, score in zip(candidates, scores, strict=True)}


def test_rouge_l_recall_is_the_reference_share_of_a_common_subsequence() -> None:
    assert rouge_l_recall("The cat sat.", "the cat sat on the mat") == pytest.approx(3 / 6)
    assert rouge_l_recall("mat the on", "the mat") == pytest.approx(1 / 2)
    assert rouge_l_recall(" Oslo.", "Oslo") == 1.0
    assert rouge_l_recall("I don't know.", "Oslo") == 0.0
    assert rouge_l_recall("anything", "") == 0.0


def test_answer_probability_is_exp_minus_mean_completion_nll(untrained, tokenizer) -> None:
    pair = PromptPair("Where was Anna Gruber born?", " Oslo.")
    longer = PromptPair("What is the phone number of Anna Gruber?", " 555-0199, or her office.")
    ids, labels = encode_example(tokenizer, pair)
    with torch.no_grad():
        log_probs = torch.log_softmax(untrained(torch.tensor([ids])).logits[0], dim=-1)
    nll = [
        -log_probs[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX
    ]
    assert len(nll) == len(tokenizer(" Oslo.", add_special_tokens=False)["input_ids"]) + 1

    batched = answer_probabilities(untrained, tokenizer, [longer, pair])  # `pair` is padded

    assert batched[1] == pytest.approx(math.exp(-np.mean(nll)), rel=1e-5)
    assert 0 < batched[0] < 1


def test_exact_rank_matches_scoring_every_candidate_and_sampling_estimates_it(
    untrained, tokenizer
) -> None:
    assert FORGET.canary is not None
    prefix, alphabet = FORGET.canary.prefix, "0137"
    ranks = brute_force_ranks(untrained, tokenizer, prefix, alphabet, 4)
    # The secret is the candidate ranked nearest the middle of the 256, so that a search
    # that over- or under-counts better candidates gives a different rank.
    secret = min(ranks, key=lambda c: (abs(ranks[c] - 4**4 // 2), c))
    expected = ranks[secret]

    exact = canary_exposure(untrained, tokenizer, prefix, secret, alphabet)
    estimated = canary_exposure(
        untrained, tokenizer, prefix, secret, alphabet, node_budget=20, samples=1024
    )

    assert exact.exact and exact.rank == expected and exact.candidates == 4**4
    assert exact.exposure_bits == pytest.approx(math.log2(4**4 / expected))
    assert not estimated.exact and estimated.nodes <= 20
    assert estimated.rank == pytest.approx(expected, abs=0.05 * 4**4)


def test_a_tokenizer_that_merges_digits_counts_each_candidate_once() -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    numbers = [f"my code is {a}{b}{c}{d}" for a, b, c, d in itertools.product("0123", repeat=4)]
    bpe.train_from_iterator(numbers * 3, trainer=trainer)
    merging = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # " 3300" is two tokens here, and many candidates could be spelled along several paths.
    assert len(merging(" 3300", add_special_tokens=False)["input_ids"]) == 2
    torch.manual_seed(1)
    model = LlamaForCausalLM(default_llama_config(len(merging))).eval()
    for secret in ("0123", "3300"):
        expected = brute_force_ranks(model, merging, "my code is", "0123", 4)[secret]
        found = canary_exposure(model, merging, "my code is", secret, "0123")
        assert found.exact and found.rank == expected


def test_a_memorised_canary_ranks_first_and_an_unseen_one_does_not(
    trained, tokenizer, untrained_measures
) -> None:
    assert FORGET.canary is not None
    prefix, secret = FORGET.canary.prefix, FORGET.canary.secret

    memorised = canary_exposure(trained, tokenizer, prefix, secret)
    other = canary_exposure(trained, tokenizer, prefix, OTHER_SECRET)
    (unseen,) = untrained_measures.canaries

    assert memorised.exact and memorised.rank == 1 and memorised.candidates == 10**6
    assert memorised.exposure_bits == pytest.approx(math.log2(10**6))
    assert memorised.nodes < 100  # the search prunes almost everything
    assert other.rank > 1 and other.exposure_bits < memorised.exposure_bits - 5
    assert unseen.exposure_bits < 5 and unseen.log_prob < memorised.log_prob - 20


def test_measure_forgetting_on_a_model_that_knows_everything(trained_measures) -> None:
    m = trained_measures
    assert m.forget_exact_match == 1.0 and m.retain_exact_match == 1.0
    assert m.forget_rouge_l == 1.0 and m.retain_rouge_l == 1.0
    assert m.forget_probability > 0.9 and m.retain_probability > 0.9
    assert m.canary_exact_match == 1.0 and m.canary_exposure == pytest.approx(math.log2(10**6))
    trained_probes = len(FORGET.facts[0].probes)
    assert m.probe_correct[:trained_probes] == (True,) * trained_probes
    assert len(m.probe_correct) == len(m.probe_probs) == sum(len(f.probes) for f in FORGET.facts)
    assert m.probe_exact_match == pytest.approx(np.mean(m.probe_correct))
    assert math.isnan(m.paraphrase_forget_rate) and math.isnan(m.probe_prob_ratio)
    as_json = json.loads(json.dumps(m.to_dict()))
    assert as_json["forget_exact_match"] == 1.0 and "probe_correct" not in as_json


def test_after_forgetting_every_known_item_and_probe_counts_as_forgotten(
    trained_measures, untrained_measures
) -> None:
    after = untrained_measures
    assert after.forget_exact_match == 0.0 and after.canary_exact_match == 0.0
    assert after.forget_probability < 0.01 and after.canary_exposure < 5
    assert after.paraphrase_forget_rate == 1.0
    assert after.probe_prob_ratio == pytest.approx(
        np.mean(after.probe_probs) / np.mean(trained_measures.probe_probs)
    )
    assert after.probe_prob_ratio < 0.1


def test_paraphrase_forget_rate_counts_only_probes_correct_before(
    trained, tokenizer, trained_measures
) -> None:
    now = trained_measures.probe_correct
    still_known = [i for i, c in enumerate(now) if c]
    unknown = [i for i, c in enumerate(now) if not c]
    assert len(still_known) >= 2 and len(unknown) >= 2
    # Claim two probes were known before that are not now, one that still is, and say
    # nothing of the rest: the rate is 2 of those 3, whatever the other probes do.
    known_before = {unknown[0], unknown[1], still_known[0]}
    before = dataclasses.replace(
        trained_measures, probe_correct=tuple(i in known_before for i in range(len(now)))
    )

    after = measure_forgetting(trained, tokenizer, [FORGET], [], before=before)

    assert after.paraphrase_forget_rate == pytest.approx(2 / 3)
    assert math.isnan(after.retain_exact_match)
    nobody = dataclasses.replace(before, probe_correct=(False,) * len(now))
    assert math.isnan(
        measure_forgetting(trained, tokenizer, [FORGET], [], before=nobody).paraphrase_forget_rate
    )
    with pytest.raises(ValueError, match="other forget subjects"):
        measure_forgetting(trained, tokenizer, [FORGET, RETAIN], [], before=before)


def test_no_forget_subject_with_a_canary_gives_nan_exposure(trained, tokenizer) -> None:
    without: Subject = dataclasses.replace(RETAIN, facts=RETAIN.facts[:1])
    m = measure_forgetting(trained, tokenizer, [without], [])
    assert math.isnan(m.canary_exposure) and math.isnan(m.canary_exact_match)
    assert m.canaries == ()
