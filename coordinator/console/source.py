"""Reading the coordinator's state store and deletion store into a `FleetView`.

The console only reads: it opens the databases the coordinator and the
deletion API write (SQLite files in the coordinator's data directory, or the
URLs they were given) and never creates one. Whatever goes wrong (a file not
there yet, a database being replaced, a server down) becomes the view's
`problem`, shown as a banner; the next read tries again, so the console
reconnects by itself.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from coordinator.console.view import (
    DeletionView,
    FleetView,
    GroupView,
    NodeView,
    VersionPoint,
)
from coordinator.deletions.tables import DeletionEventRow, DeletionRow
from coordinator.state_tables import GroupRow, MetricRow, ModelVersionRow, NodeRow, RunRow, from_db
from shared.database import database_engine
from shared.receipts import ReceiptError, parse_body

MAX_DELETIONS = 500  # the newest requests shown; older ones are in `lethe api list`
MAX_GROUPS = 200
MAX_VERSIONS = 2000


@dataclass(frozen=True)
class StoreLocation:
    """Where the coordinator keeps its state: database URLs and, optionally, the run."""

    state_url: str
    deletions_url: str
    run: str | None = None  # None: the newest run in the store

    @classmethod
    def in_data_dir(cls, root: Path, run: str | None = None) -> StoreLocation:
        """The default places under a coordinator's data directory."""
        folder = root / "coordinator"
        return cls(
            f"sqlite:///{folder / 'coordinator.db'}", f"sqlite:///{folder / 'deletions.db'}", run
        )


class StoreSource:
    """Takes `FleetView`s of the stores at `location`; safe to call from a worker thread."""

    def __init__(self, location: StoreLocation, clock: Callable[[], float] = time.time) -> None:
        self.location = location
        self.clock = clock
        self._engines: dict[str, Engine] = {}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def read(self) -> FleetView:
        now = self.clock()
        problems = []
        fleet = FleetView(taken_at=now)
        try:
            fleet = self._fleet(now)
        except Exception as error:  # noqa: BLE001 (any failure is a banner, never a traceback)
            problems.append(f"coordinator state: {_reason(error)}")
        try:
            deletions = self._deletions()
        except Exception as error:  # noqa: BLE001
            problems.append(f"deletion requests: {_reason(error)}")
            deletions = ()
        if fleet.problem:
            problems.insert(0, fleet.problem)
        return FleetView(
            taken_at=now,
            run=fleet.run,
            policy=fleet.policy,
            version=fleet.version,
            nodes=fleet.nodes,
            groups=fleet.groups,
            versions=fleet.versions,
            deletions=deletions,
            problem="; ".join(problems) or None,
        )

    # -- inside -----------------------------------------------------------------------

    def _engine(self, url: str) -> Engine | None:
        """An engine for an existing database; None when a SQLite file is not there yet."""
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            return None
        if url not in self._engines:
            self._engines[url] = database_engine(url)
        return self._engines[url]

    def _fleet(self, now: float) -> FleetView:
        engine = self._engine(self.location.state_url)
        if engine is None:
            return FleetView(taken_at=now, problem="no coordinator has run here yet")
        with Session(engine) as session:
            query = select(RunRow).order_by(col(RunRow.created_at).desc())
            if self.location.run is not None:
                query = query.where(RunRow.name == self.location.run)
            run = session.exec(query).first()
            if run is None:
                wanted = self.location.run or "any run"
                return FleetView(taken_at=now, problem=f"the coordinator has not started {wanted}")
            nodes = session.exec(select(NodeRow).where(NodeRow.run == run.name)).all()
            groups = session.exec(
                select(GroupRow)
                .where(GroupRow.run == run.name)
                .order_by(col(GroupRow.group).desc())
                .limit(MAX_GROUPS)
            ).all()
            versions = session.exec(
                select(ModelVersionRow)
                .where(ModelVersionRow.run == run.name)
                .order_by(col(ModelVersionRow.version).desc())
                .limit(MAX_VERSIONS)
            ).all()
            metrics: dict[int, dict[str, float]] = defaultdict(dict)
            oldest = versions[-1].version if versions else 0
            for metric in session.exec(
                select(MetricRow).where(MetricRow.run == run.name, MetricRow.version >= oldest)
            ):
                metrics[metric.version][metric.name] = metric.value
            return FleetView(
                taken_at=now,
                run=run.name,
                policy=run.policy,
                version=run.version,
                nodes=tuple(_node(n) for n in sorted(nodes, key=lambda n: n.id or 0)),
                groups=tuple(_group(g) for g in reversed(groups)),
                versions=tuple(
                    VersionPoint(
                        v.version,
                        v.created_at,
                        v.group,
                        tuple(from_db(n) for n in v.nodes),
                        metrics.get(v.version, {}),
                    )
                    for v in reversed(versions)
                ),
            )

    def _deletions(self) -> tuple[DeletionView, ...]:
        engine = self._engine(self.location.deletions_url)
        if engine is None:
            return ()
        with Session(engine) as session:
            rows = session.exec(
                select(DeletionRow).order_by(col(DeletionRow.id).desc()).limit(MAX_DELETIONS)
            ).all()
            ids = [r.request_id for r in rows]
            history: dict[str, list[tuple[str, float, str | None]]] = defaultdict(list)
            for event in session.exec(
                select(DeletionEventRow)
                .where(col(DeletionEventRow.request_id).in_(ids))
                .order_by(col(DeletionEventRow.seq))
            ):
                history[event.request_id].append((event.status, event.at, event.reason))
            return tuple(_deletion(r, tuple(history[r.request_id])) for r in rows)


def _node(row: NodeRow) -> NodeView:
    return NodeView(
        node=from_db(row.node),
        active=row.active,
        seconds_per_step=row.seconds_per_step,
        group=row.group,
        steps=row.steps,
        training_version=row.training_version,
        last_seen=row.last_seen,
        updates=row.updates,
        rejected=row.rejected,
        quarantined=bool(row.quarantined),
    )


def _group(row: GroupRow) -> GroupView:
    return GroupView(
        group=row.group,
        opened_at=row.expected if row.opened_at is None else row.opened_at,
        expected=row.expected,
        latest=row.latest,
        closed_at=row.closed_at,
        training=tuple(from_db(n) for n in row.training),
        arrived=tuple(from_db(n) for n in row.arrived),
        late=tuple(from_db(n) for n in row.late or ()),
    )


def _deletion(row: DeletionRow, history: tuple[tuple[str, float, str | None], ...]) -> DeletionView:
    receipt = None
    if row.receipt_body is not None:
        try:
            receipt = parse_body(row.receipt_body)
        except ReceiptError as error:
            receipt = {"unreadable": str(error)}
    return DeletionView(
        request_id=row.request_id,
        app=row.app,
        subject_hash=row.subject_hash,
        status=row.status,
        reason=row.reason,
        attempts=row.attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        history=history,
        receipt=receipt,
        receipt_key_id=row.receipt_key_id,
        details=dict(row.details),
    )


def _reason(error: Exception) -> str:
    """One line a person can act on, not a traceback."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "no such column" in text or "does not exist" in text:
        text += " (an older Lethe wrote this store: the coordinator upgrades it when it starts)"
    return text[:300]
