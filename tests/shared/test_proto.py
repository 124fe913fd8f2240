"""The committed gRPC modules are what the `.proto` files generate today."""

from __future__ import annotations

from pathlib import Path

from shared.proto import generate as generator


def test_generated_modules_match_the_protos(tmp_path: Path) -> None:
    (tmp_path / "shared" / "proto").mkdir(parents=True)  # protoc writes into existing folders
    committed = {p.name: p.read_text() for p in generator.PROTO_DIR.iterdir() if "_pb2" in p.name}
    fresh = {p.name: p.read_text() for p in generator.generate(tmp_path)}
    assert committed.keys() == fresh.keys() and committed, "run python -m shared.proto.generate"
    stale = [name for name in committed if committed[name] != fresh[name]]
    assert not stale, f"stale generated modules {stale}: run python -m shared.proto.generate"
