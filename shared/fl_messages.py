"""What the coordinator and a device say to each other in Flower messages, as plain data.

A train message carries the global shared adapter's B factors (an
`ArrayRecord`) and a `ConfigRecord`: the steps to train, the version, the
seed, and for simulated fleets the workload's settings. The reply carries the
B delta and a `MetricRecord`: samples, measured seconds per step, loss and
the version it answers. Both directions are parsed into dataclasses here
and nowhere else; a message that does not parse raises `MessageError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from shared.tensors import TensorPayloadError, check_arrays

MODEL = "model"
WORK = "work"
UPDATE = "update"
METRICS = "metrics"


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

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
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
        )


@dataclass(frozen=True)
class TrainReply:
    delta: dict[str, np.ndarray]
    version: int
    samples: int
    seconds_per_step: float
    loss: float

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
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
