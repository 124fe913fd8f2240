"""The committed gRPC modules are what the `.proto` files generate today."""

from __future__ import annotations

from pathlib import Path

from shared.proto import generate as generator


def _generated(root: Path) -> dict[str, str]:
    """Every generated module under `root`'s proto folder, by its path below that folder."""
    out_dir = root / generator.PROTO_DIR.relative_to(generator.REPO_ROOT)
    return {
        str(p.relative_to(out_dir)): p.read_text() for p in out_dir.rglob("*") if "_pb2" in p.name
    }


def test_generated_modules_match_the_protos(tmp_path: Path) -> None:
    committed = _generated(generator.REPO_ROOT)
    generator.generate(tmp_path)
    fresh = _generated(tmp_path)
    assert committed.keys() == fresh.keys() and committed, "run python -m shared.proto.generate"
    stale = [name for name in committed if committed[name] != fresh[name]]
    assert not stale, f"stale generated modules {stale}: run python -m shared.proto.generate"


def test_every_proto_is_compiled_including_versioned_packages() -> None:
    protos = {p.relative_to(generator.PROTO_DIR) for p in generator.PROTO_DIR.rglob("*.proto")}
    assert Path("lethe/v1/deletion.proto") in protos and Path("device.proto") in protos
    modules = _generated(generator.REPO_ROOT)
    for proto in protos:
        stem = str(proto.with_suffix(""))
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"} <= modules.keys()


def test_the_versioned_modules_import_from_their_package_path() -> None:
    from shared.proto.lethe.v1 import deletion_pb2, deletion_pb2_grpc

    service = deletion_pb2.DESCRIPTOR.services_by_name["DeletionService"]
    assert service.full_name == "lethe.v1.DeletionService"
    assert hasattr(deletion_pb2_grpc, "DeletionServiceStub")
