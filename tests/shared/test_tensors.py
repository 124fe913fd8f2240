"""Named arrays on the wire: round trip, and every kind of bad payload refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save

from shared.tensors import TensorPayloadError, arrays_from_bytes, arrays_to_bytes


def test_arrays_round_trip_exactly() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float64)}
    back = arrays_from_bytes(arrays_to_bytes(arrays))
    assert set(back) == {"a", "b"}
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not safetensors", "not a safetensors payload"),
        (save({"a": np.array([1.0, np.inf], np.float32)}), "NaN or infinite"),
        (save({"a": np.array([1, 2], np.int64)}), "not floating point"),
        (save({}), "no arrays"),
    ],
)
def test_bad_payloads_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(TensorPayloadError, match=reason):
        arrays_from_bytes(payload)


def test_an_oversized_payload_is_refused_before_parsing() -> None:
    payload = arrays_to_bytes({"a": np.zeros(1000, np.float32)})
    with pytest.raises(TensorPayloadError, match="exceeds the limit"):
        arrays_from_bytes(payload, max_bytes=100)


def test_nothing_non_finite_is_ever_serialised() -> None:
    with pytest.raises(TensorPayloadError, match="NaN"):
        arrays_to_bytes({"a": np.array([np.nan], np.float32)})
