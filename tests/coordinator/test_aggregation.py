"""Exact aggregation in the space of B A, and every kind of bad update refused before use."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import (
    RobustRule,
    UpdateLimits,
    UpdateRejected,
    apply_updates,
    check_update,
    product,
    update_norm,
)
from coordinator.run_config import RunConfig

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


# -- robust aggregation (RobustRule) -------------------------------------------------------


def _honest(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    return [{"b": rng.normal(size=(D_OUT, RANK)).astype(np.float32)} for _ in range(count)]


def test_clipping_bounds_what_one_huge_update_can_move_the_model() -> None:
    rng = np.random.default_rng(1)
    base = {"b": rng.normal(size=(D_OUT, RANK)).astype(np.float32)}
    huge = {"b": 1e6 * rng.normal(size=(D_OUT, RANK)).astype(np.float32)}
    weight, clip = 0.25, 2.0
    moved = apply_updates(base, [(weight, huge)], RobustRule(clip_norm=clip))
    step = update_norm({"b": moved["b"].astype(np.float64) - base["b"]})
    assert step == pytest.approx(weight * clip, rel=1e-5)  # clipped to the bound, not beyond
    plain = apply_updates(base, [(weight, huge)])
    assert update_norm({"b": plain["b"].astype(np.float64) - base["b"]}) > 1e4 * step

    # Among honest updates the huge one adds at most weight x clip_norm to the step.
    honest = _honest(rng, 4)
    weighted = [(weight, d) for d in honest]
    without = apply_updates(base, weighted, RobustRule(clip_norm=1e9))["b"].astype(np.float64)
    with_huge = apply_updates(base, [*weighted, (weight, huge)], RobustRule(clip_norm=clip))
    honest_norms = [update_norm(d) for d in honest]
    assert max(honest_norms) > clip  # some honest updates are clipped too
    clipped_honest = apply_updates(base, weighted, RobustRule(clip_norm=clip))["b"]
    extra = with_huge["b"].astype(np.float64) - clipped_honest.astype(np.float64)
    assert update_norm({"b": extra}) <= weight * clip * (1 + 1e-5)
    assert not np.allclose(without, clipped_honest)


def test_clipping_leaves_updates_inside_the_bound_as_they_are() -> None:
    rng = np.random.default_rng(2)
    base = {"b": np.zeros((D_OUT, RANK), np.float32)}
    weighted = [(0.2, d) for d in _honest(rng, CLIENTS)]
    bound = max(update_norm(d) for _, d in weighted) * 1.01
    clipped = apply_updates(base, weighted, RobustRule(clip_norm=bound))["b"]
    assert np.array_equal(clipped, apply_updates(base, weighted)["b"])


def test_trimmed_mean_ignores_one_extreme_update_among_five_per_coordinate() -> None:
    rng = np.random.default_rng(3)
    base = {"b": rng.normal(size=(D_OUT, RANK)).astype(np.float32)}
    honest = _honest(rng, 4)
    signs = np.where(rng.random((D_OUT, RANK)) < 0.5, -1.0, 1.0).astype(np.float32)
    rule = RobustRule(trim_fraction=0.2)  # floor(0.2 x 5) = 1 value dropped at each end
    weights = [0.2] * 5

    def aggregate(magnitude: float) -> np.ndarray:
        extreme = {"b": magnitude * signs}  # huge in both directions, coordinate by coordinate
        updates = [*honest, extreme]
        return apply_updates(base, list(zip(weights, updates, strict=True)), rule)["b"]

    small, large = aggregate(1e3), aggregate(1e9)
    assert np.array_equal(small, large)  # how extreme it is does not matter: it is dropped

    stacked = np.stack([d["b"].astype(np.float64) for d in honest])
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    step = large.astype(np.float64) - base["b"]
    assert np.all(step >= sum(weights) * low - 1e-5)
    assert np.all(step <= sum(weights) * high + 1e-5)
    # Exactly: (sum of weights) x the mean of the middle three values per coordinate.
    every = np.concatenate([stacked, 1e9 * signs[None].astype(np.float64)])
    wanted = base["b"] + sum(weights) * np.sort(every, axis=0)[1:4].mean(axis=0)
    assert np.allclose(large, wanted, atol=1e-5)


def test_trimming_needs_enough_updates_to_drop_anything() -> None:
    """floor(0.1 x 5) = 0: with small groups the trimmed mean is the plain weighted sum, and
    one extreme update moves the model as far as it likes (why small FedCompass groups are
    not protected by trimming)."""
    rng = np.random.default_rng(4)
    base = {"b": np.zeros((D_OUT, RANK), np.float32)}
    updates = [*_honest(rng, 4), {"b": np.full((D_OUT, RANK), 1e6, np.float32)}]
    weighted = [(0.2, d) for d in updates]
    trimmed = apply_updates(base, weighted, RobustRule(trim_fraction=0.1))["b"]
    assert np.array_equal(trimmed, apply_updates(base, weighted)["b"])
    assert trimmed.min() > 1e5


def test_robust_rules_stay_exact_in_the_space_of_b_a() -> None:
    """Clipping and trimming act on B deltas with A fixed fleet-wide, so the model's weight
    change is exactly (the robust aggregate of the B deltas) A, computed here in products."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    b = rng.normal(size=(D_OUT, RANK)).astype(np.float32)
    deltas = _honest(rng, 7)
    deltas[0] = {"b": 50 * deltas[0]["b"]}  # one large update, clipped
    weights = rng.dirichlet(np.ones(len(deltas)))
    clip, trim = 3.0, 0.2
    new_b = apply_updates(
        {"b": b},
        list(zip(weights, deltas, strict=True)),
        RobustRule(clip_norm=clip, trim_fraction=trim),
    )["b"]

    scales = [min(1.0, clip / update_norm(d)) for d in deltas]
    # Clipping in B scales the product update by the same factor: (s dB) A = s (dB A).
    clipped_products = [s * product(a, d["b"]) for s, d in zip(scales, deltas, strict=True)]
    assert np.allclose(clipped_products[0], product(a, scales[0] * deltas[0]["b"]))
    # The trimmed mean of B deltas, applied through A.
    stacked = np.stack([s * d["b"].astype(np.float64) for s, d in zip(scales, deltas, strict=True)])
    dropped = int(trim * len(deltas))
    robust_b = np.sort(stacked, axis=0)[dropped : len(deltas) - dropped].mean(axis=0)
    wanted = product(a, b) + sum(weights) * product(a, robust_b)
    error = np.linalg.norm(product(a, new_b) - wanted) / np.linalg.norm(wanted)
    assert error < 1e-6  # float32 storage of B is the only error left
    # And with clipping alone it is the weighted sum of the clipped products.
    clipped_b = apply_updates(
        {"b": b}, list(zip(weights, deltas, strict=True)), RobustRule(clip_norm=clip)
    )["b"]
    wanted = product(a, b) + sum(w * p for w, p in zip(weights, clipped_products, strict=True))
    assert np.linalg.norm(product(a, clipped_b) - wanted) / np.linalg.norm(wanted) < 1e-6


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"clip_norm": -1.0}, "clip_norm must be >= 0"),
        ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
        ({"trim_fraction": -0.1}, "trim_fraction must be in"),
    ],
)
def test_robust_rule_refuses_meaningless_settings(kwargs, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        RobustRule(**kwargs)
    with pytest.raises(ValueError, match=reason):  # a run config with them is refused too
        RunConfig(**kwargs)


def test_robust_rule_defaults_to_the_plain_weighted_sum() -> None:
    rng = np.random.default_rng(6)
    base = {"b": rng.normal(size=(D_OUT, RANK)).astype(np.float32)}
    weighted = [(w, d) for w, d in zip(rng.random(CLIENTS), _honest(rng, CLIENTS), strict=True)]
    assert np.array_equal(
        apply_updates(base, weighted, RobustRule())["b"], apply_updates(base, weighted)["b"]
    )
