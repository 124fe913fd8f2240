"""What the operator console shows, as plain data, and the pure rules that shape it.

`coordinator.console.source` reads the coordinator's stores into a `FleetView`;
`coordinator.console.app` draws it. Keeping the view plain (no sessions, no
widgets) lets the rules here (statuses, staleness, the deletion filter, the
timeline's layout) be tested in milliseconds and lets the app redraw from a
view taken on another thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A node is overdue when its work has taken twice what its speed predicts, plus this slack
# (its reply may still come, but the operator should look).
OVERDUE_SLACK_S = 30.0


@dataclass(frozen=True)
class NodeView:
    """One device as the scheduler knows it."""

    node: int
    active: bool
    seconds_per_step: float | None
    group: int | None
    steps: int | None  # the Q_i of the work it is doing, None when idle
    training_version: int | None
    last_seen: float
    updates: int
    rejected: int
    quarantined: bool = False

    def status(self, now: float) -> str:
        if self.quarantined:
            return "quarantined"
        if not self.active:
            return "gone"
        if self.steps is None:
            return "idle"
        predicted = (self.seconds_per_step or 0.0) * self.steps
        overdue = predicted > 0 and now - self.last_seen > 2 * predicted + OVERDUE_SLACK_S
        return "overdue" if overdue else "training"

    def staleness(self, version: int) -> int | None:
        """Versions committed since the one it trains from (what its update will be behind)."""
        return None if self.training_version is None else version - self.training_version


@dataclass(frozen=True)
class GroupView:
    """One FedCompass arrival group: planned times, and who arrived or was late."""

    group: int
    opened_at: float
    expected: float
    latest: float
    closed_at: float | None
    training: tuple[int, ...]
    arrived: tuple[int, ...]
    late: tuple[int, ...]


@dataclass(frozen=True)
class VersionPoint:
    """One version of the shared model and what was measured on it."""

    version: int
    at: float
    group: int | None
    nodes: tuple[int, ...]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class DeletionView:
    """One deletion request with its history, measurements and receipt."""

    request_id: str
    app: str
    subject_hash: str
    status: str
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    history: tuple[tuple[str, float, str | None], ...]  # (status, at, reason), oldest first
    receipt: Mapping[str, Any] | None  # the signed body, parsed
    receipt_key_id: str | None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def measurements(self) -> Mapping[str, Any]:
        """The receipt's measurements once there is one; before, what the devices reported."""
        if self.receipt is not None:
            return self.receipt.get("measurements", {})
        merged: dict[str, Any] = {}
        for node, target in sorted(self.details.get("targets", {}).items()):
            for name, value in target.get("measurements", {}).items():
                merged[f"{name}@{short_node(int(node))}"] = value
        return merged


@dataclass(frozen=True)
class FleetView:
    """Everything the console shows at one moment. `problem` says why parts are missing (the
    store cannot be read, or holds no run yet); the console shows it as a banner."""

    taken_at: float
    run: str | None = None
    policy: str | None = None
    version: int = 0
    nodes: tuple[NodeView, ...] = ()
    groups: tuple[GroupView, ...] = ()
    versions: tuple[VersionPoint, ...] = ()
    deletions: tuple[DeletionView, ...] = ()
    problem: str | None = None


def short_node(node: int) -> str:
    """Flower node ids use 64 bits; six hex digits tell a fleet's nodes apart on screen."""
    return f"{node & 0xFFFFFF:06x}"


def matching(
    deletions: Sequence[DeletionView], text: str = "", status: str | None = None
) -> list[DeletionView]:
    """The requests in `status` (None: any) whose id, app, subject hash, status or failure
    reason contains `text` (case-insensitive), newest first."""
    needle = text.strip().lower()
    out = []
    for request in deletions:
        if status is not None and request.status != status:
            continue
        fields = (request.request_id, request.app, request.subject_hash, request.status)
        haystack = " ".join((*fields, request.reason or "")).lower()
        if needle in haystack:
            out.append(request)
    return sorted(out, key=lambda r: r.created_at, reverse=True)


def series(versions: Sequence[VersionPoint], name: str) -> tuple[list[int], list[float]]:
    """Versions that measured `name`, and the values, in version order."""
    points = sorted((v.version, v.metrics[name]) for v in versions if name in v.metrics)
    return [p[0] for p in points], [p[1] for p in points]


def integer_ticks(values: Sequence[int], most: int = 6) -> list[int]:
    """At most `most` whole-number ticks spanning `values` (versions are whole numbers)."""
    if not values:
        return []
    low, high = min(values), max(values)
    step = max(1, -(-(high - low) // max(1, most - 1)))
    return list(range(low, high + 1, step))


def timeline_row(group: GroupView, start: float, end: float, width: int, now: float) -> str:
    """One group as a bar on the time axis [start, end] of `width` cells.

    `━` runs from the group's opening to its expected arrival, `┄` on to its
    latest arrival time; `│` marks the close (or `now` while it is open).
    """
    if width < 3 or end <= start:
        return ""
    scale = (width - 1) / (end - start)

    def cell(moment: float) -> int:
        return max(0, min(width - 1, round((moment - start) * scale)))

    cells = [" "] * width
    opened, expected, latest = cell(group.opened_at), cell(group.expected), cell(group.latest)
    for i in range(opened, expected + 1):
        cells[i] = "━"
    for i in range(expected + 1, latest + 1):
        cells[i] = "┄"
    cells[cell(group.closed_at if group.closed_at is not None else now)] = "│"
    return "".join(cells)


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
