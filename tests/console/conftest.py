"""A coordinator data directory with real stores in it, written as the coordinator and the
deletion API write them: a FedCompass run with closed and open groups and metrics, and
deletion requests that were verified (with a signed receipt), failed, and are in flight.

Times are fixed and ids drawn from seeded randomness, so screens can be compared with
stored snapshots."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.core import Coordinator
from coordinator.deletions.status import RetryPolicy, Status
from coordinator.deletions.store import DeletionStore
from coordinator.fedcompass import FedCompass
from coordinator.simulation.task import B_KEY
from coordinator.state import StateStore
from shared.receipts import sign_receipt

T0 = 1_790_000_000.0  # the fixed moment the fixture's story starts
NOW = T0 + 300.0  # when the console looks (the slow device is still training)
MODEL = {B_KEY: np.zeros((3, 2), np.float32)}
NODES = (0x1A2B3C, 0x4D5E6F, 0x7A8B9C)


def update(value: float) -> dict[str, np.ndarray]:
    return {B_KEY: np.full((3, 2), value, np.float32)}


def write_run(root: Path, run: str = "console") -> StateStore:
    """A FedCompass run: three devices of different speed, versions with metrics, and a
    group closed with a late member. Returns the store (still open)."""
    folder = root / "coordinator"
    folder.mkdir(parents=True, exist_ok=True)
    store = StateStore(f"sqlite:///{folder / 'coordinator.db'}", folder, run)
    store.start("fedcompass", {"policy": "fedcompass"}, MODEL)
    core = Coordinator(FedCompass(), MODEL, journal=store)
    for node in NODES:
        core.join(node, T0)
    for index, node in enumerate(NODES):  # first returns: 1, 1.2 and 6 s per step
        core.arrive(node, 0, update(0.1), 5, T0 + 100.0 * (1, 1.2, 6)[index])
    for version in range(core.version + 1):
        store.record_metric(version, "heldout_loss", 2.6 - 0.05 * version)
        store.record_metric(version, "heldout_next_token_accuracy", 0.60 + 0.02 * version)
    deadline = core.deadline()
    assert deadline is not None
    fast = NODES[0]
    core.arrive(fast, core.in_flight[fast].version, update(0.2), 5, deadline - 1.0)
    core.tick(deadline + 1.0)  # the other member of the fast pair is late
    store.record_metric(core.version, "heldout_loss", 2.3)
    store.record_metric(core.version, "heldout_next_token_accuracy", 0.7)
    return store


def write_deletions(root: Path) -> DeletionStore:
    """Three requests: verified with a receipt, failed for good, and dispatched."""
    folder = root / "coordinator"
    moments = iter(T0 + 10.0 * i for i in range(1000))
    store = DeletionStore(
        f"sqlite:///{folder / 'deletions.db'}",
        retry=RetryPolicy(max_attempts=1),
        clock=lambda: next(moments),
    )
    verified = store.submit("notes", "notes:alice", [], "k1")[0].request_id
    for status in (Status.DISPATCHED, Status.APPLIED_ON_DEVICES, Status.APPLIED_GLOBALLY):
        store.transition(verified, status)
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: same screens
    record = store.get(verified)
    receipt = sign_receipt(
        {
            "request_id": verified,
            "subject_hash": record.subject_hash,
            "model_versions_before": {"shared": 3},
            "model_versions_after": {"shared": 4},
            "measurements": {"device_forget_em.max": 0.0, "onnx_forget_em.max": 0.0},
            "timestamps": {"received": record.created_at, "verified": T0 + 60, "issued": T0 + 61},
        },
        key,
    )
    store.attach_receipt(verified, receipt.body, receipt.signature, receipt.key_id)
    store.transition(verified, Status.VERIFIED)
    failed = store.submit("mail", "mail:bob", [], "k2")[0].request_id
    store.transition(failed, Status.DISPATCHED)
    store.transition(failed, Status.FAILED, reason="verification failed: edit residual 0.400")
    waiting = store.submit("notes", "notes:carol", [], "k3")[0].request_id
    store.transition(waiting, Status.DISPATCHED)
    targets = {str(NODES[1]): {"state": "asked", "measurements": {}}}
    store.merge_detail(waiting, {"targets": targets})
    return store


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request ids and the store's subject salt from seeded randomness (same screens)."""
    rng = random.Random(7)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=rng.getrandbits(128), version=4))
    monkeypatch.setattr(
        "coordinator.deletions.store.new_key", lambda: bytes(rng.getrandbits(8) for _ in range(32))
    )


@pytest.fixture
def coordinator_dir(tmp_path: Path, fixed_ids: None) -> Path:
    root = tmp_path / "data"
    write_run(root).close()
    write_deletions(root).close()
    return root
