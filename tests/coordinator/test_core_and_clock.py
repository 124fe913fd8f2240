"""The coordinator core on a virtual clock: bad updates never applied, journal per event,
a restart that resumes, and runs that depend on the seed only."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from coordinator.aggregation import UpdateLimits
from coordinator.core import Coordinator, EventRecord, SavedState
from coordinator.fedcompass import FedCompass
from coordinator.run_config import RunConfig
from coordinator.simulation.clock import draw_speeds
from coordinator.simulation.fleet import FleetSpec, parse_partition, run_in_process
from coordinator.simulation.task import B_KEY, Task

MODEL = {B_KEY: np.zeros((3, 2), np.float32)}


class MemoryJournal:
    def __init__(self) -> None:
        self.events: list[EventRecord] = []

    def record(self, event: EventRecord) -> None:
        self.events.append(copy.deepcopy(event))


def test_a_bad_update_is_rejected_and_nothing_of_it_applied() -> None:
    journal = MemoryJournal()
    core = Coordinator(FedCompass(), MODEL, journal=journal)
    [work] = core.join(0, 0.0)
    good = {B_KEY: np.ones((3, 2), np.float32)}
    assert core.arrive(0, work.version + 5, good, 10, 50.0) == []  # not the version it was sent
    assert 0 in core.in_flight  # a stray answer: the node's real work is still out
    poisoned = {B_KEY: np.full((3, 2), np.nan, np.float32)}
    assert core.arrive(0, work.version, poisoned, 10, 100.0) == []
    assert core.counters.rejected == 2 and core.version == 0
    assert np.array_equal(core.model[B_KEY], MODEL[B_KEY])
    assert journal.events[-1].rejected[2].endswith("NaN or infinite values")
    # It answered its work badly: that work is over, and the node joins again for new work.
    assert 0 not in core.in_flight and 0 not in core.policy.nodes
    [again] = core.join(0, 101.0)
    [next_work] = core.arrive(0, again.version, good, 10, 150.0)
    assert core.version == 1 and next_work.version == 1
    assert np.allclose(core.model[B_KEY], 0.9)  # alone, alpha 0.9 / N = 1 node
    event = journal.events[-1]
    assert event.accepted is not None and len(event.commits) == 1
    assert event.in_flight[0].version == 1 and event.policy_state["version"] == 1
    assert core.arrive(0, again.version, good, 10, 160.0) == []  # the same update replayed
    assert core.version == 1 and core.counters.rejected == 3


def test_a_node_that_keeps_sending_bad_updates_is_quarantined_for_good() -> None:
    journal = MemoryJournal()
    core = Coordinator(FedCompass(), MODEL, UpdateLimits(max_norm=5.0), journal=journal)
    core.join(1, 0.0)  # an honest node keeps the run going
    huge = {B_KEY: np.full((3, 2), 100.0, np.float32)}
    for attempt in range(3):
        [work] = core.join(0, float(attempt))
        assert core.arrive(0, work.version, huge, 10, attempt + 0.5) == []
        assert "exceeds the bound" in journal.events[-1].rejected[2]
    assert core.quarantined == {0} and journal.events[-1].quarantined == 0
    assert core.join(0, 10.0) == [] and 0 not in core.policy.nodes  # no more work
    core.arrive(0, 0, {B_KEY: np.zeros((3, 2), np.float32)}, 10, 11.0)
    assert journal.events[-1].rejected[2] == "node 0 is quarantined"
    assert core.counters.rejected == 4 and core.version == 0
    restarted = Coordinator(FedCompass(), MODEL)
    last = journal.events[-1]
    restarted.restore(SavedState(MODEL, last.policy_state, last.in_flight, {}, 1, frozenset({0})))
    assert restarted.join(0, 20.0) == []  # still quarantined after a restart


def test_a_restarted_core_resumes_from_its_journal_and_reissues_lost_work() -> None:
    journal = MemoryJournal()
    core = Coordinator(FedCompass(), MODEL, journal=journal)
    for node in (0, 1):
        core.join(node, 0.0)
    update = {B_KEY: np.ones((3, 2), np.float32)}
    core.arrive(0, 0, update, 10, 100.0)  # first return: applied alone
    last = journal.events[-1]
    saved = SavedState(
        model=last.commits[-1][1],
        policy_state=last.policy_state,
        in_flight=last.in_flight,
        pending={},
        next_update_id=last.next_update_id,
    )
    resumed = Coordinator(FedCompass(), MODEL)
    resumed.restore(saved)
    assert resumed.version == 1 and np.array_equal(resumed.model[B_KEY], core.model[B_KEY])
    work = resumed.reissue(200.0)
    assert sorted(w.node for w in work) == [0, 1]
    assert all(w.version == 1 for w in work)


def test_speed_distributions() -> None:
    assert draw_speeds("homogeneous", 4, 1) == [1.0] * 4
    normal = draw_speeds("normal", 1000, 1)
    assert 0.9 < np.mean(normal) < 1.1 and 0.25 < np.std(normal) < 0.35
    exponential = draw_speeds("exponential", 1000, 1)
    assert 0.9 < np.mean(exponential) < 1.1 and min(exponential) >= 0.05
    assert draw_speeds("exponential", 5, 1) == exponential[:5]
    with pytest.raises(ValueError):
        draw_speeds("uniform", 3, 1)


def test_partition_spec() -> None:
    assert parse_partition("dirichlet:0.5") == 0.5 and parse_partition("iid") == 0.0
    for bad in ("dirichlet:", "dirichlet:-1", "class:2"):
        with pytest.raises(ValueError):
            parse_partition(bad)


def test_task_clients_are_non_iid_and_learning_helps() -> None:
    task = Task.create(1)
    _, y0 = task.client_data(0, 10, 0.5)
    _, y1 = task.client_data(1, 10, 0.5)
    assert not np.array_equal(np.bincount(y0, minlength=10), np.bincount(y1, minlength=10))
    x, y = task.client_data(0, 10, 0.0)
    delta = task.train(task.initial_model(), x, y, 100, seed=0)
    assert task.accuracy(delta) > task.accuracy(task.initial_model()) + 0.3


SPEC = FleetSpec(clients=6, speeds="exponential", budget=1500.0, seed=3)


def test_a_virtual_run_depends_on_the_seed_only() -> None:
    first = run_in_process(RunConfig(), SPEC)
    again = run_in_process(RunConfig(), SPEC)
    other = run_in_process(RunConfig(), FleetSpec(**{**SPEC.__dict__, "seed": 4}))
    assert first.curve == again.curve and first.dispatch_steps == again.dispatch_steps
    assert first.curve != other.curve
    assert first.curve.accuracies[-1] > first.curve.accuracies[0] + 0.3


def test_fedcompass_gives_slow_clients_fewer_steps_and_forms_groups() -> None:
    result = run_in_process(RunConfig(), SPEC)
    speeds = SPEC.speed_list()
    later = {n: steps[1:] for n, steps in result.dispatch_steps.items()}  # after the first
    assert all(20 <= q <= 100 for steps in later.values() for q in steps)
    fastest, slowest = int(np.argmin(speeds)), int(np.argmax(speeds))
    assert np.mean(later[fastest]) > np.mean(later[slowest])
    assert max(result.groups_per_aggregation) >= 2  # clients arrive together
    # FedAvg on the same fleet: everyone waits for the slowest, so far fewer updates.
    fedavg = run_in_process(RunConfig(policy="fedavg"), SPEC)
    assert fedavg.updates < result.updates
