"""What the coordinator and a device say to each other in Flower messages, as plain data.

A train message carries the global shared adapter's B factors (an
`ArrayRecord`), the coordinator's edit ledger when it has one (another
`ArrayRecord`) and a `ConfigRecord`: the steps to train, the version, the
seed, and for simulated fleets the workload's settings. The reply carries the
B delta, a `MetricRecord` (samples, measured seconds per step, loss and the
version it answers) and, from real devices, which subjects the device holds
as salted hashes. An unlearn query (Flower's "query" message type) names a
deletion request and a subject hash; its reply carries the edit of the
shared model and the device's measurements. Every direction is parsed into
dataclasses here and nowhere else; a message that does not parse raises
`MessageError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.holdings import Holdings, is_subject_hash
from shared.records import InvalidDeletion, RecordSelector, selectors_from_json, selectors_to_json
from shared.tensors import TensorPayloadError, check_arrays

MODEL = "model"
LEDGER = "ledger"
WORK = "work"
UPDATE = "update"
METRICS = "metrics"
HOLDINGS = "holdings"
UNLEARN = "unlearn"
EDIT = "edit"


class MessageError(ValueError):
    """A message without the records or fields this protocol needs."""


@dataclass(frozen=True)
class TrainRequest:
    model: dict[str, np.ndarray]
    steps: int
    version: int
    seed: int
    # A simulated fleet's workload (`coordinator.simulation`); empty for real devices.
    client_index: int = -1
    task_seed: int = 0
    clients: int = 0
    dirichlet_alpha: float = 0.0
    ledger: dict[str, np.ndarray] = field(default_factory=dict)

    def to_content(self) -> RecordDict:
        ledger = {LEDGER: _array_record(self.ledger)} if self.ledger else {}
        return RecordDict(
            {
                **ledger,
                MODEL: _array_record(self.model),
                WORK: ConfigRecord(
                    {
                        "steps": self.steps,
                        "version": self.version,
                        "seed": self.seed,
                        "client-index": self.client_index,
                        "task-seed": self.task_seed,
                        "clients": self.clients,
                        "dirichlet-alpha": self.dirichlet_alpha,
                    }
                ),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        work = _record(content, WORK, ConfigRecord)
        return cls(
            model=_arrays(content, MODEL),
            steps=int(_field(work, "steps")),
            version=int(_field(work, "version")),
            seed=int(_field(work, "seed")),
            client_index=int(work.get("client-index", -1)),
            task_seed=int(work.get("task-seed", 0)),
            clients=int(work.get("clients", 0)),
            dirichlet_alpha=float(work.get("dirichlet-alpha", 0.0)),
            ledger=_arrays(content, LEDGER) if LEDGER in content else {},
        )


@dataclass(frozen=True)
class TrainReply:
    delta: dict[str, np.ndarray]
    version: int
    samples: int
    seconds_per_step: float
    loss: float
    holdings: Holdings | None = None

    def to_content(self) -> RecordDict:
        holdings = {} if self.holdings is None else {HOLDINGS: _holdings_record(self.holdings)}
        return RecordDict(
            {
                **holdings,
                UPDATE: _array_record(self.delta),
                METRICS: MetricRecord(
                    {
                        "version": self.version,
                        "samples": self.samples,
                        "seconds-per-step": self.seconds_per_step,
                        "loss": self.loss,
                    }
                ),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        metrics = _record(content, METRICS, MetricRecord)
        return cls(
            delta=_arrays(content, UPDATE),
            version=int(_field(metrics, "version")),
            samples=int(_field(metrics, "samples")),
            seconds_per_step=float(_field(metrics, "seconds-per-step")),
            loss=float(metrics.get("loss", float("nan"))),
            holdings=_holdings(content),
        )


ANNOUNCE = "announce"


def announce_query() -> RecordDict:
    """The query that asks a device which subjects it holds (a device that has not answered
    a train message yet has not said)."""
    return RecordDict({ANNOUNCE: ConfigRecord({})})


def is_announce_query(content: RecordDict) -> bool:
    return ANNOUNCE in content


def announce_reply(holdings: Holdings) -> RecordDict:
    return RecordDict({HOLDINGS: _holdings_record(holdings)})


def holdings_of(content: RecordDict) -> Holdings:
    """The holdings a reply carries; MessageError when it carries none."""
    holdings = _holdings(content)
    if holdings is None:
        raise MessageError("the reply carries no holdings")
    return holdings


@dataclass(frozen=True)
class UnlearnQuery:
    """Forget one subject (or the records `selectors` pick): which request, and the subject
    as the device announced it."""

    request_id: str
    subject_hash: str
    selectors: tuple[RecordSelector, ...] = ()

    def to_content(self) -> RecordDict:
        record = ConfigRecord(
            {
                "request-id": self.request_id,
                "subject-hash": self.subject_hash,
                "selectors": selectors_to_json(self.selectors),
            }
        )
        return RecordDict({UNLEARN: record})

    @classmethod
    def from_content(cls, content: RecordDict) -> UnlearnQuery:
        record = _record(content, UNLEARN, ConfigRecord)
        try:
            selectors = selectors_from_json(str(record.get("selectors", "")))
        except (InvalidDeletion, ValueError) as error:
            raise MessageError(f"selectors: {error}") from error
        query = cls(
            str(_field(record, "request-id")), str(_field(record, "subject-hash")), selectors
        )
        if not is_subject_hash(query.subject_hash):
            raise MessageError("subject-hash is not 64 hex digits")
        return query


@dataclass(frozen=True)
class UnlearnResult:
    """A device's answer to an unlearn query. `shared_edit` holds one edit's arrays
    (`client.unlearning.edits`); empty when the device did not hold the subject."""

    request_id: str
    held: bool
    shared_edit: dict[str, np.ndarray]
    measurements: dict[str, float]
    versions: dict[str, int]  # personal before/after, shared, records deleted
    holdings: Holdings | None

    def to_content(self) -> RecordDict:
        holdings = {} if self.holdings is None else {HOLDINGS: _holdings_record(self.holdings)}
        edit = {EDIT: _array_record(self.shared_edit)} if self.shared_edit else {}
        return RecordDict(
            {
                **holdings,
                **edit,
                UNLEARN: ConfigRecord(
                    {"request-id": self.request_id, "held": self.held, **self.versions}
                ),
                METRICS: MetricRecord(dict(self.measurements)),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> UnlearnResult:
        record = _record(content, UNLEARN, ConfigRecord)
        metrics = _record(content, METRICS, MetricRecord)
        try:
            versions = {k: int(v) for k, v in record.items() if k not in ("request-id", "held")}
            measurements = {k: float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as error:
            raise MessageError(f"unlearn answer: {error}") from error
        return cls(
            request_id=str(_field(record, "request-id")),
            held=bool(_field(record, "held")),
            shared_edit=_arrays(content, EDIT) if EDIT in content else {},
            measurements=measurements,
            versions=versions,
            holdings=_holdings(content),
        )


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays(content: RecordDict, name: str) -> dict[str, np.ndarray]:
    record = _record(content, name, ArrayRecord)
    try:
        return check_arrays({key: array.numpy() for key, array in record.items()})
    except (TensorPayloadError, ValueError, TypeError) as error:
        raise MessageError(f"record {name!r}: {error}") from error


def _record(
    content: RecordDict, name: str, kind: type
) -> ArrayRecord | ConfigRecord | MetricRecord:
    record = content.get(name)
    if not isinstance(record, kind):
        raise MessageError(f"the message has no {kind.__name__} named {name!r}")
    return record


def _field(record: ConfigRecord | MetricRecord, key: str) -> int | float | str:
    if key not in record:
        raise MessageError(f"the message lacks {key!r}")
    return record[key]


def _holdings_record(holdings: Holdings) -> ConfigRecord:
    return ConfigRecord({"salt": holdings.salt, "subject-hashes": list(holdings.subject_hashes)})


def _holdings(content: RecordDict) -> Holdings | None:
    if HOLDINGS not in content:
        return None
    record = _record(content, HOLDINGS, ConfigRecord)
    hashes = _field(record, "subject-hashes")
    try:
        return Holdings(str(_field(record, "salt")), tuple(hashes))  # type: ignore[arg-type]
    except (ValueError, TypeError) as error:
        raise MessageError(f"holdings: {error}") from error
