"""Exact aggregation in the space of B A, and every kind of bad update refused before use."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import (
    UpdateLimits,
    UpdateRejected,
    apply_updates,
    check_update,
    product,
)

RANK, D_IN, D_OUT, CLIENTS = 4, 32, 24, 5


def test_shared_a_makes_b_averaging_exact_where_factor_averaging_is_not() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    b = rng.normal(size=(D_OUT, RANK)).astype(np.float32)
    weights = rng.dirichlet(np.ones(CLIENTS))

    # Factor averaging of trained A and B (what plain FedAvg on LoRA does).
    a_i = [a + 0.3 * rng.normal(size=a.shape).astype(np.float32) for _ in range(CLIENTS)]
    b_i = [b + 0.3 * rng.normal(size=b.shape).astype(np.float32) for _ in range(CLIENTS)]
    wanted = sum(w * product(ai, bi) for w, ai, bi in zip(weights, a_i, b_i, strict=True))
    averaged = product(
        sum(w * ai for w, ai in zip(weights, a_i, strict=True)),
        sum(w * bi for w, bi in zip(weights, b_i, strict=True)),
    )
    factor_error = np.linalg.norm(averaged - wanted) / np.linalg.norm(wanted)

    # Lethe: A fixed fleet-wide, B deltas applied with the same weights.
    deltas = [{"b": 0.3 * rng.normal(size=b.shape).astype(np.float32)} for _ in range(CLIENTS)]
    new_b = apply_updates({"b": b}, list(zip(weights, deltas, strict=True)))["b"]
    wanted = product(a, b) + sum(
        w * (product(a, b + d["b"]) - product(a, b)) for w, d in zip(weights, deltas, strict=True)
    )
    exact_error = np.linalg.norm(product(a, new_b) - wanted) / np.linalg.norm(wanted)

    assert factor_error > 0.01  # factor averaging misses the mean update by percents
    assert exact_error < 1e-6  # float32 storage of B is the only error left
    assert exact_error < factor_error / 1e4


def test_staleness_weights_scale_each_update() -> None:
    base = {"b": np.zeros((2, 2), np.float32)}
    fresh = {"b": np.ones((2, 2), np.float32)}
    stale = {"b": np.full((2, 2), 10.0, np.float32)}
    out = apply_updates(base, [(0.5, fresh), (0.05, stale)])["b"]
    assert np.allclose(out, 0.5 + 0.5)
    assert base["b"].max() == 0  # the input is not modified


TEMPLATE = {"layer.lora_B.weight": np.zeros((3, 2), np.float32)}


def check(delta, **overrides):
    args = dict(node=1, nodes={1, 2}, version=4, expected_version=4)
    args.update(overrides)
    return check_update(delta, TEMPLATE, UpdateLimits(max_norm=5.0), **args)


def test_a_good_update_passes() -> None:
    delta = {"layer.lora_B.weight": np.ones((3, 2), np.float32)}
    assert check(delta).keys() == delta.keys()


@pytest.mark.parametrize(
    ("delta", "overrides", "reason"),
    [
        ({"layer.lora_B.weight": np.ones((3, 2), np.float32)}, {"node": 9}, "not taking part"),
        ({"layer.lora_B.weight": np.ones((3, 2), np.float32)}, {"version": 3}, "answered version"),
        (
            {"layer.lora_B.weight": np.ones((3, 2), np.float32)},
            {"expected_version": None},
            "given no work",
        ),
        ({"other": np.ones((3, 2), np.float32)}, {}, "keys do not match"),
        ({"layer.lora_B.weight": np.ones((2, 3), np.float32)}, {}, "shape"),
        ({"layer.lora_B.weight": np.ones((3, 2), np.float64)}, {}, "dtype"),
        ({"layer.lora_B.weight": np.full((3, 2), np.nan, np.float32)}, {}, "NaN"),
        ({"layer.lora_B.weight": np.full((3, 2), 100.0, np.float32)}, {}, "exceeds the bound"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(delta, overrides, reason) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        check(delta, **overrides)
