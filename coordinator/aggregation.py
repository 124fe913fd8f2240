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
the reason; the caller logs it and applies nothing of that update, and a node
whose updates keep failing is quarantined (`UpdateLimits.quarantine_after`).

Robustness. Checks stop malformed updates, not well-formed hostile ones: a
poisoned client can send a finite update of the right shape, pointed the wrong
way, with a norm just inside the bound. `RobustRule` bounds what any single
update can do: each is clipped to `clip_norm`, and with `trim_fraction` the
sum becomes (sum of weights) x the coordinate-wise trimmed mean of the
updates: per coordinate the largest and smallest `floor(trim_fraction * n)`
values are dropped. Both stay exact in B A (they act on B deltas with A fixed,
and any function of B deltas times A is still a product). Trimming needs
several updates per aggregation to drop anything, so it suits FedAvg rounds
and large FedCompass groups; `lethe bench robust` measures both against
poisoned clients.
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
    """`max_norm`: bound on an update's global L2 norm (a diverged or hostile client).
    `quarantine_after`: rejected updates in a row after which a node gets no more work in
    this run (0: never)."""

    max_norm: float = 50.0
    quarantine_after: int = 3

    def __post_init__(self) -> None:
        if not self.max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {self.max_norm}")
        if self.quarantine_after < 0:
            raise ValueError(f"quarantine_after must be >= 0, got {self.quarantine_after}")


@dataclass(frozen=True)
class RobustRule:
    """How updates are combined: `clip_norm` (0: off) bounds each update's L2 norm;
    `trim_fraction` (0: off, below 0.5) trims that share from each end per coordinate."""

    clip_norm: float = 0.0
    trim_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {self.clip_norm}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")


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
    norm = update_norm(delta)
    if norm > limits.max_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {limits.max_norm:g}")
    return dict(delta)


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The global L2 norm of an update, summed in float64."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def apply_updates(
    global_b: Mapping[str, np.ndarray],
    weighted: Sequence[tuple[float, Mapping[str, np.ndarray]]],
    rule: RobustRule = RobustRule(),
) -> dict[str, np.ndarray]:
    """x + sum_j w_j delta_j per tensor (or its robust form, see `RobustRule`), summed in
    float64 and stored in float32.

    A new dict: the caller commits it as the next version and keeps the old
    one until then, so a crash in between leaves the committed version whole.
    """
    scales = [1.0] * len(weighted)
    if rule.clip_norm > 0:
        scales = [min(1.0, rule.clip_norm / max(update_norm(d), 1e-30)) for _, d in weighted]
    trimmed = int(rule.trim_fraction * len(weighted))
    total_weight = sum(w for w, _ in weighted)
    out = {}
    for key, value in global_b.items():
        total = value.astype(np.float64)
        if trimmed > 0:
            stacked = np.stack(
                [s * d[key].astype(np.float64) for s, (_, d) in zip(scales, weighted, strict=True)]
            )
            kept = np.sort(stacked, axis=0)[trimmed : len(weighted) - trimmed]
            total += total_weight * kept.mean(axis=0)
        else:
            for scale, (weight, delta) in zip(scales, weighted, strict=True):
                total += weight * scale * delta[key].astype(np.float64)
        out[key] = total.astype(np.float32)
    return out


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The weight change a LoRA pair makes (scaling aside): B A, shape d_out x d_in."""
    return b.astype(np.float64) @ a.astype(np.float64)
