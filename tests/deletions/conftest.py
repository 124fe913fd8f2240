"""Fixtures of the deletion API tests: a real store, real tokens, a real gRPC server.

Tests import nothing from here (pytest's importlib mode): every helper is a fixture.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.service import serve
from coordinator.deletions.status import RetryPolicy
from coordinator.deletions.store import DeletionStore
from coordinator.deletions.tables import DeletionTable
from shared.proto.lethe.v1 import deletion_pb2_grpc


@pytest.fixture
def retry() -> RetryPolicy:
    return RetryPolicy(max_attempts=3, base_s=10.0, cap_s=15.0)


@pytest.fixture
def unused_address() -> str:
    """A loopback address nobody listens on (the port is free when the fixture runs)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "api-tokens.json"


@pytest.fixture
def tokens(tokens_file: Path) -> dict[str, str]:
    """Two apps, each owning its own subject ids, and an operator: name -> bearer token."""
    return {
        "notes": add_token(tokens_file, "notes", Scope.APP, ["notes:*"]),
        "mail": add_token(tokens_file, "mail", Scope.APP, ["mail:*", "shared-?"]),
        "ops": add_token(tokens_file, "ops", Scope.OPERATOR),
    }


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'deletions.db'}"


@pytest.fixture
def store(sqlite_url: str, retry: RetryPolicy) -> Iterator[DeletionStore]:
    with DeletionStore(sqlite_url, retry=retry) as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in tmp_path, or the session's real PostgreSQL (tables dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'deletions.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    cleaner = DeletionStore(url)
    DeletionTable.metadata.drop_all(cleaner.engine)
    cleaner.close()


@pytest.fixture
def address(
    store: DeletionStore, tokens: dict[str, str], tokens_file: Path, unused_address: str
) -> Iterator[str]:
    """A running DeletionService over `store`, answering the `tokens`."""
    server = serve(store, unused_address, tokens_file, workers=8, poll_s=0.05)
    try:
        yield unused_address
    finally:
        server.stop(None)


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> deletion_pb2_grpc.DeletionServiceStub:
    return deletion_pb2_grpc.DeletionServiceStub(channel)
