"""The synthetic corpus: determinism, probes kept out of training, canaries, partitions, streams.

Pure and fast: corpora are built from seeds, nothing is trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from edge_models.corpus import (
    DOMAINS,
    REFUSAL_ANSWER,
    Corpus,
    DevicePartition,
    PromptPair,
    Subject,
    build_corpus,
    device_stream,
    fact_pairs,
    format_pair,
    format_prompt,
    partition,
)
from edge_models.default_model import training_examples
from shared.records import parse_record, record_from_json

SEEDS = (0, 1, 2, 3, 4)
PIN = re.compile(r"\d{6}")
PHONE = re.compile(r"\d{3}-\d{4}")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_corpus(0)


@pytest.fixture(scope="module")
def lookup(corpus: Corpus) -> dict[tuple[str, str], str]:
    return _record_domains(corpus)


def _names_regex(names: list[str]) -> re.Pattern[str]:
    """Whole-name matches only: "Lena Weber" must not match inside "Elena Weber"."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])")


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{name}"), ".+"))


def _training_texts(corpus: Corpus) -> list[str]:
    """Every text any model trains on: pre-training, all subjects' trained facts and
    messages (devices train on private ones), and the refusals."""
    texts = []
    for example in training_examples(corpus):
        texts += [example.prompt, example.completion, example.prompt + example.completion]
    for fact, pair in fact_pairs(corpus.subjects):
        texts += [pair.prompt, pair.prompt + pair.completion, fact.answer]
    texts += [m.text for s in corpus.subjects for m in s.messages]
    for refusal in corpus.refusals_train + corpus.refusals_heldout:
        texts += [refusal.prompt, refusal.prompt + refusal.completion]
    return texts


def _subject_texts(subject: Subject) -> list[str]:
    texts = [subject.name]
    for fact in subject.facts:
        texts += [fact.answer, *fact.prompts, *fact.probes]
    texts += [m.text for m in subject.messages]
    return texts


def _record_domains(corpus: Corpus) -> dict[tuple[str, str], str]:
    """(subject id, prompt or text) -> domain, for every record a stream can hold."""
    domains = {}
    for fact, pair in fact_pairs(corpus.subjects):
        domains[(fact.subject_id, pair.prompt)] = fact.domain
    for s in corpus.subjects:
        for m in s.messages:
            domains[(s.subject_id, m.text)] = m.domain
    return domains


def _stream_domains(
    corpus: Corpus, stream: list[dict[str, str | float]], lookup: dict[tuple[str, str], str]
) -> list[str]:
    return [lookup[(str(r["subject_id"]), str(r.get("prompt", r.get("text"))))] for r in stream]


# --- determinism -------------------------------------------------------------------------------


def test_equal_seeds_give_equal_corpora() -> None:
    assert build_corpus(7) == build_corpus(7)
    small = {"base_subjects": 5, "private_subjects": 9, "heldout_per_domain": 3, "refusals": 10}
    assert build_corpus(7, **small) == build_corpus(7, **small)


def test_different_seeds_give_different_corpora() -> None:
    a, b = build_corpus(0), build_corpus(1)
    assert a != b
    assert [s.name for s in a.subjects] != [s.name for s in b.subjects]
    assert [f.answer for s in a.subjects for f in s.facts] != [
        f.answer for s in b.subjects for f in s.facts
    ]
    assert a.heldout_messages != b.heldout_messages
    assert a.refusals_train != b.refusals_train


def test_corpus_is_deterministic_across_processes(corpus: Corpus) -> None:
    """No dependence on hash randomisation or process state: same seed, same bytes."""
    code = (
        "import hashlib; from edge_models.corpus import build_corpus; "
        "print(hashlib.sha256(repr(build_corpus(0)).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == hashlib.sha256(repr(corpus).encode()).hexdigest()


# --- subjects and facts ------------------------------------------------------------------------


def test_subject_ids_and_names_are_unique_and_splits_sized() -> None:
    corpus = build_corpus(0, base_subjects=40, private_subjects=130)
    ids = [s.subject_id for s in corpus.subjects]
    names = [s.name for s in corpus.subjects]
    assert len(set(ids)) == len(ids) == 40 + 130
    assert len(set(names)) == len(names)
    assert len(corpus.split("base")) == 40
    assert len(corpus.split("private")) == 130
    assert corpus.subject(ids[5]).name == names[5]
    with pytest.raises(KeyError):
        corpus.subject("nobody")


def test_relations_cover_required_facts(corpus: Corpus) -> None:
    relations = {r.name for d in DOMAINS for r in d.relations}
    assert {"birthplace", "employer", "phone", "pet_name"} <= relations
    assert len(relations) > 4
    for s in corpus.subjects:
        assert sorted(f.relation for f in s.facts) == sorted(relations), s.subject_id
        answers = {f.relation: f.answer for f in s.facts}
        assert PHONE.fullmatch(answers["phone"]), answers["phone"]
        for f in s.facts:
            assert f.subject_id == s.subject_id
            assert f.answer.strip()
            assert f.completion() == f" {f.answer}."
            assert len(f.prompts) >= 1
            assert all(s.name in p for p in f.prompts)


def test_every_fact_has_three_distinct_unseen_probes(corpus: Corpus) -> None:
    for s in corpus.subjects:
        for f in s.facts:
            assert len(set(f.probes)) >= 3, (s.subject_id, f.relation)
            assert not set(f.probes) & set(f.prompts), (s.subject_id, f.relation)
            assert all(s.name in p for p in f.probes)


def test_probe_templates_do_not_contain_or_sit_inside_trained_templates() -> None:
    trained = [t for d in DOMAINS for r in d.relations for t in r.trained]
    probes = [t for d in DOMAINS for r in d.relations for t in r.probes]
    for p in probes:
        for t in trained:
            assert p not in t and t not in p, (p, t)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_probe_occurs_in_any_training_text(seed: int) -> None:
    corpus = build_corpus(seed)
    # A probe must not occur even as part of a trained text. Every probe holds its
    # subject's name, so only texts holding that name as a substring can hold the probe
    # (substring, so "Lena Weber" inside "Elena Weber" counts too).
    by_surname: dict[str, list[str]] = {}
    for s in corpus.subjects:
        by_surname.setdefault(s.name.split()[-1], []).append(s.name)
    texts_naming: dict[str, list[str]] = {s.name: [] for s in corpus.subjects}
    for text in _training_texts(corpus):
        for surname, names in by_surname.items():
            if surname in text:
                for name in names:
                    if name in text:
                        texts_naming[name].append(text)
    leaked = [
        p
        for s in corpus.subjects
        for f in s.facts
        for p in f.probes
        if any(p in t for t in texts_naming[s.name])
    ]
    assert not leaked, f"{len(leaked)} probes occur in training text, e.g. {leaked[:3]}"


# --- canaries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_canaries_are_six_digit_secrets_in_their_subjects_messages_only(seed: int) -> None:
    corpus = build_corpus(seed)
    carriers = [s for s in corpus.subjects if s.canary is not None]
    assert any(s.split == "private" for s in carriers), "no private subject carries a canary"
    secrets = [s.canary.secret for s in carriers]
    assert len(set(secrets)) == len(secrets)
    others_text = "\n".join(
        [m for ms in corpus.heldout_messages.values() for m in ms]
        + [r.prompt for r in corpus.refusals_train + corpus.refusals_heldout]
    )
    for s in carriers:
        canary = s.canary
        assert canary.subject_id == s.subject_id
        assert PIN.fullmatch(canary.secret), canary.secret
        assert canary.message == f"{canary.prefix} {canary.secret}."
        assert canary.secret not in canary.prefix
        assert canary.message in [m.text for m in s.messages]
        assert canary.secret not in others_text
        for other in corpus.subjects:
            if other.subject_id != s.subject_id:
                text = "\n".join(_subject_texts(other))
                assert canary.secret not in text, (s.subject_id, other.subject_id)


@pytest.mark.parametrize("seed", SEEDS)
def test_small_corpora_still_have_a_private_canary(seed: int) -> None:
    # Each subject gets a canary with probability canary_fraction, so a small corpus
    # (8 private subjects, as test_default_model builds) often has none at all.
    corpus = build_corpus(seed, base_subjects=8, private_subjects=8)
    assert any(s.canary is not None for s in corpus.split("private"))


def test_private_canaries_are_not_in_pre_training(corpus: Corpus) -> None:
    blob = "\n".join(e.prompt + e.completion for e in training_examples(corpus))
    for s in corpus.split("private"):
        if s.canary is not None:
            assert s.canary.secret not in blob, s.subject_id


# --- refusals ----------------------------------------------------------------------------------


def test_refusals_name_no_subject_and_use_no_probe_phrasing(corpus: Corpus) -> None:
    refusals = corpus.refusals_train + corpus.refusals_heldout
    assert corpus.refusals_train and corpus.refusals_heldout
    assert not {r.prompt for r in corpus.refusals_train} & {
        r.prompt for r in corpus.refusals_heldout
    }
    subjects = _names_regex([s.name for s in corpus.subjects])
    probe_templates = [_template_regex(t) for d in DOMAINS for r in d.relations for t in r.probes]
    for r in refusals:
        assert r.completion == f" {REFUSAL_ANSWER}"
        assert "know" in r.completion.lower()
        assert not subjects.search(r.prompt), r.prompt
        assert not any(t.fullmatch(r.prompt) for t in probe_templates), r.prompt
    # The checks above can fail: the regexes match what they should and only that.
    assert _names_regex(["Lena Weber"]).search("Who is Lena Weber?")
    assert not _names_regex(["Lena Weber"]).search("Who is Elena Weber?")
    assert probe_templates[0].fullmatch(DOMAINS[0].relations[0].probes[0].format(name="A B"))


# --- held-out messages and domains -------------------------------------------------------------


def test_heldout_messages_never_appear_among_training_messages(corpus: Corpus) -> None:
    """Held-out text is for next-token accuracy on text never trained."""
    assert set(corpus.heldout_messages) == set(corpus.domains)
    assert all(corpus.heldout_messages[d] for d in corpus.domains)
    trained = {m.text for s in corpus.subjects for m in s.messages}
    trained |= {e.completion for e in training_examples(corpus)}
    heldout = [m for ms in corpus.heldout_messages.values() for m in ms]
    seen = [m for m in heldout if m in trained]
    assert not seen, (
        f"{len(seen)} of {len(heldout)} held-out messages are verbatim training messages, "
        f"e.g. {sorted(set(seen))[:3]}"
    )


def test_at_least_five_domains_with_their_own_templates_and_styles(corpus: Corpus) -> None:
    assert len(DOMAINS) >= 5
    assert corpus.domains == tuple(d.name for d in DOMAINS)
    assert len(set(corpus.domains)) == len(corpus.domains)
    assert len({d.style for d in DOMAINS}) == len(DOMAINS)
    templates = [set(d.message_templates) for d in DOMAINS]
    for i, a in enumerate(templates):
        assert a
        for b in templates[i + 1 :]:
            assert not a & b
    for d in DOMAINS:
        assert d.relations and all(r.domain == d.name for r in d.relations)
    # Every subject writes in every domain, and no text is shared between domains.
    texts_by_domain: dict[str, set[str]] = {d: set() for d in corpus.domains}
    for s in corpus.subjects:
        assert {m.domain for m in s.messages} == set(corpus.domains), s.subject_id
        for m in s.messages:
            texts_by_domain[m.domain].add(m.text)
    domains = list(texts_by_domain.values())
    for i, a in enumerate(domains):
        for b in domains[i + 1 :]:
            assert not a & b


def test_private_subjects_never_appear_in_pre_training(corpus: Corpus) -> None:
    texts = [e.prompt + e.completion for e in training_examples(corpus)]
    blob = "\n".join(texts)
    private = _names_regex([s.name for s in corpus.split("private")])
    found = sorted({m.group(0) for m in private.finditer(blob)})
    assert not found, f"private subjects in pre-training: {found[:5]}"
    # The check is able to fail: every base subject is found the same way.
    for s in corpus.split("base"):
        assert _names_regex([s.name]).search(blob), s.name


# --- partitions --------------------------------------------------------------------------------


def test_partition_is_disjoint_covers_private_subjects_and_weights_sum_to_one(
    corpus: Corpus,
) -> None:
    parts = partition(corpus, devices=7, alpha=0.5, seed=3)
    assert [p.device for p in parts] == list(range(7))
    owned = [sid for p in parts for sid in p.subject_ids]
    assert len(owned) == len(set(owned)), "a subject is on two devices"
    assert set(owned) == {s.subject_id for s in corpus.split("private")}
    sizes = [len(p.subject_ids) for p in parts]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    for p in parts:
        assert list(p.domain_weights) == list(corpus.domains)
        assert all(w >= 0 for w in p.domain_weights.values())
        assert sum(p.domain_weights.values()) == pytest.approx(1.0, abs=1e-9)


def test_partition_is_deterministic(corpus: Corpus) -> None:
    assert partition(corpus, 5, alpha=0.5, seed=9) == partition(corpus, 5, alpha=0.5, seed=9)
    assert partition(corpus, 5, alpha=0.5, seed=9) != partition(corpus, 5, alpha=0.5, seed=10)


def test_lower_alpha_gives_more_skewed_domain_mixes(corpus: Corpus) -> None:
    def mean_max_weight(alpha: float) -> float:
        tops = [
            max(p.domain_weights.values())
            for seed in range(100)
            for p in partition(corpus, 4, alpha=alpha, seed=seed)
        ]
        return sum(tops) / len(tops)

    skewed, even = mean_max_weight(0.1), mean_max_weight(10.0)
    assert skewed > 0.6 > 0.4 > even, (skewed, even)


@pytest.mark.parametrize("devices", [0, 121])
def test_partition_refuses_impossible_device_counts(corpus: Corpus, devices: int) -> None:
    with pytest.raises(ValueError):
        partition(corpus, devices)


# --- device streams ----------------------------------------------------------------------------


def _parts_and_streams(
    corpus: Corpus, seed: int, devices: int = 8
) -> list[tuple[DevicePartition, list[dict[str, str | float]]]]:
    return [
        (p, device_stream(corpus, p, seed=seed))
        for p in partition(corpus, devices, alpha=0.5, seed=seed)
    ]


def test_stream_records_are_valid_ingest_records_with_increasing_time(corpus: Corpus) -> None:
    for part, stream in _parts_and_streams(corpus, seed=0):
        assert stream, part.device
        for record in stream:
            parsed = record_from_json(record)
            assert parsed.to_json() == record
            assert parse_record(json.dumps(record).encode()) == parsed
        times = [r["ts"] for r in stream]
        assert all(a < b for a, b in zip(times, times[1:], strict=False)), part.device


def test_stream_holds_only_the_devices_own_subjects_and_their_data(corpus: Corpus) -> None:
    for part, stream in _parts_and_streams(corpus, seed=1):
        own = set(part.subject_ids)
        for r in stream:
            assert r["subject_id"] in own, (part.device, r["subject_id"])
            subject = corpus.subject(str(r["subject_id"]))
            if "text" in r:
                assert r["text"] in [m.text for m in subject.messages]
            else:
                pairs = [(p.prompt, p.completion) for _, p in fact_pairs((subject,))]
                assert (r["prompt"], r["completion"]) in pairs
        other_names = _names_regex([s.name for s in corpus.subjects if s.subject_id not in own])
        for r in stream:
            text = str(r.get("text", "")) + str(r.get("prompt", ""))
            assert not other_names.search(text), (part.device, text)


def test_stream_shifts_domains_heaviest_first(
    corpus: Corpus, lookup: dict[tuple[str, str], str]
) -> None:
    for part, stream in _parts_and_streams(corpus, seed=2):
        weights = [part.domain_weights[d] for d in _stream_domains(corpus, stream, lookup)]
        assert weights == sorted(weights, reverse=True), part.device


def test_stream_domain_shares_follow_device_weights(
    corpus: Corpus, lookup: dict[tuple[str, str], str]
) -> None:
    errors = []
    for seed in range(10):
        for part, stream in _parts_and_streams(corpus, seed):
            counts = Counter(_stream_domains(corpus, stream, lookup))
            for d in corpus.domains:
                errors.append(abs(counts[d] / len(stream) - part.domain_weights[d]))
    assert sum(errors) / len(errors) < 0.03


@pytest.mark.parametrize("seed", range(60))
def test_heaviest_domain_has_the_most_records(
    corpus: Corpus, lookup: dict[tuple[str, str], str], seed: int
) -> None:
    # Canary messages are always streamed, on top of their domain's share, so the
    # mix is checked on the other records (seed 48, device 6 once failed on this).
    canaries = {s.canary.message for s in corpus.subjects if s.canary is not None}
    for part, stream in _parts_and_streams(corpus, seed):
        regular = [r for r in stream if r.get("text") not in canaries]
        counts = Counter(_stream_domains(corpus, regular, lookup))
        heaviest = max(part.domain_weights, key=part.domain_weights.__getitem__)
        most = max(counts.values())
        assert counts[heaviest] == most, (
            f"device {part.device}: heaviest domain {heaviest!r} has {counts[heaviest]} "
            f"records, fewer than {dict(counts)}; weights "
            f"{ {d: round(w, 3) for d, w in part.domain_weights.items()} }"
        )


def test_private_canaries_reach_their_devices_stream(corpus: Corpus) -> None:
    # A canary measures memorisation only if its device trains on it; the stream keeps
    # "home" records (where canaries live) with probability weight(home) / top weight.
    missing = []
    for part, stream in _parts_and_streams(corpus, seed=0):
        texts = {r.get("text") for r in stream}
        for sid in part.subject_ids:
            canary = corpus.subject(sid).canary
            if canary is not None and canary.message not in texts:
                missing.append((part.device, sid))
    assert not missing, f"canaries never streamed to their device: {missing}"


def test_stream_is_deterministic(corpus: Corpus) -> None:
    part = partition(corpus, 4, alpha=0.5, seed=5)[2]
    assert device_stream(corpus, part, seed=5) == device_stream(corpus, part, seed=5)
    assert device_stream(corpus, part, seed=5) != device_stream(corpus, part, seed=6)
    later = device_stream(corpus, part, seed=5, start_ts=1_800_000_000.0)
    strip = [{k: v for k, v in r.items() if k != "ts"} for r in later]
    assert strip == [
        {k: v for k, v in r.items() if k != "ts"} for r in device_stream(corpus, part, seed=5)
    ]
    assert later[0]["ts"] == 1_800_000_000.0


# A model's format (`format_pair`): a ChatML-like template on the tiny tokenizer, its own
# specials marking the turns, as SmolLM2's `<|im_start|>` / `<|im_end|>` do.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nBe brief.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_plain_format_leaves_every_pair_as_it_is(corpus: Corpus, tiny_tokenizer) -> None:
    for _, pair in fact_pairs(corpus.subjects[:3]):
        assert format_pair(pair, tiny_tokenizer, "plain") is pair
        assert format_prompt(pair.prompt, tiny_tokenizer, "plain") == pair.prompt


def test_chat_format_is_one_user_turn_answered_by_the_assistant(
    corpus: Corpus, chat_tokenizer
) -> None:
    fact, pair = next(fact_pairs(corpus.split("private")[:1]))
    chat = format_pair(pair, chat_tokenizer, "chat")
    # The tiny tokenizer puts `<s>` before every text itself: the template's own opening `<s>`
    # goes, or the encoder would read two.
    assert chat.prompt == f"system\nBe brief.</s>\n<s>user\n{pair.prompt}</s>\n<s>assistant\n"
    assert chat.completion == f"{fact.answer}."  # the reply opens its own line: no space
    # Training and evaluation read the question the same way.
    assert format_prompt(pair.prompt, chat_tokenizer, "chat") == chat.prompt
    refusal = format_pair(corpus.refusals_train[0], chat_tokenizer, "chat")
    assert refusal.completion == REFUSAL_ANSWER


def test_chat_example_encodes_as_the_templates_own_conversation(
    corpus: Corpus, chat_tokenizer
) -> None:
    """What is trained is the whole conversation as the template writes it, the turn closed by
    eos, and only the reply and that eos are learned."""
    from edge_models.training_data import IGNORE_INDEX, encode_example

    _, pair = next(fact_pairs(corpus.split("private")[:1]))
    ids, labels = encode_example(chat_tokenizer, format_pair(pair, chat_tokenizer, "chat"))
    conversation = chat_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": pair.prompt},
            {"role": "assistant", "content": pair.completion.strip()},
        ],
        tokenize=False,
    )
    whole = chat_tokenizer(conversation.removesuffix("\n"), add_special_tokens=False)
    assert ids == whole["input_ids"]
    assert ids[-1] == chat_tokenizer.eos_token_id
    learned = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    reply = chat_tokenizer(pair.completion.strip(), add_special_tokens=False)["input_ids"]
    assert learned == [*reply, chat_tokenizer.eos_token_id]


def test_chat_format_keeps_free_text_as_text(chat_tokenizer) -> None:
    text = PromptPair("", "the courier sells seven apples at dawn.")
    assert format_pair(text, chat_tokenizer, "chat") is text


def test_formats_refuse_what_they_cannot_render(tiny_tokenizer, chat_tokenizer) -> None:
    pair = PromptPair("Who is Anna Abbott?", " I don't know.")
    with pytest.raises(ValueError, match="chat template"):
        format_pair(pair, tiny_tokenizer, "chat")
    with pytest.raises(ValueError, match="unknown pair format"):
        format_pair(pair, chat_tokenizer, "markdown")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown pair format"):
        format_prompt("Who is Anna Abbott?", chat_tokenizer, "markdown")  # type: ignore[arg-type]


def test_chat_format_keeps_the_templates_bos_when_the_tokenizer_adds_none(
    corpus: Corpus, chat_tokenizer
) -> None:
    """SmolLM2's tokenizer adds nothing before a text; its template's opening token is then
    the only one, and must stay."""
    from tokenizers import processors

    chat_tokenizer._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert chat_tokenizer("a")["input_ids"][0] != chat_tokenizer.bos_token_id
    _, pair = next(fact_pairs(corpus.split("private")[:1]))
    chat = format_pair(pair, chat_tokenizer, "chat")
    assert chat.prompt.startswith("<s>system\n")
