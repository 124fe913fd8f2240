"""`lethe bench unlearning` end to end on tiny settings: the JSON has every cell of the issue's
table, and every figure is finite and in its range (the numbers themselves mean nothing here:
the model is built in 50 steps and the device trains 20)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lethe.bench.unlearning import HEADLINE, METHODS, BenchSettings, run_unlearning_bench

TINY = BenchSettings(
    splits=(0.01, 0.1),
    train_phases=((20, 2e-3),),
    baseline_max_steps=4,
    baseline_check_every=2,
    relapse_groups=1,
    group_shared_steps=1,
    group_local_steps=1,
    build_steps=50,
)
CANARY_BITS = math.log2(10**6)  # a 6-digit PIN: exposure is at most this


@pytest.mark.slow
def test_the_bench_writes_every_cell_in_range(tmp_path: Path) -> None:
    path = tmp_path / "unlearning.json"
    returned = run_unlearning_bench(path, device="cpu", settings=TINY)

    report = json.loads(path.read_text())
    assert report == returned
    assert set(report["splits"]) == {"1", "10"}
    people = report["personal_device"]["people"]
    for key, split in report["splits"].items():
        assert len(split["forget_subjects"]) == max(1, round(int(key) / 100 * people))
        for method in METHODS:
            cell = split[method]
            assert set(HEADLINE) <= set(cell)
            assert cell["seconds"] >= 0
            for name in ("forget_exact_match", "relapse_exact_match"):
                assert 0 <= cell[name] <= 1
            assert cell["forget_prob_ratio"] > 0
            assert -100 <= cell["retain_exact_match_drop"] <= 100
            assert 0 <= cell["canary_exposure"] <= CANARY_BITS + 1e-6
            rate = cell["paraphrase_forget_rate"]
            # Null only when the model answered none of the probes before: nothing to forget.
            assert (rate is None) == (split["probes_known_before"] == 0)
            assert rate is None or 0 <= rate <= 1
        assert split["retrain"]["forget_prob_ratio"] == 1.0
