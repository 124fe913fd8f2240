"""Durable LoRA adapters on the device: versioned, checksummed, and never used when damaged.

An adapter version is a directory in peft's own format (`adapter_model.safetensors`
+ `adapter_config.json`), so `PeftModel.from_pretrained(base, version.path)`
reads it as it is; the store (`shared.versioned_store`) adds the manifest, the
atomic publish and the fallback. A device killed in the middle of a save keeps
using the previous adapter; a version corrupted on disk later is skipped for
the newest older one that is intact. Only the last few versions are kept: an
adapter is rewritten after every bout of training, and a device's disk is small.

Saving needs only torch and safetensors: a process that just receives an
adapter (tensors and a config dict from the coordinator) need not import peft,
which takes seconds to load. Loading returns a `LoraConfig`, so it imports peft.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from shared.versioned_store import StoredVersion, StoreError, latest_good, publish_directory

if TYPE_CHECKING:
    from peft import LoraConfig

# The file names peft reads and writes (peft.utils.constants), spelled out so
# that saving does not import peft.
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Tensors the device keeps with an adapter version (the continual learner's
# input sketch): saved in the same version, so adapter and state never disagree.
EXTRA_FILE = "device_state.safetensors"
KIND = "adapter"
DEFAULT_KEEP = 3


class AdapterError(StoreError, ValueError):
    """An adapter that must not be stored: non-finite or non-tensor weights, a non-LoRA config."""


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    """An intact adapter version, read into memory; `version` identifies it (not `==`)."""

    state: dict[str, torch.Tensor]
    config: LoraConfig
    version: StoredVersion
    extra: dict[str, torch.Tensor]

    @property
    def metadata(self) -> dict[str, Any]:
        """What the saver recorded (base model checksum, step counts); one copy, in `version`."""
        return self.version.metadata


def save_adapter(
    root: str | Path,
    name: str,
    state: Mapping[str, torch.Tensor],
    lora_config: LoraConfig | Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    extra: Mapping[str, torch.Tensor] | None = None,
    keep: int = DEFAULT_KEEP,
) -> StoredVersion:
    """Store a peft LoRA state dict and its config as the next version of `name`.

    `state` is what `get_peft_model_state_dict` returns; `extra` are tensors
    that belong with this version (peft ignores the file). Everything is
    checked before a byte is written, so a NaN from a diverged training run,
    or any other bad input, leaves the adapter in use untouched. Versions
    beyond the newest `keep` are deleted.
    """
    tensors = _checked_tensors(name, state)
    extra_tensors = _checked_tensors(name, extra) if extra else {}
    config_json = _config_json(name, lora_config)

    def write(directory: Path) -> None:
        # peft writes the same metadata; some loaders require the format key.
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(config_json, encoding="utf-8")
        if extra_tensors:
            save_file(extra_tensors, directory / EXTRA_FILE)

    return publish_directory(root, name, write, metadata, keep=keep, kind=KIND)


def load_adapter(root: str | Path, name: str) -> LoadedAdapter:
    """The newest intact version of `name` (see `latest_good`), tensors on the CPU."""
    from peft import LoraConfig

    version = latest_good(root, name, kind=KIND)
    extra_path = version.path / EXTRA_FILE
    return LoadedAdapter(
        state=load_file(version.path / WEIGHTS_FILE),
        config=LoraConfig.from_pretrained(str(version.path)),
        version=version,
        extra=load_file(extra_path) if extra_path.exists() else {},
    )


def _checked_tensors(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `state`'s tensors, refusing what would make a useless adapter.

    Copies, because safetensors refuses tensors that share storage (views of one
    buffer) and because the caller may keep training while the save runs.
    """
    if not state:
        raise AdapterError(f"adapter {name!r} has no tensors; nothing was written")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise AdapterError(
                f"adapter {name!r}: {key!r} is a {type(tensor).__name__}, not a named tensor; "
                "nothing was written"
            )
        cpu_tensor = tensor.detach().to("cpu", copy=True).contiguous()
        if not bool(torch.isfinite(cpu_tensor).all()):
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} holds NaN or infinite values; "
                "nothing was written"
            )
        tensors[key] = cpu_tensor
    return tensors


def _config_json(name: str, lora_config: LoraConfig | Mapping[str, Any]) -> str:
    """The config as peft writes it to `adapter_config.json` (sets become lists)."""
    fields = dict(lora_config) if isinstance(lora_config, Mapping) else lora_config.to_dict()
    if fields.get("peft_type") != "LORA":
        raise AdapterError(
            f"adapter {name!r}: config has peft_type {fields.get('peft_type')!r}, not 'LORA'; "
            "nothing was written"
        )
    listed = {
        key: sorted(value) if isinstance(value, set) else value for key, value in fields.items()
    }
    try:
        return json.dumps(listed, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AdapterError(
            f"adapter {name!r}: config is not JSON: {error}; nothing was written"
        ) from error
