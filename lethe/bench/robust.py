"""`lethe bench robust`: the robust aggregation rule against poisoned clients, in simulation.

Setting. The simulated workload of `lethe bench scheduling` (a LoRA
classifier, B trained on a fleet-wide A, 10 classes) with 20 clients, a
Dirichlet(0.5) split of the classes and exponential speeds (mean 1 virtual
second per step), on the virtual clock: results depend on the seeds, not on
this machine. Two policies with the settings `lethe bench scheduling` tuned:
FedAvg (50 local steps, server rate 2; every aggregation has all 20 updates)
and FedCompass (Q in [5, 25], weights normalised over the group; groups are
small). Budget 1,000 virtual seconds (about 7 FedAvg rounds; clean, on seed
1, FedAvg has .845 there against .859 at 3,000 s, FedCompass .822 at both).
Reported seeds 1 to 3.

Attacks (`coordinator.simulation.attacks`). A seeded choice of 10% or 30% of
the clients is poisoned. "sign-flip": each trains honestly and sends its
delta negated and scaled to 0.9 x max_norm (45 with the default bound of
50), so every poisoned update passes validation: the worst case the bound
cannot catch, because the attacker knows it. "noise": Gaussian noise of the
same norm. One more cell per policy has the sign flip at 10 x max_norm: a
careless attacker, to show what validation does catch. A node whose update is
rejected joins again at once, as the real runner lets it
(`RejoiningCoordinator`), so the quarantine after 3 rejections in a row
can happen.

Rules (`RobustRule`). "mean": the plain weighted sum. "clip": each update
clipped to a norm chosen without looking at any attack: 2 x the median norm
of the honest updates of a clean run of the same policy on seed 101 (never
reported); 2.37 for FedAvg, 0.33 for FedCompass (20% and 4% of those honest
updates exceed it: the first rounds' updates are the largest). "trimmed":
coordinate-wise trimmed mean, 30% from each end (at least the poisoned
share); "trimmed-0.1": 10% (FedAvg only: it drops nothing from groups of
fewer than 10 updates, and 91 to 93% of FedCompass's groups are smaller).
"clip+trimmed": both.

Measured. `acc_final`: test accuracy of the newest version committed by the
budget (mean and per seed); `drop_vs_clean`: the same policy's clean run
with the plain mean minus this, per seed, then averaged (positive: worse);
`rejected` and `quarantined` per run (the core's counter and quarantined
set), `quarantined_honest` (honest nodes quarantined, all seeds);
`poisoned_work_share_per_seed` (the poisoned nodes' share of the pieces of
work sent); `trimmed_share` (aggregations in which trimming dropped
anything). Grid reduced to keep the wall time near 10 minutes: FedCompass
runs cost about 7 CPU s each (4,400 updates), so FedCompass has noise only at
30% and no trimmed-0.1.

Results (docs/benchmarks/robust.json; 475 s wall on 2 workers, 407 CPU s,
while other jobs kept the load at 2 to 5 on 2 CPUs; an earlier run with other
worker settings gave identical figures). Accuracy at the budget, mean of 3
seeds, and in brackets the drop versus the clean mean, in points:
FedAvg
| attack        | mean        | clip        | trimmed     | clip+trimmed | trimmed-0.1 |
| none          | .832        | .832 (0.0)  | .808 (2.4)  | .807 (2.4)   | .823 (0.9)  |
| sign-flip 10% | .306 (52.5) | .782 (5.0)  | .778 (5.3)  | .773 (5.9)   | .802 (2.9)  |
| sign-flip 30% | .059 (77.3) | .562 (27.0) | .617 (21.5) | .598 (23.4)  | .092 (73.9) |
| noise 10%     | .481 (35.1) | .818 (1.3)  | .802 (3.0)  | .797 (3.4)   | .820 (1.2)  |
| noise 30%     | .278 (55.4) | .790 (4.1)  | .791 (4.0)  | .758 (7.4)   | .477 (35.4) |
FedCompass
| attack        | mean        | clip        | trimmed     | clip+trimmed |
| none          | .814        | .806 (0.8)  | .806 (0.9)  | .801 (1.3)   |
| sign-flip 10% | .640 (17.4) | .801 (1.4)  | .742 (7.2)  | .794 (2.0)   |
| sign-flip 30% | .168 (64.7) | .631 (18.4) | .491 (32.4) | .630 (18.4)  |
| noise 30%     | .481 (33.4) | .749 (6.6)  | .591 (22.4) | .746 (6.8)   |
Inside the bound, every cell has 0 rejected updates and 0 quarantined
nodes. Over the bound (sign-flip 30%, norm 500, plain mean): 18 rejected
updates and 6 of 6 attackers quarantined in every seed, no honest node, and
accuracy within a point of clean (FedAvg .822, FedCompass .815).

What it means.
- Validation stops the careless attacker completely and the careful one not
  at all: with the plain mean, 10% of clients sending sign-flipped updates
  inside the bound cost FedAvg 52 points, and 30% drive it below chance (it
  learns the opposite). The default bound (50) is 40x FedAvg's median honest
  norm and 300x FedCompass's; a tighter bound would shrink what fits under
  it, at the price of rejecting (and quarantining) honest outliers.
- Clipping is the rule that pays: nearly free without an attack (0 and 0.8
  points), and against 10% poisoned it keeps the loss to 1.4 (FedCompass)
  and 5.0 (FedAvg) points under sign flip, 1.3 under noise. It needs a clip
  norm from measured honest updates; the default (off) protects nothing.
- Trimmed mean is weaker here than its reputation. Without an attack it costs
  FedAvg 2.4 points: on non-IID data a coordinate's extreme values often come
  from the few clients holding a class, and trimming drops their signal.
  Trimming less than the poisoned share is worthless (trimmed-0.1: the best
  rule at 10%, 73.9 points lost at 30%), so it needs the share in advance.
  Trimming 30% against 30% drops every attacker per coordinate and still
  loses 21.5 points: the attackers sit at the ends opposite the honest
  direction, so which honest values survive the trim is biased against it.
  Clip+trimmed never beat the better of its two parts.
- Small groups defeat trimming: FedCompass's groups average 4.9 updates
  and 30% trimming dropped anything (a group of 4 or more) in 53% of
  aggregations (70%, 17% and 71% on seeds 1 to 3), mostly one or two
  values per end; trimmed alone loses 32.4 points at 30% sign flip where
  clipping loses 18.4, and 22.4 against noise where clipping loses 6.6.
- For an asynchronous policy the poisoned share of clients is not the share
  of updates: FedCompass gives fast clients more work, and at 30% the
  attackers got 14%, 50% and 26% of the pieces of work on seeds 1 to 3. On
  seed 2 every rule fails (.100 to .291 under sign flip; clipping keeps
  seeds 1 and 3 at .805 and .798).
- No rule holds against 30% careful attackers: the best keeps FedAvg at .617
  and FedCompass at .631, against .832 and .814 clean. The rules bound the
  damage; only identifying and removing the attackers (validation, the
  operator) restores the model, and that needs an attack validation can see.
Not simulated: attackers that inflate their sample count (FedAvg's weights),
that adapt to the rule (e.g. stay inside the honest range per coordinate), or
that collude over time; one workload, three seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.run_config import RunConfig
from coordinator.simulation.attacks import Attack, AttackKind, run_attacked
from coordinator.simulation.fleet import FleetSpec
from lethe.bench.report import machine_facts, write_report
from lethe.bench.scheduling import changed_settings

# The tuned settings of `lethe bench scheduling` (chosen there on seeds 101 and 102).
POLICIES: dict[str, RunConfig] = {
    "fedavg": RunConfig(policy="fedavg", local_steps=50, fedavg_rate=2.0),
    "fedcompass": RunConfig(policy="fedcompass", normalise="updates", q_min=5, q_max=25),
}
# rule name -> (clip on?, trim_fraction); the clip norm comes from the calibration run.
RULES: dict[str, tuple[bool, float]] = {
    "mean": (False, 0.0),
    "clip": (True, 0.0),
    "trimmed": (False, 0.3),
    "clip+trimmed": (True, 0.3),
    "trimmed-0.1": (False, 0.1),
}
CLIP_FACTOR = 2.0  # clip_norm = CLIP_FACTOR x median honest update norm (calibration run)
ATTACK_NORM = 0.9  # poisoned updates' norm, as a share of max_norm: inside the bound
OVER_BOUND_NORM = 10.0  # the careless attacker's norm, as a multiple of max_norm
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class BenchSettings:
    """The grid. Per policy: which rules, and which (attack, poisoned fraction) pairs besides
    the clean run of every rule; one more cell per policy has the attack over the bound."""

    clients: int = 20
    dirichlet_alpha: float = 0.5
    speeds: str = "exponential"
    budget: float = 1000.0  # virtual seconds
    seeds: tuple[int, ...] = (1, 2, 3)
    calibration_seed: int = 101  # never reported
    rules: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "fedavg": ("mean", "clip", "trimmed", "clip+trimmed", "trimmed-0.1"),
            "fedcompass": ("mean", "clip", "trimmed", "clip+trimmed"),
        }
    )
    attacks: Mapping[str, tuple[tuple[AttackKind, float], ...]] = field(
        default_factory=lambda: {
            "fedavg": (("sign-flip", 0.1), ("sign-flip", 0.3), ("noise", 0.1), ("noise", 0.3)),
            "fedcompass": (("sign-flip", 0.1), ("sign-flip", 0.3), ("noise", 0.3)),
        }
    )
    over_bound: bool = True

    def spec(self, seed: int) -> FleetSpec:
        return FleetSpec(self.clients, self.speeds, self.dirichlet_alpha, seed, self.budget)


@dataclass(frozen=True)
class CellSpec:
    """One cell of the table: a policy, an attack (None: clean) and a rule."""

    policy: str
    attack: Attack | None
    rule: str

    @property
    def attack_name(self) -> str:
        return "none" if self.attack is None else self.attack.kind

    @property
    def fraction(self) -> float:
        return 0.0 if self.attack is None else self.attack.fraction


@dataclass(frozen=True)
class Job:
    """One run of one cell on one seed: what a worker process needs, and nothing else."""

    cell: CellSpec
    config: RunConfig
    spec: FleetSpec


def cells(settings: BenchSettings) -> list[CellSpec]:
    """Every cell of the grid, in report order."""
    out: list[CellSpec] = []
    for policy, rules in settings.rules.items():
        out += [CellSpec(policy, None, rule) for rule in rules]
        pairs = settings.attacks.get(policy, ())
        for kind, fraction in pairs:
            out += [CellSpec(policy, Attack(kind, fraction, ATTACK_NORM), rule) for rule in rules]
        if settings.over_bound and pairs:
            fraction = max(f for _, f in pairs)
            out.append(CellSpec(policy, Attack("sign-flip", fraction, OVER_BOUND_NORM), "mean"))
    return out


def rule_config(policy: str, rule: str, clip_norm: float) -> RunConfig:
    """The policy's tuned run config with the rule's clipping (at the calibrated norm) and
    trimming; everything else, the norm bound included, stays the same in every cell."""
    clip, trim = RULES[rule]
    return dataclasses.replace(
        POLICIES[policy], clip_norm=clip_norm if clip else 0.0, trim_fraction=trim
    )


@contextmanager
def quiet_core() -> Iterator[None]:
    """Rejections and quarantines are counted in the report; their per-update warnings (tens
    per over-the-bound run) would bury the bench's own log."""
    logger = logging.getLogger("coordinator.core")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_job(job: Job) -> dict[str, Any]:
    """One run, reduced to what the report keeps (top level: a worker process calls it)."""
    started = time.process_time()
    with quiet_core():
        run = run_attacked(job.config, job.spec, job.cell.attack)
    groups = run.result.groups_per_aggregation or [0]
    sent = run.result.dispatch_steps
    pieces = sum(len(steps) for steps in sent.values())
    trim = job.config.trim_fraction
    return {
        "acc_final": run.result.curve.at(job.spec.budget),
        "rejected": run.result.rejected,
        "quarantined": len(run.quarantined),
        "quarantined_honest": len(run.quarantined - run.poisoned),
        "poisoned": len(run.poisoned),
        "updates": run.result.updates,
        # a policy that favours fast clients hands fast attackers more than their head count
        "poisoned_work_share": sum(len(sent[n]) for n in run.poisoned) / max(pieces, 1),
        "updates_per_aggregation": statistics.mean(groups),
        # aggregations in which trimming dropped anything: int(trim * n) >= 1
        "trimmed_share": statistics.mean(int(trim * n) >= 1 for n in groups),
        "cpu_s": time.process_time() - started,
    }


@contextmanager
def one_blas_thread_in_children() -> Iterator[None]:
    """Spawned workers start with one BLAS thread. The task's matrices are tiny (300 x 32):
    OpenBLAS's second thread only spins, doubling the CPU time of a run for no gain in wall
    time, and with several workers it takes a core from another worker. (Set in the
    environment, because the workers load numpy before any code of ours could run.)"""
    saved = {name: os.environ.get(name) for name in BLAS_THREADS}
    os.environ.update({name: "1" for name in BLAS_THREADS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_jobs(jobs: list[Job], workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every job's result, in the jobs' order. FedCompass runs (thousands of updates each, 10x
    a FedAvg run) are started first, so no worker is left with one of them at the end."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].cell.policy != "fedcompass")
    results: dict[int, dict[str, Any]] = {}

    def progress() -> None:
        if len(results) % max(1, len(jobs) // 10) == 0 or len(results) == len(jobs):
            log(f"{len(results)}/{len(jobs)} runs done")

    if workers <= 1:
        for i in order:
            results[i] = run_job(jobs[i])
            progress()
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
        with (
            one_blas_thread_in_children(),
            ProcessPoolExecutor(workers, mp_context=context) as pool,
        ):
            futures = {pool.submit(run_job, jobs[i]): i for i in order}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress()
    return [results[i] for i in range(len(jobs))]


def calibrate(settings: BenchSettings, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Per policy, the clip norm from a clean run on the calibration seed, without the attack.

    An operator can measure honest update norms (a clean run, or a trusted
    cohort); the attack is not known. The clip is set loose, at CLIP_FACTOR x
    the median, so that honest updates are rarely clipped.
    """
    out: dict[str, dict[str, Any]] = {}
    for policy in settings.rules:
        with quiet_core():
            run = run_attacked(POLICIES[policy], settings.spec(settings.calibration_seed), None)
        median = statistics.median(run.honest_norms)
        clip = CLIP_FACTOR * median
        clipped = sum(n > clip for n in run.honest_norms) / len(run.honest_norms)
        out[policy] = {
            "clip_norm": round(clip, 4),
            "honest_norm_median": round(median, 4),
            "honest_norm_max": round(max(run.honest_norms), 4),
            "honest_updates": len(run.honest_norms),
            "honest_share_above_clip": round(clipped, 4),
        }
        log(f"calibration {policy}: {out[policy]}")
    return out


def summarise(
    cell: CellSpec,
    config: RunConfig,
    runs: list[dict[str, Any]],
    clean: list[float] | None,
) -> dict[str, Any]:
    """The cell's row: means over the seeds, per-seed values, and the drop versus `clean`
    (the same policy's clean run with the plain mean, seed by seed)."""
    accuracies = [r["acc_final"] for r in runs]
    row: dict[str, Any] = {
        "policy": cell.policy,
        "attack": cell.attack_name,
        "poisoned_fraction": cell.fraction,
        "attack_norm": 0.0 if cell.attack is None else cell.attack.norm_fraction * config.max_norm,
        "rule": cell.rule,
        "clip_norm": config.clip_norm,
        "trim_fraction": config.trim_fraction,
        "acc_final_mean": round(statistics.mean(accuracies), 4),
        "acc_final_per_seed": accuracies,
    }
    if clean is not None:
        drops = [round(c - a, 4) for c, a in zip(clean, accuracies, strict=True)]
        row["drop_vs_clean"] = round(statistics.mean(drops), 4)
        row["drop_vs_clean_per_seed"] = drops
    row |= {
        "rejected": statistics.mean(r["rejected"] for r in runs),
        "rejected_per_seed": [r["rejected"] for r in runs],
        "quarantined": statistics.mean(r["quarantined"] for r in runs),
        "quarantined_per_seed": [r["quarantined"] for r in runs],
        "quarantined_honest": sum(r["quarantined_honest"] for r in runs),
        "poisoned_per_seed": [r["poisoned"] for r in runs],
        "poisoned_work_share_per_seed": [round(r["poisoned_work_share"], 4) for r in runs],
        "updates": round(statistics.mean(r["updates"] for r in runs), 1),
        "updates_per_aggregation": round(
            statistics.mean(r["updates_per_aggregation"] for r in runs), 2
        ),
        "trimmed_share": round(statistics.mean(r["trimmed_share"] for r in runs), 4),
        "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),  # all seeds; machine-dependent
    }
    return row


def run_robust_bench(
    json_path: Path,
    log: Callable[[str], None] = lambda _: None,
    settings: BenchSettings = BenchSettings(),
    workers: int = 1,
) -> dict[str, Any]:
    """Calibrate the clip, run every cell on every seed (in `workers` processes: the virtual
    clock makes the result independent of that), and write the report."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    calibration = calibrate(settings, log)
    grid = cells(settings)
    configs = [rule_config(c.policy, c.rule, calibration[c.policy]["clip_norm"]) for c in grid]
    jobs = [
        Job(c, cfg, settings.spec(s))
        for c, cfg in zip(grid, configs, strict=True)
        for s in settings.seeds
    ]
    log(f"{len(grid)} cells x {len(settings.seeds)} seeds = {len(jobs)} runs on {workers} workers")
    results = run_jobs(jobs, workers, log)
    per_cell = [
        results[i : i + len(settings.seeds)] for i in range(0, len(results), len(settings.seeds))
    ]
    clean = {
        c.policy: [r["acc_final"] for r in runs]
        for c, runs in zip(grid, per_cell, strict=True)
        if c.attack is None and c.rule == "mean"
    }
    rows = []
    for cell, config, runs in zip(grid, configs, per_cell, strict=True):
        row = summarise(cell, config, runs, clean.get(cell.policy))
        rows.append(row)
        log(
            f"{cell.policy} {cell.attack_name} {cell.fraction} {cell.rule}: "
            f"acc {row['acc_final_mean']} drop {row.get('drop_vs_clean')} "
            f"rejected {row['rejected']} quarantined {row['quarantined']}"
        )
    report: dict[str, Any] = {
        "setting": _setting(settings, calibration),
        "cells": rows,
        "bench_s": round(time.perf_counter() - started, 1),
        "runs_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "workers": workers,
        "machine": machine_facts("cpu", load_before),
    }
    return write_report(json_path, report)


def _setting(settings: BenchSettings, calibration: dict[str, Any]) -> dict[str, Any]:
    """What the cells were run under, in words where a number alone would not say it."""
    first = POLICIES[next(iter(settings.rules))]
    return {
        "clients": settings.clients,
        "dirichlet_alpha": settings.dirichlet_alpha,
        "speeds": settings.speeds,
        "budget_virtual_s": settings.budget,
        "report_seeds": list(settings.seeds),
        "calibration_seed": settings.calibration_seed,
        "policies": {p: changed_settings(POLICIES[p]) for p in settings.rules},
        "max_norm": first.max_norm,
        "quarantine_after": first.quarantine_after,
        "attack_norm": ATTACK_NORM * first.max_norm,
        "over_bound_attack_norm": OVER_BOUND_NORM * first.max_norm,
        "rules": {
            name: {"clip": clip, "trim_fraction": trim} for name, (clip, trim) in RULES.items()
        },
        "clip_norm": f"{CLIP_FACTOR} x median honest update norm, clean run, calibration seed",
        "calibration": calibration,
        "poisoned_clients": "first round(fraction x clients) of a permutation from the seed",
        "acc_final": "test accuracy of the newest version committed by the budget",
        "drop_vs_clean": "the policy's clean run (no attack, rule mean) minus this, per seed",
    }
