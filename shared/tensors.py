"""Named arrays on the wire: adapters and deltas between processes and machines.

One format everywhere (safetensors: no pickle, so a hostile payload cannot
run code), read with a size limit and checked before anyone uses it: the
names, dtypes (floating point only) and that every value is finite. numpy is
the common currency: the coordinator need not import torch, Flower's
`ArrayRecord` takes numpy arrays, and the device converts at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_FLOATS = (np.float16, np.float32, np.float64)


class TensorPayloadError(ValueError):
    """A payload that is not a clean set of named finite float arrays; nothing was used."""


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays (checked first, so a NaN is never sent)."""
    checked = check_arrays(arrays)
    return save({name: np.ascontiguousarray(array) for name, array in checked.items()})


def arrays_from_bytes(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Parse and check a payload, or raise TensorPayloadError."""
    if len(data) > max_bytes:
        raise TensorPayloadError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        arrays = load(data)
    except (SafetensorError, ValueError, OverflowError) as error:
        raise TensorPayloadError(f"not a safetensors payload: {error}") from error
    return check_arrays(arrays)


def check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays as a dict, after checking names, float dtypes and finiteness."""
    if not arrays:
        raise TensorPayloadError("no arrays")
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or not name:
            raise TensorPayloadError(f"array name {name!r} is not a non-empty string")
        if not isinstance(array, np.ndarray):
            raise TensorPayloadError(f"{name}: a {type(array).__name__}, not an array")
        if array.dtype.type not in _FLOATS:
            raise TensorPayloadError(f"{name}: dtype {array.dtype} is not floating point")
        if not np.isfinite(array).all():
            raise TensorPayloadError(f"{name}: holds NaN or infinite values")
        out[name] = array
    return out
