"""Aggregating shared-adapter updates: checked first, then applied exactly.

Exactness. Averaging LoRA factors separately is not averaging the updates:
mean(B_i A_i) != mean(B_i) mean(A_i). Lethe uses the FFA-LoRA remedy: the
shared adapter's A factors are fixed fleet-wide (every device draws them from
the shared seed) and only B trains. Every update is then (B_i - B) A with the
same A, so the weighted sum of products is the product of the weighted sum:
sum_j w_j (B_j - B) A = (sum_j w_j (B_j - B)) A. Summing B deltas is exact in
the space of B A, with no residual to fold into the base weights (FedEx-LoRA)
and no rank growth (stacking, FLoRA). Its price is that A does not learn; a
test shows the error factor averaging would make instead.

Checks, before anything is applied: the node is taking part, the update
answers the version it was sent, the keys are exactly the adapter's B
factors, each shape matches, dtype float32, values finite, and the update's
global L2 norm is within the bound. A failure raises `UpdateRejected` with
the reason; the caller logs it and applies nothing of that update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class UpdateRejected(ValueError):
    """An update that must not be applied; the message is the reason."""


@dataclass(frozen=True)
class UpdateLimits:
    """`max_norm`: bound on an update's global L2 norm (a diverged or hostile client)."""

    max_norm: float = 50.0

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {self.max_norm}")


def check_update(
    delta: Mapping[str, np.ndarray],
    template: Mapping[str, np.ndarray],
    limits: UpdateLimits,
    *,
    node: int,
    nodes: set[int] | frozenset[int],
    version: int,
    expected_version: int | None,
) -> dict[str, np.ndarray]:
    """`delta` as a dict if it may be applied, else UpdateRejected with the reason."""
    if node not in nodes:
        raise UpdateRejected(f"node {node} is not taking part in this run")
    if expected_version is None:
        raise UpdateRejected(f"node {node} was given no work; nothing to answer")
    if version != expected_version:
        raise UpdateRejected(
            f"node {node} answered version {version}, it was sent version {expected_version}"
        )
    unknown = sorted(set(delta) - set(template))
    missing = sorted(set(template) - set(delta))
    if unknown or missing:
        raise UpdateRejected(
            f"keys do not match the shared adapter: {len(unknown)} unknown "
            f"{unknown[:2]}, {len(missing)} missing {missing[:2]}"
        )
    squares = 0.0
    for key, reference in template.items():
        value = delta[key]
        if not isinstance(value, np.ndarray):
            raise UpdateRejected(f"{key}: a {type(value).__name__}, not an array")
        if value.shape != reference.shape:
            raise UpdateRejected(f"{key}: shape {value.shape}, expected {reference.shape}")
        if value.dtype != np.float32:
            raise UpdateRejected(f"{key}: dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{key}: holds NaN or infinite values")
        squares += float(np.square(value, dtype=np.float64).sum())
    norm = math.sqrt(squares)
    if norm > limits.max_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {limits.max_norm:g}")
    return dict(delta)


def apply_updates(
    global_b: Mapping[str, np.ndarray], weighted: Sequence[tuple[float, Mapping[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    """x + sum_j w_j delta_j per tensor, summed in float64 and stored in float32.

    A new dict: the caller commits it as the next version and keeps the old
    one until then, so a crash in between leaves the committed version whole.
    """
    out = {}
    for key, value in global_b.items():
        total = value.astype(np.float64)
        for weight, delta in weighted:
            total += weight * delta[key].astype(np.float64)
        out[key] = total.astype(np.float32)
    return out


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The weight change a LoRA pair makes (scaling aside): B A, shape d_out x d_in."""
    return b.astype(np.float64) @ a.astype(np.float64)
