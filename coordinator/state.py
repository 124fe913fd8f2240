"""The coordinator's durable state: SQLModel over SQLite (default) or PostgreSQL (any URL).

It is the core's `Journal`. For each event it first writes the tensors the
event produced (an accepted update, new model versions) to files beside the
database (atomic, fsynced, named in the rows with their sha256), then one
database transaction records everything else: the update row, the version
rows with the ids of the updates they applied, the policy's state, the work
in flight, the nodes and the open groups. A crash before the commit leaves
the previous event's state (the files written for nothing are overwritten
later); after it, the new one. On restart `resume` gives the core back its
committed model, pending updates (checksums verified) and policy state.

Beside the run, it keeps what the deletion propagation needs: each node's
last announcement of the subjects it holds (salted hashes) and the edit
ledger, the unlearning edits of the shared model (files like the versions).

The operator console and the deletion API read the same tables.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from client.unlearning.edits import LayerEdit, edits_from_arrays, edits_to_arrays
from coordinator.core import EventRecord, InFlight, SavedState
from coordinator.state_tables import (
    EditRow,
    GroupRow,
    HoldingRow,
    MetricRow,
    ModelVersionRow,
    NodeRow,
    RejectionRow,
    RunRow,
    StateTable,
    UpdateRow,
    from_db,
    to_db,
)
from shared.database import MigrationError, add_missing_columns, database_engine
from shared.durable import atomic_write_bytes
from shared.holdings import Holdings
from shared.tensors import arrays_from_bytes, arrays_to_bytes

log = logging.getLogger(__name__)


class StateError(RuntimeError):
    """The stored state cannot be used as asked (another run's config, a damaged file)."""


class StateStore:
    """One run's state in a database (`url`) with its tensor files under `files`."""

    def __init__(self, url: str, files: Path, run: str) -> None:
        self.url = url
        self.files = files / run
        self.run = run
        self.engine = database_engine(url)
        try:
            StateTable.metadata.create_all(self.engine)
        except OperationalError:
            # Another process created the tables between the check and the create.
            StateTable.metadata.create_all(self.engine)
        try:
            added = add_missing_columns(self.engine, StateTable.metadata)
        except MigrationError as error:
            raise StateError(str(error)) from error
        if added:
            log.info("state store upgraded in place: added %s", ", ".join(added))

    def close(self) -> None:
        self.engine.dispose()

    # -- starting and resuming -------------------------------------------------

    def start(
        self, policy: str, config: dict[str, Any], initial_model: dict[str, np.ndarray]
    ) -> SavedState | None:
        """Create the run with version 0, or return the saved state of an existing one."""
        with Session(self.engine) as session:
            row = session.get(RunRow, self.run)
            if row is not None:
                if row.policy != policy:
                    raise StateError(
                        f"run {self.run!r} uses policy {row.policy!r}, not {policy!r}; "
                        "give the new run another name"
                    )
                return self._saved(session, row)
            path, digest = self._write(f"versions/{0:08d}.safetensors", initial_model)
            session.add(RunRow(name=self.run, policy=policy, config=config, created_at=time.time()))
            session.flush()  # the run row first: versions refer to it
            session.add(
                ModelVersionRow(
                    run=self.run,
                    version=0,
                    path=path,
                    sha256=digest,
                    created_at=time.time(),
                    update_ids=[],
                    nodes=[],
                    weights=[],
                    staleness=[],
                )
            )
            session.commit()
        return None

    def _saved(self, session: Session, row: RunRow) -> SavedState:
        latest = session.exec(
            select(ModelVersionRow)
            .where(ModelVersionRow.run == self.run)
            .order_by(ModelVersionRow.version.desc())  # type: ignore[attr-defined]
        ).first()
        if latest is None or latest.version != row.version:
            raise StateError(f"run {self.run!r}: no model file for committed version {row.version}")
        pending = session.exec(
            select(UpdateRow)
            .where(UpdateRow.run == self.run, UpdateRow.applied_in == None)  # noqa: E711
            .order_by(UpdateRow.update_id)
        ).all()
        return SavedState(
            model=self._read(latest.path, latest.sha256),
            policy_state=row.policy_state,
            in_flight={
                int(node): InFlight(**flight) for node, flight in (row.in_flight or {}).items()
            },
            pending={u.update_id: (from_db(u.node), self._read(u.path, u.sha256)) for u in pending},
            next_update_id=row.next_update_id,
            quarantined=frozenset(
                from_db(n.node)
                for n in session.exec(
                    select(NodeRow).where(NodeRow.run == self.run, NodeRow.quarantined == True)  # noqa: E712
                )
            ),
        )

    # -- the journal --------------------------------------------------------------

    def record(self, event: EventRecord) -> None:
        written = []
        if event.accepted is not None:
            name = f"updates/{event.accepted.update_id:010d}.safetensors"
            written.append((event.accepted, *self._write(name, event.accepted.delta)))
        versions = [
            (committed, *self._write(f"versions/{committed.version:08d}.safetensors", model))
            for committed, model in event.commits
        ]
        with Session(self.engine) as session:
            run = session.get(RunRow, self.run)
            if run is None:
                raise StateError(f"run {self.run!r} was never started")
            for accepted, path, digest in written:
                session.add(
                    UpdateRow(
                        run=self.run,
                        update_id=accepted.update_id,
                        node=to_db(accepted.node),
                        base_version=accepted.base_version,
                        steps=accepted.steps,
                        path=path,
                        sha256=digest,
                        received_at=event.at,
                    )
                )
            session.flush()
            for committed, path, digest in versions:
                session.add(
                    ModelVersionRow(
                        run=self.run,
                        version=committed.version,
                        path=path,
                        sha256=digest,
                        created_at=event.at,
                        group=committed.group,
                        update_ids=list(committed.update_ids),
                        nodes=list(committed.nodes),
                        weights=list(committed.weights),
                        staleness=list(committed.staleness),
                    )
                )
                for update in session.exec(
                    select(UpdateRow).where(
                        UpdateRow.run == self.run,
                        UpdateRow.update_id.in_(committed.update_ids),  # type: ignore[attr-defined]
                    )
                ):
                    if update.applied_in is not None:
                        raise StateError(f"update {update.update_id} would be applied twice")
                    update.applied_in = committed.version
                    session.add(update)
            if event.rejected is not None:
                node, version, reason = event.rejected
                session.add(
                    RejectionRow(
                        run=self.run, node=node, version=version, reason=reason, at=event.at
                    )
                )
            run.version = event.policy_state.get("version", run.version)
            run.policy_state = event.policy_state
            run.in_flight = {str(n): asdict(f) for n, f in event.in_flight.items()}
            run.next_update_id = event.next_update_id
            run.events += 1
            session.add(run)
            self._nodes(session, event)
            if "groups" in event.policy_state:
                self._groups(session, event)
            session.commit()

    def record_metric(self, version: int, name: str, value: float) -> None:
        with Session(self.engine) as session:
            session.add(MetricRow(run=self.run, version=version, name=name, value=float(value)))
            session.commit()

    def _nodes(self, session: Session, event: EventRecord) -> None:
        state = event.policy_state
        active = set(state.get("nodes", []))
        speeds = state.get("speeds", {})
        groups = state.get("group_of", {})
        for node in event.touched:
            row = session.exec(
                select(NodeRow).where(NodeRow.run == self.run, NodeRow.node == to_db(node))
            ).first() or NodeRow(run=self.run, node=to_db(node), last_seen=event.at)
            flight = event.in_flight.get(node)
            row.active = node in active
            row.seconds_per_step = speeds.get(str(node), row.seconds_per_step)
            row.group = groups.get(str(node))
            row.training_version = None if flight is None else flight.version
            row.steps = None if flight is None else flight.steps
            row.last_seen = event.at
            if event.accepted is not None and event.accepted.node == node:
                row.updates += 1
            if event.rejected is not None and event.rejected[0] == node:
                row.rejected += 1
            if event.quarantined == node:
                row.quarantined = True
            session.add(row)

    def _groups(self, session: Session, event: EventRecord) -> None:
        """Open groups as the policy has them. A group that is no longer open closed with this
        event: who it waited for and whose update is not in its version was late."""
        rows = {
            row.group: row
            for row in session.exec(
                select(GroupRow).where(GroupRow.run == self.run, GroupRow.closed_at == None)  # noqa: E711
            )
        }
        for group in event.policy_state["groups"]:
            row = rows.pop(group["id"], None) or GroupRow(
                run=self.run, group=group["id"], opened_at=event.at, training=[], arrived=[]
            )
            row.expected, row.latest = group["expected"], group["latest"]
            row.training = list(group["training"])
            row.arrived = [a["node"] for a in group["arrived"]]
            session.add(row)
        applied = {c.group: set(c.nodes) for c, _ in event.commits if c.group is not None}
        for row in rows.values():
            in_version = applied.get(row.group, set())
            row.arrived = [n for n in (*row.arrived, *row.training) if n in in_version]
            row.late = [n for n in row.training if n not in in_version]
            row.closed_at = event.at
            session.add(row)

    # -- what devices hold, and the edit ledger ----------------------------------------

    def record_holdings(self, node: int, holdings: Holdings) -> None:
        with Session(self.engine) as session:
            row = session.exec(
                select(HoldingRow).where(HoldingRow.run == self.run, HoldingRow.node == to_db(node))
            ).first() or HoldingRow(
                run=self.run, node=to_db(node), salt="", subject_hashes=[], at=0
            )
            row.salt = holdings.salt
            row.subject_hashes = list(holdings.subject_hashes)
            row.at = time.time()
            session.add(row)
            session.commit()

    def holdings(self) -> dict[int, Holdings]:
        with Session(self.engine) as session:
            rows = session.exec(select(HoldingRow).where(HoldingRow.run == self.run)).all()
            return {from_db(r.node): Holdings(r.salt, tuple(r.subject_hashes)) for r in rows}

    def add_edit(self, edit: LayerEdit, request_id: str, node: int) -> bool:
        """Put an edit into the ledger (file first, then the row); False if it is there already
        (a device's answer that came twice)."""
        with Session(self.engine) as session:
            if self._edit_row(session, edit.edit_id) is not None:
                return False
            path, digest = self._write(_edit_file(edit.edit_id, 0), edits_to_arrays([edit]))
            session.add(
                EditRow(
                    run=self.run,
                    edit_id=edit.edit_id,
                    request_id=request_id,
                    node=to_db(node),
                    layer=edit.layer,
                    path=path,
                    sha256=digest,
                    added_at=time.time(),
                    added_in_version=self._version(session),
                )
            )
            session.commit()
        return True

    def revise_edit(self, edit: LayerEdit) -> None:
        """Store the re-solved form of a ledger edit (a new file, then the row points at it)."""
        with Session(self.engine) as session:
            row = self._edit_row(session, edit.edit_id)
            if row is None:
                raise StateError(f"edit {edit.edit_id!r} is not in the ledger")
            revision = row.revision + 1
            row.path, row.sha256 = self._write(
                _edit_file(edit.edit_id, revision), edits_to_arrays([edit])
            )
            row.revision = revision
            row.revised_at = time.time()
            session.add(row)
            session.commit()

    def ledger(self) -> list[LayerEdit]:
        """Every edit of the shared model, in the order they joined (checksums verified)."""
        with Session(self.engine) as session:
            rows = session.exec(
                select(EditRow).where(EditRow.run == self.run).order_by(EditRow.id)
            ).all()
            return [e for r in rows for e in edits_from_arrays(self._read(r.path, r.sha256))]

    def _edit_row(self, session: Session, edit_id: str) -> EditRow | None:
        return session.exec(
            select(EditRow).where(EditRow.run == self.run, EditRow.edit_id == edit_id)
        ).first()

    def _version(self, session: Session) -> int:
        row = session.get(RunRow, self.run)
        return 0 if row is None else row.version

    # -- files ----------------------------------------------------------------------

    def _write(self, name: str, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
        data = arrays_to_bytes(arrays)
        path = self.files / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return str(path), hashlib.sha256(data).hexdigest()

    def _read(self, path: str, digest: str) -> dict[str, np.ndarray]:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise StateError(f"state file {path} is missing: {error}") from error
        if hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"state file {path} does not match its checksum")
        return arrays_from_bytes(data)

    # -- reading (console, tests) ---------------------------------------------------

    def versions(self) -> list[ModelVersionRow]:
        with Session(self.engine) as session:
            query = select(ModelVersionRow).where(ModelVersionRow.run == self.run)
            return list(session.exec(query.order_by(ModelVersionRow.version)))

    def updates(self) -> list[UpdateRow]:
        with Session(self.engine) as session:
            query = select(UpdateRow).where(UpdateRow.run == self.run)
            return _unsigned_nodes(session.exec(query.order_by(UpdateRow.update_id)))

    def nodes(self) -> list[NodeRow]:
        with Session(self.engine) as session:
            query = select(NodeRow).where(NodeRow.run == self.run)
            return _unsigned_nodes(session.exec(query.order_by(NodeRow.id)))

    def groups(self) -> list[GroupRow]:
        with Session(self.engine) as session:
            query = select(GroupRow).where(GroupRow.run == self.run)
            return list(session.exec(query.order_by(GroupRow.group)))

    def metrics(self) -> list[MetricRow]:
        with Session(self.engine) as session:
            query = select(MetricRow).where(MetricRow.run == self.run)
            return list(session.exec(query.order_by(MetricRow.version)))

    def rejections(self) -> list[RejectionRow]:
        with Session(self.engine) as session:
            query = select(RejectionRow).where(RejectionRow.run == self.run)
            return _unsigned_nodes(session.exec(query.order_by(RejectionRow.id)))

    def model(self, version: int) -> dict[str, np.ndarray]:
        with Session(self.engine) as session:
            row = session.exec(
                select(ModelVersionRow).where(
                    ModelVersionRow.run == self.run, ModelVersionRow.version == version
                )
            ).first()
        if row is None:
            raise StateError(f"run {self.run!r} has no version {version}")
        return self._read(row.path, row.sha256)


RowWithNode = TypeVar("RowWithNode", NodeRow, UpdateRow, RejectionRow, EditRow)


def _unsigned_nodes(rows: Iterable[RowWithNode]) -> list[RowWithNode]:
    """Rows as read, node ids back to Flower's (the rows are detached: nothing is written)."""
    out = list(rows)
    for row in out:
        row.node = from_db(row.node)
    return out


def _edit_file(edit_id: str, revision: int) -> str:
    """A ledger file's name: the id's digest, since the id comes from a device."""
    return f"edits/{hashlib.sha256(edit_id.encode()).hexdigest()[:32]}.r{revision}.safetensors"
