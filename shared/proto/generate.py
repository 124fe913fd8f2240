"""Regenerate the Python modules of Lethe's protos: `python -m shared.proto.generate`.

The generated modules are committed (a device needs no compiler); a test
regenerates them into a temporary directory and fails when they differ, so
a changed `.proto` cannot ship with stale code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Compile every `.proto` here and below into `out_root` (package paths kept).

    Returns the generated files. Versioned APIs live in sub-folders named
    after their proto package (`lethe/v1/`), so their modules import as
    `shared.proto.lethe.v1`.
    """
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    for proto in protos:
        relative = proto.relative_to(REPO_ROOT)
        (out_root / relative.parent).mkdir(parents=True, exist_ok=True)  # protoc will not
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{REPO_ROOT}",
                f"--python_out={out_root}",
                f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}",
                str(relative),
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {relative} with status {status}")
    out_dir = out_root / PROTO_DIR.relative_to(REPO_ROOT)
    return sorted(p for p in out_dir.rglob("*") if "_pb2" in p.name)


if __name__ == "__main__":
    for path in generate():
        print(path, file=sys.stderr)
