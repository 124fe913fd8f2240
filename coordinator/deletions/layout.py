"""Where the deletion API keeps its files in a data directory (beside the coordinator's).

The API process and the coordinator's propagation loop find the same
database, tokens and signing key from the same data directory, so neither
needs to be told where the other one writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ApiFiles:
    """The deletion API's files under one data directory's `coordinator/` folder."""

    root: Path

    @property
    def directory(self) -> Path:
        return self.root / "coordinator"

    @property
    def database(self) -> Path:
        return self.directory / "deletions.db"

    @property
    def tokens(self) -> Path:
        """The apps' token digests and grants (`coordinator.deletions.access`), mode 0600."""
        return self.directory / "api-tokens.json"

    @property
    def signing_key(self) -> Path:
        """The Ed25519 key that signs receipts (0600); its public half is beside it (`.pub`)."""
        return self.directory / "receipt-signing.key"

    def url(self) -> str:
        """The default store: SQLite in the data directory."""
        return f"sqlite:///{self.database}"
