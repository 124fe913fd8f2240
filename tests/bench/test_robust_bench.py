"""`lethe bench robust` end to end on a tiny grid (10 clients, one seed, FedAvg, 600 virtual
seconds), and the attacks it simulates.

The bench's claims that must hold even this small: an attack inside the norm bound is
never rejected (validation cannot see it) and wrecks the plain mean, clipping plus trimmed
mean keeps most of the accuracy, and an attack over the bound is rejected and its senders,
only they, are quarantined.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregation import update_norm
from coordinator.simulation.attacks import Attack, poison, poisoned_nodes, run_attacked
from coordinator.simulation.fleet import run_in_process
from lethe.bench.robust import POLICIES, BenchSettings, run_robust_bench

TINY = BenchSettings(
    clients=10,
    budget=600.0,
    seeds=(1,),
    rules={"fedavg": ("mean", "clip+trimmed")},
    attacks={"fedavg": (("sign-flip", 0.3),)},
)
CELL_KEYS = {
    "policy",
    "attack",
    "poisoned_fraction",
    "rule",
    "acc_final_mean",
    "acc_final_per_seed",
    "drop_vs_clean",
    "rejected",
    "quarantined",
}


def test_the_bench_separates_the_rules_and_quarantines_only_over_the_bound(
    tmp_path: Path,
) -> None:
    path = tmp_path / "robust.json"
    returned = run_robust_bench(path, settings=TINY)

    report = json.loads(path.read_text())
    assert report == returned
    assert {"setting", "cells", "machine"} <= set(report)
    assert report["setting"]["calibration"]["fedavg"]["clip_norm"] > 0
    cells = {
        (c["attack"], c["poisoned_fraction"], c["rule"], c["attack_norm"]): c
        for c in report["cells"]
    }
    assert len(cells) == len(report["cells"]) == 5  # 2 clean, 2 attacked, 1 over the bound
    for cell in report["cells"]:
        assert CELL_KEYS <= set(cell)
        assert len(cell["acc_final_per_seed"]) == 1
        assert 0 <= cell["acc_final_mean"] <= 1

    bound = report["setting"]["max_norm"]
    inside, over = 0.9 * bound, 10 * bound
    clean = cells[("none", 0.0, "mean", 0.0)]
    assert clean["drop_vs_clean"] == 0
    assert clean["acc_final_mean"] > 0.6  # the fleet learns at all

    mean = cells[("sign-flip", 0.3, "mean", inside)]
    robust = cells[("sign-flip", 0.3, "clip+trimmed", inside)]
    for cell in (mean, robust):  # inside the bound: validation sees nothing
        assert cell["rejected"] == 0 and cell["quarantined"] == 0
    assert mean["acc_final_mean"] < 0.2  # the plain mean is taken over by three attackers
    assert mean["drop_vs_clean"] > robust["drop_vs_clean"] + 0.3

    careless = cells[("sign-flip", 0.3, "mean", over)]
    assert careless["rejected"] > 0
    assert careless["quarantined"] >= 1
    assert careless["quarantined_honest"] == 0
    assert careless["drop_vs_clean"] < 0.1  # nothing of theirs was applied


def test_a_clean_attacked_run_is_the_plain_simulation() -> None:
    """Without attackers (and so without rejections) the bench's run is `run_in_process`'s,
    figure for figure: the re-joining core and the trainer wrapper change nothing else."""
    spec = TINY.spec(2)
    attacked = run_attacked(POLICIES["fedavg"], spec, None)
    plain = run_in_process(POLICIES["fedavg"], spec)
    assert attacked.result.curve == plain.curve
    assert attacked.poisoned == attacked.quarantined == frozenset()
    assert len(attacked.honest_norms) == sum(map(len, plain.dispatch_steps.values()))


def test_poisoned_nodes_are_seeded_and_nested() -> None:
    assert poisoned_nodes(20, 0.3, 1) == poisoned_nodes(20, 0.3, 1)
    assert len(poisoned_nodes(20, 0.3, 1)) == 6
    assert poisoned_nodes(20, 0.1, 1) < poisoned_nodes(20, 0.3, 1)
    assert poisoned_nodes(20, 0.3, 1) != poisoned_nodes(20, 0.3, 2)
    assert poisoned_nodes(20, 0.0, 1) == frozenset()


def test_poisoned_updates_have_the_attack_norm_and_pass_the_dtype_check() -> None:
    rng = np.random.default_rng(0)
    honest = {"b": rng.normal(size=(10, 16)).astype(np.float32)}
    flipped = poison("sign-flip", honest, 45.0, seed=3)
    noise = poison("noise", honest, 45.0, seed=3)
    for delta in (flipped, noise):
        assert delta["b"].dtype == np.float32
        assert update_norm(delta) == pytest.approx(45.0, rel=1e-5)
    cosine = float((flipped["b"] * honest["b"]).sum()) / (
        update_norm(flipped) * update_norm(honest)
    )
    assert cosine == pytest.approx(-1.0, abs=1e-5)  # exactly against the honest direction
    assert np.array_equal(noise["b"], poison("noise", honest, 45.0, seed=3)["b"])
    assert not np.array_equal(noise["b"], poison("noise", honest, 45.0, seed=4)["b"])


def test_attack_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        Attack("label-flip", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        Attack("noise", 1.5)
