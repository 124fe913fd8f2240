"""The coordinator's tables (SQLModel): runs, nodes, groups, model versions, updates, metrics.

They live in their own registry, so creating them never touches other
tables on the same database. Node ids are Flower's unsigned 64-bit ids, kept
in signed BIGINT columns (`coordinator.state` converts at the edge). Tensors
are not stored in the database: a model version or an update row names a
file beside it and that file's sha256.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel


class StateTable(SQLModel, registry=registry()):
    """Base of the coordinator's tables; `StateTable.metadata` holds exactly them."""


class RunRow(StateTable, table=True):
    """One Lethe run (it outlives Flower runs: a restarted coordinator resumes it)."""

    __tablename__ = "coordinator_runs"

    name: str = Field(primary_key=True)
    policy: str
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: float
    # The policy's state and the work in flight after the last event, written
    # in the same transaction as everything that event changed.
    version: int = 0
    policy_state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    in_flight: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    next_update_id: int = 1
    events: int = 0


class NodeRow(StateTable, table=True):
    __tablename__ = "coordinator_nodes"
    __table_args__ = (UniqueConstraint("run", "node"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    node: int = Field(sa_column=Column(BigInteger, nullable=False))
    seconds_per_step: float | None = None
    group: int | None = None
    training_version: int | None = None  # the version it is training from, if any
    steps: int | None = None
    last_seen: float
    active: bool = True
    updates: int = 0
    rejected: int = 0
    quarantined: bool | None = None  # True once it sent too many bad updates (added in 0.7)


class GroupRow(StateTable, table=True):
    """An arrival group (FedCompass), open or closed: the console's timeline of who trained in
    which group, when they were expected, and who was late (still training at the close)."""

    __tablename__ = "coordinator_groups"
    __table_args__ = (UniqueConstraint("run", "group"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    group: int
    expected: float
    latest: float
    training: list[int] = Field(sa_column=Column(JSON, nullable=False))
    arrived: list[int] = Field(sa_column=Column(JSON, nullable=False))
    # Added after the first release: nullable, so that an older database takes them in place.
    opened_at: float | None = None
    closed_at: float | None = None
    late: list[int] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class ModelVersionRow(StateTable, table=True):
    __tablename__ = "coordinator_versions"
    __table_args__ = (UniqueConstraint("run", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    version: int
    path: str
    sha256: str
    created_at: float
    group: int | None = None
    update_ids: list[int] = Field(sa_column=Column(JSON, nullable=False))
    nodes: list[int] = Field(sa_column=Column(JSON, nullable=False))
    weights: list[float] = Field(sa_column=Column(JSON, nullable=False))
    staleness: list[int] = Field(sa_column=Column(JSON, nullable=False))


class UpdateRow(StateTable, table=True):
    """An accepted update: pending until a version applies it (then `applied_in`)."""

    __tablename__ = "coordinator_updates"
    __table_args__ = (UniqueConstraint("run", "update_id"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    update_id: int
    node: int = Field(sa_column=Column(BigInteger, nullable=False))
    base_version: int
    steps: int
    path: str
    sha256: str
    received_at: float
    applied_in: int | None = None


class RejectionRow(StateTable, table=True):
    __tablename__ = "coordinator_rejections"

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    node: int = Field(sa_column=Column(BigInteger, nullable=False))
    version: int
    reason: str
    at: float


class MetricRow(StateTable, table=True):
    __tablename__ = "coordinator_metrics"
    __table_args__ = (UniqueConstraint("run", "version", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    version: int
    name: str
    value: float


class HoldingRow(StateTable, table=True):
    """A node's last announcement of the subjects it holds (salted hashes, never ids)."""

    __tablename__ = "coordinator_holdings"
    __table_args__ = (UniqueConstraint("run", "node"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    node: int = Field(sa_column=Column(BigInteger, nullable=False))
    salt: str
    subject_hashes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    at: float


class EditRow(StateTable, table=True):
    """One edit in the ledger: an unlearning edit of the shared model, served on top of every
    version after it. `revision` counts the closed-form re-solves after aggregations moved the
    weights under it; the file holds the current revision."""

    __tablename__ = "coordinator_edits"
    __table_args__ = (UniqueConstraint("run", "edit_id"),)

    id: int | None = Field(default=None, primary_key=True)
    run: str = Field(foreign_key="coordinator_runs.name", index=True)
    edit_id: str
    request_id: str = Field(index=True)
    node: int = Field(sa_column=Column(BigInteger, nullable=False))
    layer: str
    path: str
    sha256: str
    added_at: float
    added_in_version: int  # the shared model version current when it joined the ledger
    revision: int = 0
    revised_at: float | None = None


_TWO_63 = 2**63


def to_db(node: int) -> int:
    """Flower's unsigned 64-bit node id as the signed value a BIGINT column holds."""
    return node - 2 * _TWO_63 if node >= _TWO_63 else node


def from_db(value: int) -> int:
    return value + 2 * _TWO_63 if value < 0 else value
