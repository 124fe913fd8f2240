"""`lethe bench continual`: a model's scale and format, and a tiny end-to-end run on a model
directory (the figures mean nothing here: a random-weight model trains two steps a domain)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from edge_models.corpus import build_corpus, format_prompt, partition
from edge_models.default_model import DEFAULT_MODEL_NAME
from lethe.bench.continual import (
    BenchSettings,
    domain_tasks,
    formatted_task,
    run_continual_bench,
    settings_for,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_the_default_model_keeps_its_tuned_settings() -> None:
    assert settings_for(None) == BenchSettings()
    assert settings_for(DEFAULT_MODEL_NAME) == BenchSettings()
    assert BenchSettings().people is None and BenchSettings().pair_format == "plain"


def test_a_pretrained_model_runs_a_smaller_stream() -> None:
    small, default = settings_for("smollm2"), BenchSettings()
    assert small.people is not None and small.people < 30
    assert small.steps_per_domain < default.steps_per_domain
    assert small.blocks == 5  # one block per domain still


def test_the_chat_format_renders_questions_and_pairs_but_keeps_answers_and_text(
    tiny_tokenizer,
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    corpus = build_corpus(0)
    subjects = partition(corpus, 4, seed=0)[0].subject_ids[:2]
    task = domain_tasks(corpus, subjects)[0]
    assert formatted_task(task, tokenizer, "plain") is task
    chat = formatted_task(task, tokenizer, "chat")
    for before, after in zip(task.records, chat.records, strict=True):
        assert (after.subject_id, after.kind, after.ts) == (
            before.subject_id,
            before.kind,
            before.ts,
        )
        if before.kind == "text":
            assert after == before
        else:
            assert after.prompt == format_prompt(before.prompt, tokenizer, "chat")
            assert after.prompt.endswith("<s>assistant\n") and before.prompt in after.prompt
            assert after.completion == before.completion.strip()
    for name in ("trained", "heldout", "probes"):
        pairs, rendered = getattr(task, name), getattr(chat, name)
        assert [a for _, a in rendered] == [a for _, a in pairs]
        assert [q for q, _ in rendered] == [format_prompt(q, tokenizer, "chat") for q, _ in pairs]
    assert chat.texts == task.texts


@pytest.mark.slow
def test_a_model_directory_runs_the_bench_and_is_named(tmp_path: Path, tiny_model_dir) -> None:
    settings = BenchSettings(
        steps_per_domain=2,
        batch_size=4,
        people=2,
        blocks=5,
        block_rank=2,
        flop_steps=1,
        full_matrix=False,
    )
    path = tmp_path / "continual.json"
    report = run_continual_bench(
        path,
        device="cpu",
        settings=settings,
        methods=("lethe",),
        model=tiny_model_dir,
        model_name="tiny",
    )
    assert json.loads(path.read_text())["model"] == "tiny"
    assert report["settings"]["people"] == 2 and report["model_build_s"] is None
    matrix = report["methods"]["lethe"]["probe_acc_matrix"]
    # Only the diagonal and the last row are measured: all that avg acc and BWT need.
    for row, cells in enumerate(matrix):
        measured = [i for i, x in enumerate(cells) if x is not None]
        assert measured == (list(range(5)) if row == 4 else [row])
        assert all(0 <= cells[i] <= 100 for i in measured)
    assert math.isfinite(report["methods"]["lethe"]["bwt"])
