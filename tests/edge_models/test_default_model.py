"""The default model: training data, determinism, and a real build that knows its corpus."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edge_models.corpus import build_corpus, fact_pairs
from edge_models.default_model import (
    BuildConfig,
    train_default_model,
    training_examples,
)
from edge_models.evaluation import exact_match
from edge_models.loading import load_causal_lm
from edge_models.model_store import current, verify


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(0, base_subjects=8, private_subjects=8)


def test_training_examples_hold_no_private_subject(corpus) -> None:
    texts = " ".join(e.prompt + e.completion for e in training_examples(corpus))
    for subject in corpus.split("private"):
        assert subject.name not in texts
    for fact, pair in fact_pairs(corpus.split("base")):
        assert pair.prompt in texts and fact.answer in texts


def test_equal_seeds_train_equal_models(corpus) -> None:
    config = BuildConfig(
        steps=3, warmup_steps=1, batch_size=8, vocab_size=512, device="cpu", time_budget_s=None
    )
    first, _, report = train_default_model(corpus, config)
    second, _, _ = train_default_model(corpus, config)
    assert report.steps == 3
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    third, _, _ = train_default_model(corpus, dataclasses.replace(config, seed=1))
    assert not torch.equal(first.model.embed_tokens.weight, third.model.embed_tokens.weight)


@pytest.mark.slow
def test_build_publishes_a_model_that_knows_its_corpus(built_default_model) -> None:
    """A real build: default architecture and corpus, on the CPU, a fixed step count."""
    models_root, version, report = built_default_model
    assert version.version == 1 and current(models_root, "default").version == 1
    verify(version)
    assert version.metadata["report"]["fact_exact_match"] == report.fact_exact_match
    # Regression guards a little below what this build reaches (fact exact match
    # 0.87-0.88, held-out next-token accuracy 0.68-0.69 at 1,200 steps). Refusals on
    # unknown people depend on the machine's float rounding: the same code and seeds gave
    # 0.40 on one machine and 0.22 on another (final loss 0.0116 both), so they are only
    # guarded against collapse.
    assert report.steps == 1200 and not report.ended_by_time_budget
    assert report.fact_exact_match >= 0.8, report
    assert report.heldout_next_token_accuracy >= 0.6, report
    assert report.refusal_exact_match >= 0.15, report

    # The published directory loads like any Hugging Face model and answers the same.
    loaded = load_causal_lm(version.path, device="cpu")
    pairs = list(fact_pairs(build_corpus(0).split("base")))[:64]
    prompts, answers = [p.prompt for _, p in pairs], [f.answer for f, _ in pairs]
    reloaded = exact_match(loaded.model, loaded.tokenizer, prompts, answers)
    assert reloaded >= report.fact_exact_match - 0.15
