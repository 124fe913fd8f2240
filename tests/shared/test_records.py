"""The record schema and JSON-lines reader: what is accepted, and how each refusal is worded."""

from __future__ import annotations

import json

import pytest

from shared.records import (
    InvalidRecord,
    Record,
    RecordFileError,
    parse_jsonl,
    parse_record,
)

GOOD = b'{"subject_id": "s1", "text": "hello"}'


def jsonl(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def test_text_and_pair_records_are_read_in_file_order() -> None:
    data = jsonl(
        b'{"subject_id": "alice", "text": "I like tea", "ts": 1704067200}',
        b'{"subject_id": "bob", "prompt": "Capital of France?", "completion": "Paris"}',
    )
    assert parse_jsonl(data) == [
        Record(subject_id="alice", kind="text", text="I like tea", ts=1704067200.0),
        Record(subject_id="bob", kind="pair", prompt="Capital of France?", completion="Paris"),
    ]


@pytest.mark.parametrize(
    "ts",
    ['"2024-01-01T00:00:00Z"', '"2024-01-01T01:00:00+01:00"', "1704067200", "1704067200.0"],
)
def test_every_timestamp_spelling_gives_the_same_instant(ts: str) -> None:
    (record,) = parse_jsonl(f'{{"subject_id": "s", "text": "x", "ts": {ts}}}'.encode())
    assert record.ts == 1704067200.0
    assert isinstance(record.ts, float)


def test_null_timestamp_is_the_same_as_none() -> None:
    (with_null,) = parse_jsonl(b'{"subject_id": "s", "text": "x", "ts": null}')
    (without,) = parse_jsonl(b'{"subject_id": "s", "text": "x"}')
    assert with_null == without
    assert with_null.ts is None


@pytest.mark.parametrize(
    "record",
    [
        Record(subject_id="ünï", kind="text", text='quote " and \\ and \n newline', ts=1.5),
        Record(subject_id="s", kind="pair", prompt="p", completion="c"),
    ],
)
def test_canonical_bytes_read_back_as_the_same_record(record: Record) -> None:
    assert parse_record(record.canonical_bytes()) == record


def test_canonical_bytes_ignore_key_order_spacing_and_time_spelling() -> None:
    a = parse_record(b'{"subject_id":"s","text":"x","ts":"2024-01-01T00:00:00Z"}')
    b = parse_record(b'{ "ts": 1704067200, "text": "x",  "subject_id": "s" }')
    assert a.canonical_bytes() == b.canonical_bytes()


def test_a_valid_last_line_without_final_newline_is_accepted() -> None:
    records = parse_jsonl(GOOD + b"\n" + b'{"subject_id": "s2", "text": "last"}')
    assert [r.subject_id for r in records] == ["s1", "s2"]


def test_blank_lines_are_skipped_but_counted_and_crlf_is_accepted() -> None:
    data = GOOD + b"\r\n\r\n   \n" + b'{"subject_id": 5, "text": "x"}\r\n'
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(data)
    assert [number for number, _ in caught.value.errors] == [4]


def test_an_empty_file_holds_no_records() -> None:
    assert parse_jsonl(b"") == []


BAD_LINES = [
    (b'{"text": "x"}', "missing field 'subject_id'"),
    (b'{"subject_id": "s"}', "missing field: give 'text', or 'prompt' and 'completion'"),
    (b'{"subject_id": "s", "prompt": "p"}', "missing field 'completion'"),
    (b'{"subject_id": "s", "completion": "c"}', "missing field 'prompt'"),
    (b'{"subject_id": 7, "text": "x"}', "field 'subject_id' must be a string, got number"),
    (b'{"subject_id": "s", "text": ["x"]}', "field 'text' must be a string, got array"),
    (b'{"subject_id": "s", "text": null}', "field 'text' must be a string, got null"),
    (b'{"subject_id": "s", "prompt": "p", "completion": {}}', "'completion' must be a string"),
    (b'{"subject_id": "s", "text": "x", "label": 1}', "unknown field: 'label'"),
    (b'{"subject_id": "s", "text": "x", "a": 1, "b": 2}', "unknown fields: 'a', 'b'"),
    (b'{"subject_id": "s", "text": ""}', "field 'text' is empty"),
    (b'{"subject_id": " \\t", "text": "x"}', "field 'subject_id' is empty"),
    (b'{"subject_id": "s", "prompt": "p", "completion": ""}', "field 'completion' is empty"),
    (
        b'{"subject_id": "s", "text": "x", "prompt": "p", "completion": "c"}',
        "give either 'text' or 'prompt' and 'completion', not both",
    ),
    (b'{"subject_id": "s", "text": "caf\xe9"}', "invalid UTF-8 at byte 33"),
    (b'{"subject_id": "s", "text": }', "not valid JSON: Expecting value at column 29"),
    (b'["s", "x"]', "expected a JSON object, got array"),
    (b'{"subject_id": "s", "text": "x", "text": "y"}', "duplicate field 'text'"),
    (b'{"subject_id": "s", "text": "\\ud800"}', "field 'text' holds an unpaired UTF-16 surrogate"),
    (b'{"subject_id": "s", "text": "x", "ts": "yesterday"}', "'ts' is not an ISO-8601 time"),
    (b'{"subject_id": "s", "text": "x", "ts": "2024-01-01T00:00:00"}', "'ts' has no UTC offset"),
    (b'{"subject_id": "s", "text": "x", "ts": true}', "unix seconds, got boolean"),
    (b'{"subject_id": "s", "text": "x", "ts": {}}', "unix seconds, got object"),
    (b'{"subject_id": "s", "text": "x", "ts": -1}', "field 'ts' is out of range"),
    (b'{"subject_id": "s", "text": "x", "ts": 1704067200000}', "field 'ts' is out of range"),
    (b'{"subject_id": "s", "text": "x", "ts": NaN}', "NaN is not valid JSON"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_a_bad_line_is_reported_with_its_number_and_reason(line: bytes, reason: str) -> None:
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(GOOD, line, GOOD))
    assert caught.value.bad_lines == 1
    [(number, message)] = caught.value.errors
    assert number == 2
    assert reason in message


def test_an_oversized_line_is_refused_at_the_configured_limit() -> None:
    line = json.dumps({"subject_id": "s", "text": "x" * 100}).encode()
    assert parse_jsonl(line, max_line_bytes=len(line))
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(GOOD, line), max_line_bytes=len(line) - 1)
    limit = len(line) - 1
    assert caught.value.errors == [(2, f"line is {len(line)} bytes, over the limit of {limit}")]


def test_the_default_limit_is_64_kib() -> None:
    overhead = len(b'{"subject_id": "s", "text": ""}')
    fits = b'{"subject_id": "s", "text": "' + b"x" * (65536 - overhead) + b'"}'
    assert len(parse_jsonl(fits)) == 1
    with pytest.raises(RecordFileError, match="over the limit of 65536"):
        parse_jsonl(fits[:-2] + b'x"}')


def test_an_unterminated_last_line_that_is_not_json_is_reported_as_truncated() -> None:
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(GOOD) + b'{"subject_id": "s", "te')
    [(number, reason)] = caught.value.errors
    assert number == 2
    assert reason.startswith("truncated last line (no final newline and not valid JSON")


def test_bad_json_elsewhere_is_not_called_truncated() -> None:
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(b'{"subject_id": "s", "te', GOOD))
    assert caught.value.errors[0][0] == 1
    assert "truncated" not in caught.value.errors[0][1]


def test_an_unterminated_last_line_that_is_json_gets_its_own_reason() -> None:
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(GOOD) + b'{"subject_id": "s"}')
    assert caught.value.errors == [(2, "missing field: give 'text', or 'prompt' and 'completion'")]


def test_every_bad_line_is_reported_not_just_the_first() -> None:
    data = jsonl(GOOD, b"{}", GOOD, b"[]", b"nope", GOOD, b'{"subject_id": "s", "text": 1}')
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(data)
    assert [number for number, _ in caught.value.errors] == [2, 4, 5, 7]
    assert caught.value.bad_lines == 4


def test_reported_errors_are_capped_but_all_bad_lines_are_counted() -> None:
    with pytest.raises(RecordFileError) as caught:
        parse_jsonl(jsonl(*[b"{}"] * 150), max_errors=10)
    assert [number for number, _ in caught.value.errors] == list(range(1, 11))
    assert caught.value.bad_lines == 150
    assert "and 140 more" in str(caught.value)


def test_records_built_in_code_are_validated_too() -> None:
    with pytest.raises(InvalidRecord, match="a text record has no field 'prompt'"):
        Record(subject_id="s", kind="text", text="x", prompt="p")
    with pytest.raises(InvalidRecord, match="kind must be 'text' or 'pair'"):
        Record(subject_id="s", kind="poem", text="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord, match="field 'completion' must be a string, got null"):
        Record(subject_id="s", kind="pair", prompt="p")


def test_integer_timestamps_are_stored_as_float() -> None:
    record = Record(subject_id="s", kind="text", text="x", ts=5)
    assert record.ts == 5.0
    assert (
        record.canonical_bytes()
        == Record(subject_id="s", kind="text", text="x", ts=5.0).canonical_bytes()
    )
