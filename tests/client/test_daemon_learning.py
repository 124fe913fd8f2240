"""A device learns what it is given until it knows it: training and generation read prompts
behind the same prefix, the held-in measure is greedy exact match, a burst trains until its
records are known (not for a fixed step count), and on the real default build a device
answers the written-apart set's facts, which the project's corpus never phrases that way."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from client.daemon import DaemonConfig, DeviceDaemon
from client.inference import SamplingParams
from client.learner import LearnerConfig
from client.learning_rule import LearningRule
from client.lora_training import LoraTrainConfig
from edge_models.corpus import PromptPair
from edge_models.evaluation import completion_fit, greedy_answers, normalise_answer
from edge_models.training_data import encode_example, prompt_ids, special_prefix
from lethe.bench.learning import SET_DIR, answer_report, load_written_apart
from shared.paths import DataDir


def without_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same vocabulary with a tokenizer that adds nothing to a text (as SmolLM2's)."""
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_training_reads_a_prompt_as_generation_does(tiny_tokenizer) -> None:
    for tokenizer in (tiny_tokenizer, without_bos(tiny_tokenizer)):
        prompt = "alice paints the blue map"
        generated_from = tokenizer(prompt)["input_ids"]  # what client.inference encodes
        assert prompt_ids(tokenizer, prompt) == generated_from
        ids, labels = encode_example(tokenizer, PromptPair(prompt, " at dawn."))
        assert ids[: len(generated_from)] == generated_from
        assert all(label == -100 for label in labels[: len(generated_from)])
        assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    assert special_prefix(tiny_tokenizer) == [tiny_tokenizer.bos_token_id]
    assert special_prefix(without_bos(tiny_tokenizer)) == []


def test_teacher_forced_exact_match_is_greedy_exact_match(tiny_llama, tiny_tokenizer) -> None:
    # Whatever the model, an example counts as known exactly when greedy decoding after its
    # prompt gives the completion and stops: take the model's own greedy answers as targets.
    prompts = ["alice paints", "bob repairs the", "the courier sells", "my neighbour"]
    answers = greedy_answers(tiny_llama, tiny_tokenizer, prompts, max_new_tokens=4)
    own = [PromptPair(p, a) for p, a in zip(prompts, answers, strict=True)]
    fit = completion_fit(tiny_llama, tiny_tokenizer, own)
    # An answer cut at 4 tokens did not end with eos: it is not known "and stops".
    ended = [len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) < 4 for a in answers]
    assert fit.exact == ended
    wrong = [PromptPair(p, " seven apples every friday.") for p in prompts]
    assert completion_fit(tiny_llama, tiny_tokenizer, wrong).exact == [False] * len(prompts)
    assert all(loss > 0 for loss in fit.loss)


def drop(data: DataDir, rows: list[dict]) -> None:
    staged = data.device / "inbox" / "r.jsonl.part"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    staged.rename(staged.with_suffix(""))


def test_a_burst_trains_until_its_records_are_known(
    tmp_path: Path, tiny_daemon_config: DaemonConfig
) -> None:
    rows = [
        {"subject_id": "ann", "prompt": "alice paints", "completion": " seven apples."},
        {"subject_id": "ann", "prompt": "bob repairs", "completion": " the blue map."},
        {"subject_id": "ann", "prompt": "the courier sells", "completion": " a red bicycle."},
    ]
    # A random-weights model answers right with thin margins: the loss target is loose here.
    rule = LearningRule(target_match=1.0, target_loss=5.0, check_every=10, patience=10)
    learner = LearnerConfig(block_rank=16, blocks=2, train=LoraTrainConfig(lr=1e-2, batch_size=4))
    config = replace(
        tiny_daemon_config,
        max_steps_per_burst=600,
        max_burst_records=8,
        learning=rule,
        learner=learner,
    )
    data = DataDir(tmp_path)
    with DeviceDaemon(data, config) as daemon:
        drop(data, rows)
        daemon.ingest_inbox()
        burst = daemon.train_burst()
        assert burst is not None and burst.stopped == "learned", burst
        assert burst.held_in_match == 1.0 and burst.held_in_loss <= 5.0
        assert burst.steps > 3 and burst.steps % 10 == 0  # not the old fixed 3 steps
        got = daemon.generate([r["prompt"] for r in rows], SamplingParams(max_new_tokens=8))
        assert [normalise_answer(c.text) for c in got] == [
            normalise_answer(r["completion"]) for r in rows
        ]


def test_a_fixed_schedule_is_still_there_when_asked(
    tmp_path: Path, tiny_daemon_config: DaemonConfig
) -> None:
    config = replace(tiny_daemon_config, epochs_per_burst=1.0)
    data = DataDir(tmp_path)
    with DeviceDaemon(data, config) as daemon:
        drop(data, [{"subject_id": "ann", "prompt": "alice", "completion": " paints."}])
        daemon.ingest_inbox()
        burst = daemon.train_burst()
        assert burst is not None and burst.stopped == "fixed" and burst.steps == 1


def test_the_written_apart_set_is_unlike_one_template() -> None:
    full = load_written_apart()
    assert len(full.people()) == 40
    facts = [p for p in full.facts if p.kind != "text"]
    assert len(facts) == 200 and len(full.paraphrases) == 3 * len(facts)
    kinds = {p.kind for p in facts}
    assert len(kinds) >= 10 and "door_code" in kinds
    assert sum(r.get("text") is not None for r in full.records) >= 20
    for kind in kinds:
        answers = [p.answer for p in facts if p.kind == kind]
        assert len(set(answers)) == len(answers)  # no answer shared inside a kind
    trained = {p.prompt for p in full.facts}
    assert not trained & {p.prompt for p in full.paraphrases}  # paraphrases are held out
    assert (SET_DIR / "README.md").exists()
    # A model that answers one thing to every prompt of a kind is seen.
    door = [p for p in facts if p.kind == "door_code"]
    report = answer_report(door, [door[0].answer] * len(door))
    assert report["worst_wrong_share"] > 0.9
