"""Where a Lethe installation keeps its files.

One data directory holds everything a process writes (models, record stores,
ONNX exports, keys). It is `--data-dir`, else `$LETHE_DATA_DIR`, else
`~/.lethe`. Back it up without the device keyfile (`device/master.key`): the
record store rotates that key on every subject deletion so that older copies
of the database cannot be decrypted (crypto-shredding), and a backup that
keeps the keyfile beside the database would defeat exactly that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    env = os.environ.get("LETHE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".lethe"


@dataclass(frozen=True)
class DataDir:
    """The layout of one data directory."""

    root: Path

    @property
    def models(self) -> Path:
        """Versioned model directories, one sub-folder per model name."""
        return self.root / "models"

    @property
    def device(self) -> Path:
        """State of the on-device daemon (record store, keys, adapters, exports)."""
        return self.root / "device"

    @property
    def certs(self) -> Path:
        """The CA, server certificate and node keys (`shared.pki`, `lethe certs init`)."""
        return self.root / "certs"

    @property
    def record_db(self) -> Path:
        return self.device / "records.db"

    @property
    def master_key(self) -> Path:
        return self.device / "master.key"

    @property
    def onnx_exports(self) -> Path:
        return self.device / "onnx"

    def ensure(self) -> DataDir:
        for path in (self.root, self.models, self.device, self.onnx_exports):
            path.mkdir(parents=True, exist_ok=True)
        return self
