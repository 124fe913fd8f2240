"""Carrying a deletion request from the API's store to the devices and into the shared model.

The coordinator's loop calls `Propagator.step` between its other work; each
call moves every open request as far as it can without waiting:

RECEIVED            once every connected node has announced what it holds, find
                    the holders: nodes whose last announcement holds
                    sha256(node salt || subject id); remember them -> DISPATCHED
DISPATCHED          send an unlearn query to each holder that is connected and
                    not asked yet (an offline holder is asked when it returns);
                    each answer's shared edit goes into the ledger at once;
                    when every holder has answered -> APPLIED_ON_DEVICES
APPLIED_ON_DEVICES  the ledger serves the edits on top of every version from
                    now on (train messages carry it) -> APPLIED_GLOBALLY
APPLIED_GLOBALLY    verify: each edit of the request still meets its targets
                    on the current shared weights, and every holder measured
                    exact match 0 on the subject's records in its own model,
                    the shared model and its ONNX export; sign the receipt
                    -> VERIFIED
A holder that has not answered yet gets no training work (`owes`, which the
coordinator's loop consults): a device that was offline during a deletion is
unlearned when it returns, before it trains again. Work a holder was sent
before it was asked may have trained on the subject's records: its updates
are refused (`forgot`), so a late update cannot put the subject back into the
shared model. A device's error answer or a malformed
one makes the request FAILED with
the reason; it is retried from RECEIVED (holders that answered already are
not asked again) until the store's attempts run out.

Progress lives in the request's details (the store), edits in the ledger
(the state store): after a coordinator restart, queries that were in flight
are sent again, and devices answer a repeated query from what they did.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.unlearning.edits import LayerEdit, edits_from_arrays
from coordinator.deletions.records import DeletionRecord
from coordinator.deletions.status import Status
from coordinator.deletions.store import DeletionStore, IllegalTransition
from coordinator.state import StateStore
from shared.edit_ids import is_shared_edit_of
from shared.fl_messages import UnlearnQuery, UnlearnResult
from shared.holdings import Holdings, subject_hash
from shared.receipts import sign_receipt

log = logging.getLogger(__name__)

# What a holder must have measured for the request to be VERIFIED (NaN: nothing to measure).
ZERO_MEASURES = ("device_forget_em", "shared_forget_em", "onnx_forget_em")
RESIDUAL_TOLERANCE = 0.1


Answer = UnlearnResult | Holdings | None


class QueryChannel(Protocol):
    """How queries reach devices (Flower's Grid in the ServerApp)."""

    def connected(self) -> set[int]: ...

    def send(self, node: int, query: UnlearnQuery) -> str:
        """Send an unlearn query; returns a handle that `poll` names the answer by."""

    def announce(self, node: int) -> str:
        """Ask a device which subjects it holds; the answer is its `Holdings`."""

    def poll(self) -> list[tuple[str, int, Answer, str]]:
        """Answers since the last poll: (handle, node, answer or None, error reason)."""


class SharedWeights(Protocol):
    """The shared model as the coordinator holds it now."""

    @property
    def version(self) -> int: ...

    def residuals(self, edits: Sequence[LayerEdit]) -> dict[str, float]:
        """Per edit id, how far the edit is from its targets on the current weights."""

    def settle_ledger(self) -> list[LayerEdit]:
        """Re-solve the ledger's edits the current weights moved; returns those."""


@dataclass
class Propagator:
    deletions: DeletionStore
    state: StateStore
    channel: QueryChannel
    shared: SharedWeights
    signing_key: Ed25519PrivateKey
    clock: Callable[[], float] = time.time
    # Told when a device has forgotten a subject: its updates from before must not count.
    forgot: Callable[[int], None] = lambda _node: None

    def __post_init__(self) -> None:
        self._asked: dict[str, tuple[str, int]] = {}  # handle -> (request id, node)
        self._announcing: dict[str, int] = {}  # handle -> node asked to announce
        self._owed: dict[str, set[int]] = {}  # request id -> holders that have not answered

    def owes(self, node: int) -> bool:
        """Whether `node` holds a subject some request is waiting for it to forget: it must
        not train again (its update would carry the subject) until it has answered."""
        return any(node in holders for holders in self._owed.values())

    def step(self) -> bool:
        """Move every open request as far as it goes now; True when the ledger grew (the
        caller serves the new edits from then on)."""
        grew = self._take_answers()
        for request in self.deletions.due(self.clock()):
            try:
                self._advance(request)
            except IllegalTransition as error:  # another process moved it meanwhile
                log.info("request %s moved under us: %s", request.request_id, error)
            except Exception as error:  # noqa: BLE001 (one bad request must not stop the rest)
                log.exception("request %s could not move", request.request_id)
                self._fail(self.deletions.get(request.request_id), f"internal error: {error}")
        return grew

    # -- moving requests ---------------------------------------------------------------

    def _advance(self, request: DeletionRecord) -> None:
        if request.status is Status.RECEIVED:
            self._dispatch(request)
        elif request.status is Status.DISPATCHED:
            self._ask(request)
        elif request.status is Status.APPLIED_ON_DEVICES:
            ledger = self.state.ledger()
            after = {"shared": self.shared.version, "ledger": len(ledger)}
            self.deletions.transition(
                request.request_id,
                Status.APPLIED_GLOBALLY,
                detail={"versions_after": after},
                expect={Status.APPLIED_ON_DEVICES},
            )
            self.deletions.merge_detail(request.request_id, {"versions_after": after})
        elif request.status is Status.APPLIED_GLOBALLY:
            self._verify(request)

    def _dispatch(self, request: DeletionRecord) -> None:
        if request.subject_id is None:
            self._fail(request, "the request no longer holds its subject id")
            return
        announced = self.state.holdings()
        silent = self.channel.connected() - set(announced)
        if silent:  # a connected device that has not announced yet may hold the subject
            for node in silent - set(self._announcing.values()):
                self._announcing[self.channel.announce(node)] = node
            log.info(
                "request %s waits for %d device(s) to announce", request.request_id, len(silent)
            )
            return
        known = dict(request.details.get("targets", {}))
        for node, holdings in announced.items():
            hashed = subject_hash(holdings.salt, request.subject_id)
            if hashed in holdings.subject_hashes and str(node) not in known:
                known[str(node)] = {"subject_hash": hashed, "state": "pending"}
        for target in known.values():
            if target["state"] == "asked":  # asked before a failure or a restart: ask again
                target["state"] = "pending"
        before = request.details.get("versions_before") or {
            "shared": self.shared.version,
            "ledger": len(self.state.ledger()),
        }
        detail = {"targets": known, "versions_before": before}
        self.deletions.merge_detail(request.request_id, detail)
        self.deletions.transition(
            request.request_id,
            Status.DISPATCHED,
            detail={"holders": sorted(known)},
            expect={Status.RECEIVED},
        )
        log.info("request %s: %d holder(s)", request.request_id, len(known))
        self._ask(self.deletions.get(request.request_id))

    def _ask(self, request: DeletionRecord) -> None:
        targets = dict(request.details.get("targets", {}))
        in_flight = {(r, n) for r, n in self._asked.values()}
        connected = self.channel.connected()
        changed = False
        for node_text, target in targets.items():
            node = int(node_text)
            waiting = target["state"] in ("pending", "asked")
            if waiting and node in connected and (request.request_id, node) not in in_flight:
                query = UnlearnQuery(request.request_id, target["subject_hash"], request.selectors)
                self._asked[self.channel.send(node, query)] = (request.request_id, node)
                # From now on its updates of work sent earlier do not count, whatever order
                # the replies are pulled in (it is told again when it answers).
                self.forgot(node)
                if target["state"] != "asked":
                    target["state"] = "asked"
                    changed = True
        if changed:
            self.deletions.merge_detail(request.request_id, {"targets": targets})
        self._owed[request.request_id] = {
            int(n) for n, t in targets.items() if t["state"] in ("pending", "asked")
        }
        if all(t["state"] in ("done", "absent") for t in targets.values()):
            self.deletions.transition(
                request.request_id,
                Status.APPLIED_ON_DEVICES,
                detail={"devices": sum(t["state"] == "done" for t in targets.values())},
                expect={Status.DISPATCHED},
            )

    def _take_answers(self) -> bool:
        grew = False
        for handle, node, result, reason in self.channel.poll():
            if self._announcing.pop(handle, None) is not None:
                if isinstance(result, Holdings):
                    self.state.record_holdings(node, result)
                else:
                    log.warning("device %d did not announce: %s", node, reason or result)
                continue
            asked = self._asked.pop(handle, None)
            if asked is None:
                continue
            request_id, _ = asked
            request = self.deletions.get(request_id)
            if request.status is not Status.DISPATCHED:
                continue
            if not isinstance(result, UnlearnResult):
                self._fail(request, f"device {node}: {reason or 'not an unlearn answer'}")
                continue
            if result.holdings is not None:
                self.state.record_holdings(node, result.holdings)
            try:
                outcome = self._take(request, node, result)
            except ValueError as error:
                self._fail(request, f"device {node} answered with a bad edit: {error}")
                continue
            grew = grew or outcome["state"] == "done"
            targets = dict(request.details.get("targets", {}))
            targets[str(node)] = {**targets[str(node)], **outcome}
            self.deletions.merge_detail(request_id, {"targets": targets})
            self._ask(self.deletions.get(request_id))
        return grew

    def _take(self, request: DeletionRecord, node: int, result: UnlearnResult) -> dict[str, Any]:
        """What a device's answer adds to its target; its edit joins the ledger."""
        if not result.held:
            return {"state": "absent"}
        self.forgot(node)
        if not result.shared_edit:  # the selectors picked none of its records
            return {"state": "done", "edit_id": None, "measurements": {}, "versions": {}}
        if result.request_id != request.request_id:
            raise ValueError(f"the answer is for request {result.request_id[:64]!r}")
        edits = edits_from_arrays(result.shared_edit)
        if len(edits) != 1 or not is_shared_edit_of(edits[0].edit_id, request.request_id):
            raise ValueError(f"expected one shared edit for the request, got {len(edits)}")
        edit = edits[0]
        self.shared.residuals([edit])  # raises ValueError when it does not fit the model
        self.state.add_edit(edit, request.request_id, node)
        return {
            "state": "done",
            "edit_id": edit.edit_id,
            "measurements": {k: _finite_or_none(v) for k, v in result.measurements.items()},
            "versions": result.versions,
        }

    def _verify(self, request: DeletionRecord) -> None:
        targets = request.details.get("targets", {})
        done = {n: t for n, t in targets.items() if t["state"] == "done"}
        ids = {t["edit_id"] for t in done.values() if t["edit_id"] is not None}
        # An edit was solved on the shared model the device held, which may be some versions
        # old: bring the ledger onto the current weights first.
        for edit in self.shared.settle_ledger():
            self.state.revise_edit(edit)
        edits = [e for e in self.state.ledger() if e.edit_id in ids]
        residuals = self.shared.residuals(edits)
        problems = [
            f"edit {i} residual {r:.3f}" for i, r in residuals.items() if r > RESIDUAL_TOLERANCE
        ]
        for node, target in done.items():
            for name in ZERO_MEASURES:
                value = target.get("measurements", {}).get(name)
                if value is not None and value > 0:
                    problems.append(f"device {node}: {name} = {value:.3f}")
        if problems:
            self._fail(request, "verification failed: " + "; ".join(problems))
            return
        now = self.clock()
        measurements = {
            f"{name}.max": max(
                (t.get("measurements", {}).get(name) or 0.0 for t in done.values()), default=0.0
            )
            for name in ZERO_MEASURES
        }
        measurements["edit_residual.max"] = max(residuals.values(), default=0.0)
        measurements["devices"] = float(len(done))
        signed = sign_receipt(
            {
                "request_id": request.request_id,
                "subject_hash": request.subject_hash,
                "model_versions_before": request.details.get("versions_before", {}),
                "model_versions_after": request.details.get("versions_after", {}),
                "measurements": measurements,
                "timestamps": {"received": request.created_at, "verified": now, "issued": now},
            },
            self.signing_key,
        )
        self.deletions.attach_receipt(
            request.request_id, signed.body, signed.signature, signed.key_id
        )
        self.deletions.transition(
            request.request_id,
            Status.VERIFIED,
            detail={"measurements": measurements},
            expect={Status.APPLIED_GLOBALLY},
        )
        log.info("request %s verified on %d device(s)", request.request_id, len(done))

    def _fail(self, request: DeletionRecord, reason: str) -> None:
        log.warning("request %s failed: %s", request.request_id, reason)
        self._owed.pop(request.request_id, None)
        failed = self.deletions.transition(request.request_id, Status.FAILED, reason=reason)
        if not failed.final:
            self.deletions.transition(request.request_id, Status.RECEIVED)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
