"""The record schema and its JSON-lines reader.

Devices ingest these records and the coordinator refers to them, so this module
does no I/O: it turns bytes into validated `Record`s, or says which lines are
bad and why. The reader checks a whole file before it returns anything, so a
caller can refuse the whole file rather than ingest part of it.

A record's canonical form (`Record.canonical_bytes`) is what the record store
encrypts and hashes to spot duplicates. Different spellings of the same record
(key order, ISO-8601 time or unix seconds) have the same canonical form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, get_args

RecordKind = Literal["text", "pair"]
KINDS = frozenset(get_args(RecordKind))

DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_ERRORS = 100

FIELDS = ("subject_id", "text", "prompt", "completion", "ts")
_KIND_FIELDS: dict[str, tuple[str, ...]] = {"text": ("text",), "pair": ("prompt", "completion")}
# Timestamps are unix seconds in [1970-01-01, 10000-01-01): anything outside is a
# producer's unit or clock error (milliseconds, a zero year), not a real record time.
_TS_MIN = 0
_TS_MAX = 253_402_300_800
_PREVIEW_CHARS = 40


class InvalidRecord(ValueError):
    """One record is unacceptable; the message is the reason the user sees."""


class _MalformedJson(InvalidRecord):
    """The bytes are not JSON, which on an unterminated last line means truncation."""


class RecordFileError(ValueError):
    """A JSON-lines file has bad lines; nothing from it should be stored.

    `errors` lists `(line_number, reason)` for the first bad lines, up to the
    reader's cap; `bad_lines` counts all of them, so a caller can say how many
    were left out.
    """

    def __init__(self, errors: list[tuple[int, str]], bad_lines: int) -> None:
        super().__init__(errors, bad_lines)
        self.errors = errors
        self.bad_lines = bad_lines

    def __str__(self) -> str:
        plural = "" if self.bad_lines == 1 else "s"
        lines = [f"{self.bad_lines} bad line{plural}:"]
        lines += [f"  line {number}: {reason}" for number, reason in self.errors]
        if self.bad_lines > len(self.errors):
            lines.append(f"  ... and {self.bad_lines - len(self.errors)} more")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Record:
    """One piece of a subject's data: free text, or a prompt with its completion.

    Construction validates, so every `Record` in the system is well formed, no
    matter whether it came from a file, the database or code.
    """

    subject_id: str
    kind: RecordKind
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_string("subject_id", self.subject_id)
        wanted = _KIND_FIELDS.get(self.kind)
        if wanted is None:
            raise InvalidRecord(f"kind must be 'text' or 'pair', got {_preview(self.kind)}")
        for name in ("text", "prompt", "completion"):
            value = getattr(self, name)
            if name in wanted:
                _check_string(name, value)
            elif value is not None:
                raise InvalidRecord(f"a {self.kind} record has no field {name!r}")
        if self.ts is not None:
            # Normalise ints to float so equal times give equal canonical bytes.
            object.__setattr__(self, "ts", _check_ts(self.ts))

    def to_json(self) -> dict[str, str | float]:
        """The record as a JSON object in input format, without absent fields."""
        fields = {name: getattr(self, name) for name in FIELDS}
        return {name: value for name, value in fields.items() if value is not None}

    def canonical_bytes(self) -> bytes:
        """One byte string per distinct record: sorted keys, no spaces, UTF-8."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")


def parse_record(line: bytes) -> Record:
    """Read one JSON-lines record (also a record's canonical bytes), or raise InvalidRecord."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord(f"invalid UTF-8 at byte {exc.start + 1}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_no_nan)
    except InvalidRecord:
        raise
    except json.JSONDecodeError as exc:
        raise _MalformedJson(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise InvalidRecord("JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise InvalidRecord(f"unreadable JSON value: {exc}") from None
    return record_from_json(obj)


def record_from_json(obj: object) -> Record:
    """Validate a decoded JSON value as a record, or raise InvalidRecord."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object, got {_json_type(obj)}")
    unknown = [name for name in obj if name not in FIELDS]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise InvalidRecord(f"unknown field{plural}: {', '.join(map(_preview, unknown))}")
    if "subject_id" not in obj:
        raise InvalidRecord("missing field 'subject_id'")
    ts = parse_ts(obj.get("ts"))
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise InvalidRecord("give either 'text' or 'prompt' and 'completion', not both")
        return Record(subject_id=obj["subject_id"], kind="text", text=obj["text"], ts=ts)
    if "prompt" not in obj and "completion" not in obj:
        raise InvalidRecord("missing field: give 'text', or 'prompt' and 'completion'")
    for name in ("prompt", "completion"):
        if name not in obj:
            raise InvalidRecord(f"missing field {name!r}")
    return Record(
        subject_id=obj["subject_id"],
        kind="pair",
        prompt=obj["prompt"],
        completion=obj["completion"],
        ts=ts,
    )


def parse_ts(value: object) -> float | None:
    """Read a timestamp given as unix seconds or as ISO-8601 with a UTC offset.

    A time without an offset is refused rather than guessed: devices in
    different time zones would store the same input as different instants.
    JSON null means no timestamp, like leaving the field out.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRecord(f"field 'ts' is not an ISO-8601 time: {_preview(value)}") from None
        if moment.utcoffset() is None:
            raise InvalidRecord("field 'ts' has no UTC offset; add 'Z' or '+HH:MM'")
        return moment.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecord(
            f"field 'ts' must be an ISO-8601 string or unix seconds, got {_json_type(value)}"
        )
    return value


def parse_jsonl(
    data: bytes,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_errors: int = DEFAULT_MAX_ERRORS,
) -> list[Record]:
    """Read a whole JSON-lines file, or raise RecordFileError listing its bad lines.

    Blank lines are skipped but still counted, so line numbers match an editor's.
    A last line without a final newline is accepted when it is a valid record,
    and reported as truncated when it is not JSON.
    """
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    records: list[Record] = []
    errors: list[tuple[int, str]] = []
    bad_lines = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            if len(line) > max_line_bytes:
                raise InvalidRecord(
                    f"line is {len(line)} bytes, over the limit of {max_line_bytes}"
                )
            records.append(parse_record(line))
        except InvalidRecord as exc:
            bad_lines += 1
            if len(errors) < max_errors:
                truncated = number == len(lines) and not terminated
                errors.append((number, _reason(exc, truncated)))
    if bad_lines:
        raise RecordFileError(errors, bad_lines)
    return records


def _reason(exc: InvalidRecord, unterminated_last_line: bool) -> str:
    if unterminated_last_line and isinstance(exc, _MalformedJson):
        return f"truncated last line (no final newline and {exc})"
    return str(exc)


def _check_string(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidRecord(f"field {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise InvalidRecord(f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"field {name!r} holds an unpaired UTF-16 surrogate") from None


def _check_ts(ts: object) -> float:
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise InvalidRecord(f"field 'ts' must be a number of unix seconds, got {_json_type(ts)}")
    if not _TS_MIN <= ts < _TS_MAX:
        raise InvalidRecord(
            f"field 'ts' is out of range: must fall in years 1970 to 9999 "
            f"(unix seconds {_TS_MIN} to {_TS_MAX - 1})"
        )
    return float(ts)


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Refuse repeated keys, which json.loads would otherwise resolve silently (last wins)."""
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidRecord(f"duplicate field {_preview(key)}")
        obj[key] = value
    return obj


def _no_nan(constant: str) -> NoReturn:
    raise InvalidRecord(f"{constant} is not valid JSON")


def _json_type(value: object) -> str:
    """Name a value's type in JSON terms, since that is what the user wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _preview(value: object) -> str:
    """A short repr, so a 60 KiB field does not end up in an error message."""
    text = repr(value)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


# -- selecting records (deletion requests name records this way) --------------


class InvalidDeletion(ValueError):
    """A submitted field is unusable; the message says which and why."""


@dataclass(frozen=True)
class RecordSelector:
    """A subset of a subject's records: some kinds, and/or a time range [from_ts, to_ts)."""

    kinds: tuple[str, ...] = ()
    from_ts: float | None = None
    to_ts: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - KINDS)
        if unknown:
            raise InvalidDeletion(f"unknown record kind(s) {unknown}; known: {sorted(KINDS)}")
        if len(set(self.kinds)) != len(self.kinds):
            raise InvalidDeletion(f"record kinds repeated in {list(self.kinds)}")
        for name in ("from_ts", "to_ts"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InvalidDeletion(f"selector {name} must be a finite number of unix seconds")
        if self.from_ts is not None and self.to_ts is not None and self.from_ts >= self.to_ts:
            raise InvalidDeletion(f"selector range is empty: from_ts {self.from_ts} >= to_ts")

    def matches(self, record: Record) -> bool:
        """Whether `record` is one of those this selector names (a record without a time
        is selected only when no time range is given)."""
        if self.kinds and record.kind not in self.kinds:
            return False
        if self.from_ts is None and self.to_ts is None:
            return True
        if record.ts is None:
            return False
        return (self.from_ts is None or record.ts >= self.from_ts) and (
            self.to_ts is None or record.ts < self.to_ts
        )

    def to_json(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "from_ts": self.from_ts, "to_ts": self.to_ts}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RecordSelector:
        return cls(tuple(value["kinds"]), value["from_ts"], value["to_ts"])


def selectors_to_json(selectors: Sequence[RecordSelector]) -> str:
    return json.dumps([s.to_json() for s in selectors])


def selectors_from_json(text: str) -> tuple[RecordSelector, ...]:
    """Selectors from their JSON list ("" is none); InvalidDeletion or ValueError if malformed."""
    if not text:
        return ()
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidDeletion("selectors must be a JSON list of objects")
    try:
        return tuple(RecordSelector.from_json(v) for v in value)
    except (KeyError, TypeError) as error:
        raise InvalidDeletion(f"malformed selector: {error}") from error
