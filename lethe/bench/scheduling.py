"""`lethe bench scheduling`: FedAvg, FedAsync, FedBuff and FedCompass on the same fleets.

Setting. The simulated workload (`coordinator.simulation.task`: a LoRA
classifier, B trained on a fleet-wide A, 10 classes) with 10 clients whose
data are a Dirichlet(0.5) split of the classes, on the virtual clock
(`coordinator.simulation.clock`): speeds drawn per client from a
homogeneous, a normal (sigma = 0.3 mu) or an exponential distribution
(mean 1 virtual second per local step), each piece of work jittered by 5%.
Every policy runs through the same core, aggregator and clock; only the
policy differs. Results depend on the seed, not on this machine.

Target and budget. The target accuracy is 0.95 times the accuracy that
centralised training reaches on the union of the clients' data (plain SGD,
the task's learning rate and batch, 3,000 steps), averaged over the reported
seeds; it is computed in the run, before any policy runs. The budget is
3,000 virtual seconds: about 30 pieces of work of the mean client at 100
steps.

Fairness. Each policy gets the same small tuning budget: four settings
(its server step and, where it has one, the local step count or buffer
size), chosen on seeds 101 and 102 (never reported) by the mean over the
three speed distributions of time to target (a run that misses counts as
twice the budget). FedCompass's four settings are the paper's weights (alpha
S(tau) / N) and Lethe's two changes: normalising over the updates being
aggregated and `time_weighting` (see `coordinator.fedcompass`), and a
shorter step range (Q in [5, 25] instead of [20, 100]): FedAvg and FedAsync
may choose their local steps, so FedCompass may too. (A first run gave
FedCompass no step option; on the tuning seeds its best then was
updates-normalised weights, and on the reported seeds it took 995 virtual s
to the target under homogeneous speeds against FedAvg's 375, because 100
local steps on non-IID data drift where FedAvg's tuned 20 do not.) The
published FedCompass (reference defaults) is reported beside the tuned one
as `fedcompass-paper`. Reported: seeds 1 to 5, every cell, including the
ones where Lethe loses; `time_to_target` is the mean over the seeds that
reached the target and `reached` says how many did.

Overhead. `overhead_ms_per_update` is the median over the reported runs of
the coordinator's own time (policy and aggregation, timed inside the core)
per accepted update; the same with the SQLite journal (one transaction and
fsync per event, in this machine's temp directory) is reported beside it.
`clients_1000_wall_s` is the wall time of a 1,000-client FedCompass run
through Flower's simulation runtime (`lethe simulate --clients 1000`, 300
virtual seconds); the in-process run of the same fleet is reported beside it.

Results (docs/benchmarks/scheduling.json, one run of 953 s; target 0.816,
virtual seconds to target, mean over the seeds that reached it / how many
of 5 did, and accuracy at the 3,000 s budget):
| speeds      | fedavg      | fedasync    | fedbuff     | fedcompass  | fedcompass-paper |
| homogeneous | 375 5/5 .860 | 209 5/5 .861 | 270 5/5 .861 | 596 5/5 .857 | 681 4/5 .852 |
| normal      | 578 5/5 .857 | 280 5/5 .857 | 328 5/5 .853 | 567 5/5 .852 | 1002 5/5 .851 |
| exponential | 552 4/5 .849 | 264 4/5 .828 | 306 4/5 .827 | 1332 3/5 .809 | 984 4/5 .821 |
Chosen on the tuning seeds: FedAvg 50 steps at server rate 2; FedAsync 20
steps, alpha 0.6; FedBuff K 3, rate 1; FedCompass Q in [5, 25] with
updates-normalised weights. No goal is met: FedCompass is not within 0.6x
of FedAvg's time under exponential speeds (2.4x), nor sooner than FedAsync
or FedBuff, nor within a point of the best accuracy (4 points below
FedAvg), and under homogeneous speeds it is slower than FedAvg (596 against
375). Why, from a diagnostic run (seed 1, exponential): speeds span 0.05 to
1.7 s per step, 34x, and Q in [5, 25] (or [20, 100]) can equalise only 5x,
so the three fastest clients form their own groups and aggregate about
2,000 times each while the slowest return 160 to 200 times; on non-IID data
the model follows the fast clients' classes and plateaus (0.81 to 0.82 at
3,000 s against FedAvg's 0.86). `time_weighting` lifts the plateau (0.83 at
3,000 s in that run) but slows the start, so tuning by time to target did
not choose it. The target is reached by FedAvg in about three rounds, so
the race is decided early, where the asynchronous methods' many small
steps win. Coordinator overhead: 0.055 ms per update for policy and
aggregation; 6.2 ms with the SQLite journal (an fsync of the update file
and one of the transaction per event), above the 5 ms goal. 1,000 clients:
60,393 updates in 681 s through Flower's simulation runtime, 60 s in
process, with identical curves (measured after a fix: the first run sent
the Flower side the default FedCompass settings).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.run_config import RunConfig, toml_assignments
from coordinator.simulation.clock import SPEED_DISTRIBUTIONS, InProcessTransport, run_virtual
from coordinator.simulation.fleet import ClientTrainer, FleetSpec, run_in_process
from coordinator.simulation.task import Task
from coordinator.state import StateStore
from lethe.bench.report import machine_facts, write_report

CLIENTS = 10
ALPHA = 0.5
BUDGET = 3000.0
REPORT_SEEDS = (1, 2, 3, 4, 5)
TUNING_SEEDS = (101, 102)
TARGET_FRACTION = 0.95
CENTRAL_STEPS = 3000

CANDIDATES: dict[str, list[RunConfig]] = {
    "fedavg": [
        RunConfig(policy="fedavg", local_steps=20),
        RunConfig(policy="fedavg", local_steps=50),
        RunConfig(policy="fedavg", local_steps=100),
        RunConfig(policy="fedavg", local_steps=50, fedavg_rate=2.0),
    ],
    "fedasync": [
        RunConfig(policy="fedasync", fedasync_alpha=0.3),
        RunConfig(policy="fedasync", fedasync_alpha=0.6),
        RunConfig(policy="fedasync", fedasync_alpha=0.9),
        RunConfig(policy="fedasync", fedasync_alpha=0.6, local_steps=20),
    ],
    "fedbuff": [
        RunConfig(policy="fedbuff", buffer_size=3, fedbuff_rate=1.0),
        RunConfig(policy="fedbuff", buffer_size=3, fedbuff_rate=2.0),
        RunConfig(policy="fedbuff", buffer_size=5, fedbuff_rate=1.0),
        RunConfig(policy="fedbuff", buffer_size=5, fedbuff_rate=2.0),
    ],
    "fedcompass": [
        RunConfig(policy="fedcompass"),
        RunConfig(policy="fedcompass", normalise="updates"),
        RunConfig(policy="fedcompass", normalise="updates", q_min=5, q_max=25),
        RunConfig(policy="fedcompass", normalise="updates", time_weighting=True, q_min=5, q_max=25),
    ],
}
PAPER = RunConfig(policy="fedcompass")


def centralised_accuracy(seed: int) -> float:
    """What one model trained on every client's data reaches: the target's reference."""
    task = Task.create(seed)
    data = [task.client_data(c, CLIENTS, ALPHA) for c in range(CLIENTS)]
    x = np.concatenate([d[0] for d in data])
    y = np.concatenate([d[1] for d in data])
    delta = task.train(task.initial_model(), x, y, CENTRAL_STEPS, seed)
    return task.accuracy(delta)


def _cell(config: RunConfig, speeds: str, seeds: Sequence[int], target: float) -> dict[str, Any]:
    times, accuracies, updates, overheads = [], [], [], []
    for seed in seeds:
        result = run_in_process(config, FleetSpec(CLIENTS, speeds, ALPHA, seed, BUDGET))
        times.append(result.curve.time_to(target))
        accuracies.append(result.curve.at(BUDGET))
        updates.append(result.updates)
        overheads.append(result.overhead_ms_per_update)
    reached = [t for t in times if t is not None]
    return {
        "time_to_target": round(statistics.mean(reached), 1) if reached else None,
        "reached": len(reached),
        "acc_at_budget": round(statistics.mean(accuracies), 4),
        "updates": round(statistics.mean(updates), 1),
        "per_seed": {
            "time_to_target": [None if t is None else round(t, 1) for t in times],
            "acc_at_budget": accuracies,
        },
        "_overheads": overheads,
    }


def _tune(
    name: str, target: float, log: Callable[[str], None]
) -> tuple[RunConfig, list[dict[str, Any]]]:
    """The candidate with the lowest mean time to target over tuning seeds and speeds."""
    scored = []
    for config in CANDIDATES[name]:
        penalties = []
        for speeds in SPEED_DISTRIBUTIONS:
            cell = _cell(config, speeds, TUNING_SEEDS, target)
            penalties += [
                2 * BUDGET if t is None else t for t in cell["per_seed"]["time_to_target"]
            ]
        score = statistics.mean(penalties)
        scored.append(
            {"settings": changed_settings(config), "mean_time_to_target": round(score, 1)}
        )
        log(f"tuning {name} {changed_settings(config)}: {score:.0f}")
    best = min(range(len(scored)), key=lambda i: scored[i]["mean_time_to_target"])
    return CANDIDATES[name][best], scored


def changed_settings(config: RunConfig) -> dict[str, Any]:
    """The fields that differ from the defaults: what a candidate (or a policy's setting) is."""
    default = RunConfig(policy=config.policy)
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name) or f.name == "policy"
    }


def _journal_overhead(config: RunConfig) -> float:
    """ms per update of the core with the SQLite journal attached (exponential, seed 1)."""
    spec = FleetSpec(CLIENTS, "exponential", ALPHA, REPORT_SEEDS[0], BUDGET)
    task = Task.create(spec.seed)
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(f"sqlite:///{directory}/state.db", Path(directory), "bench")
        store.start(config.policy, dataclasses.asdict(config), task.initial_model())
        core = config.make_coordinator(task.initial_model(), journal=store)
        trainer = InProcessTransport(ClientTrainer(task, spec.clients, spec.dirichlet_alpha))
        result = run_virtual(core, trainer, spec.speed_list(), task.accuracy, spec.clock())
        store.close()
    return result.overhead_ms_per_update


def _thousand_clients(config: RunConfig) -> dict[str, float]:
    from coordinator.simulation.flower_run import SimulationRequest, simulate_with_flower

    spec = FleetSpec(1000, "exponential", ALPHA, REPORT_SEEDS[0], 300.0)
    started = time.perf_counter()
    in_process = run_in_process(config, spec)
    in_process_s = time.perf_counter() - started
    settings = {
        k.replace("_", "-"): v for k, v in changed_settings(config).items() if k != "policy"
    }
    request = SimulationRequest.create(
        config.policy,
        1000,
        "exponential",
        f"dirichlet:{ALPHA}",
        spec.seed,
        spec.budget,
        [assignment for assignment in toml_assignments(settings).split(" ") if assignment],
    )
    started = time.perf_counter()
    flower = simulate_with_flower(request)
    return {
        "flower_wall_s": round(time.perf_counter() - started, 1),
        "flower_updates": flower["updates"],
        "in_process_wall_s": round(in_process_s, 1),
        "in_process_updates": in_process.updates,
        "same_result": flower["accuracies"] == in_process.curve.accuracies,
    }


def run_scheduling_bench(
    json_path: Path, log: Callable[[str], None] = lambda _: None, thousand: bool = True
) -> dict[str, Any]:
    load_before = os.getloadavg()
    started = time.perf_counter()
    central = [centralised_accuracy(seed) for seed in REPORT_SEEDS]
    target = round(TARGET_FRACTION * statistics.mean(central), 3)
    log(f"target accuracy {target} (centralised {central})")
    chosen: dict[str, RunConfig] = {}
    tuning: dict[str, Any] = {}
    for name in CANDIDATES:
        chosen[name], tuning[name] = _tune(name, target, log)
    reported = {**chosen, "fedcompass-paper": PAPER}
    runs: dict[str, dict[str, Any]] = {}
    overheads: list[float] = []
    for speeds in SPEED_DISTRIBUTIONS:
        runs[speeds] = {}
        for name, config in reported.items():
            cell = _cell(config, speeds, REPORT_SEEDS, target)
            overheads += cell.pop("_overheads")
            runs[speeds][name] = cell
            log(
                f"{speeds} {name}: {cell['time_to_target']} ({cell['reached']}/5), "
                f"acc {cell['acc_at_budget']}"
            )
    report: dict[str, Any] = {
        "target_acc": target,
        "runs": runs,
        "overhead_ms_per_update": round(statistics.median(overheads), 4),
        "overhead_ms_per_update_with_sqlite_journal": round(
            _journal_overhead(chosen["fedcompass"]), 3
        ),
        "chosen": {name: changed_settings(config) for name, config in reported.items()},
        "tuning": tuning,
        "centralised_accuracy": central,
        "setting": {
            "clients": CLIENTS,
            "dirichlet_alpha": ALPHA,
            "budget_virtual_s": BUDGET,
            "report_seeds": list(REPORT_SEEDS),
            "tuning_seeds": list(TUNING_SEEDS),
            "target": f"{TARGET_FRACTION} x mean centralised accuracy",
        },
    }
    if thousand:
        detail = _thousand_clients(chosen["fedcompass"])
        report["clients_1000_wall_s"] = detail["flower_wall_s"]
        report["clients_1000"] = detail
    report["bench_s"] = round(time.perf_counter() - started, 1)
    report.update(machine_facts("cpu", load_before))
    return write_report(json_path, report)
