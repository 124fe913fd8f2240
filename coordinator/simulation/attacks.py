"""Poisoned clients for the simulated fleet: what robust aggregation is measured against.

The update checks (`coordinator.aggregation.check_update`) stop malformed
updates and any update whose global L2 norm exceeds the run's `max_norm`. A
poisoned client that knows that bound can stay just inside it, and that is the
worst case this module simulates: its update is well formed, finite, of the
right shape and dtype, with a norm of `norm_fraction x max_norm` (0.9 by
default), so validation accepts it and only the aggregation rule
(`RobustRule`) stands between it and the model. A `norm_fraction` above 1
simulates a careless attacker instead: validation rejects every update and
the core quarantines the node.

Attacks (pure numpy, a function of the work's training seed):
- "sign-flip": the client trains honestly, then sends its delta negated and
  rescaled to the attack norm, i.e. it pushes the model away from what its
  data would teach, as hard as the bound allows.
- "noise": isotropic Gaussian noise rescaled to the same norm; the untargeted
  baseline (it does not know which way is harmful).

Which clients are poisoned is fixed by the fleet's seed (`poisoned_nodes`),
so every aggregation rule of a seed faces the same attackers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from coordinator.aggregation import update_norm
from coordinator.core import Coordinator, Work
from coordinator.run_config import RunConfig
from coordinator.simulation.clock import InProcessTransport, VirtualResult, run_virtual
from coordinator.simulation.fleet import ClientTrainer, FleetSpec
from coordinator.simulation.task import Task
from shared.fl_messages import TrainReply

AttackKind = Literal["sign-flip", "noise"]
ATTACKS: tuple[str, ...] = get_args(AttackKind)
Trainer = Callable[[Work, int], TrainReply]


@dataclass(frozen=True)
class Attack:
    """`fraction` of the clients send `kind` updates of norm `norm_fraction x max_norm`."""

    kind: AttackKind = "sign-flip"
    fraction: float = 0.1
    norm_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose one of {ATTACKS}")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if not self.norm_fraction > 0:
            raise ValueError(f"norm_fraction must be positive, got {self.norm_fraction}")


def poisoned_nodes(clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The first round(fraction x clients) nodes of a permutation drawn from the seed.

    A permutation (rather than nodes 0..k-1) because client speeds and data are
    drawn per node: which nodes are poisoned must not line up with, say, the
    fastest ones by construction. It is nested: a larger fraction poisons a
    superset, so rising damage is not an artefact of a different choice.
    """
    order = np.random.default_rng([seed, 7]).permutation(clients)
    return frozenset(int(node) for node in order[: round(fraction * clients)])


def rescaled(delta: Mapping[str, np.ndarray], norm: float) -> dict[str, np.ndarray]:
    """`delta` scaled to global L2 norm `norm` (float32, as the checks require)."""
    current = update_norm(delta)
    scale = norm / current if current > 0 else 0.0
    return {k: (v.astype(np.float64) * scale).astype(np.float32) for k, v in delta.items()}


def poison(
    kind: AttackKind, honest: Mapping[str, np.ndarray], norm: float, seed: int
) -> dict[str, np.ndarray]:
    """The update a poisoned client sends instead of `honest`, with global norm `norm`."""
    if kind == "sign-flip":
        return rescaled({k: -v for k, v in honest.items()}, norm)
    rng = np.random.default_rng([seed, 8])
    return rescaled({k: rng.standard_normal(v.shape) for k, v in honest.items()}, norm)


class PoisonedTrainer:
    """A trainer (same call as `ClientTrainer`: (work, seed) -> TrainReply) whose `poisoned`
    nodes replace their delta by `poison(kind, ...)` of norm `norm`; the others are honest.

    Poisoned nodes still train first (the sign flip needs the honest delta) and
    report their true sample count: the attack is on the update's direction and
    size only, not on its weight.
    """

    def __init__(
        self, honest: Trainer, poisoned: Collection[int], kind: AttackKind, norm: float
    ) -> None:
        self.honest = honest
        self.poisoned = frozenset(poisoned)
        self.kind: AttackKind = kind
        self.norm = norm

    def __call__(self, work: Work, seed: int) -> TrainReply:
        reply = self.honest(work, seed)
        if work.node not in self.poisoned:
            return reply
        return dataclasses.replace(reply, delta=poison(self.kind, reply.delta, self.norm, seed))


class RejoiningCoordinator(Coordinator):
    """The core as the real runner drives it: a node whose update was rejected leaves the
    policy (`Coordinator._strike`) and, unless quarantined, joins again for new work.

    `run_virtual` has no such step (it never re-joins a node), so without this a
    rejected attacker would drop out after one strike and quarantine could never
    be observed. `coordinator.runner` re-joins after `rejoin_after_s` of wall
    time; here it is at once, in virtual time.
    """

    def arrive(
        self,
        node: int,
        version: int,
        delta: Mapping[str, np.ndarray],
        samples: int,
        now: float,
    ) -> list[Work]:
        work = super().arrive(node, version, delta, samples, now)
        if node not in self.policy.nodes and node not in self.quarantined:
            work += self.join(node, now)
        return work


def make_rejoining_coordinator(
    run: RunConfig, model: Mapping[str, np.ndarray]
) -> RejoiningCoordinator:
    """What `run.make_coordinator(model)` builds (policy, checks, rule), re-joining nodes."""
    return RejoiningCoordinator(
        run.make_policy(), model, run.update_limits(), rule=run.robust_rule()
    )


@dataclass(frozen=True)
class AttackedRun:
    """A run's result with what the attack did: who was poisoned, who was quarantined."""

    result: VirtualResult
    poisoned: frozenset[int]
    quarantined: frozenset[int]
    attack_norm: float
    honest_norms: tuple[float, ...]  # norms of every delta trained, before any poisoning


def run_attacked(run: RunConfig, spec: FleetSpec, attack: Attack | None) -> AttackedRun:
    """`fleet.run_in_process` with `attack`'s clients poisoned (None: a clean run)."""
    task = Task.create(spec.seed)
    honest = ClientTrainer(task, spec.clients, spec.dirichlet_alpha)
    norms: list[float] = []

    def recording(work: Work, seed: int) -> TrainReply:
        reply = honest(work, seed)
        norms.append(update_norm(reply.delta))
        return reply

    poisoned: frozenset[int] = frozenset()
    norm = 0.0
    trainer: Trainer = recording
    if attack is not None:
        poisoned = poisoned_nodes(spec.clients, attack.fraction, spec.seed)
        norm = attack.norm_fraction * run.max_norm
        trainer = PoisonedTrainer(recording, poisoned, attack.kind, norm)
    core = make_rejoining_coordinator(run, task.initial_model())
    transport = InProcessTransport(trainer)
    result = run_virtual(core, transport, spec.speed_list(), task.accuracy, spec.clock())
    return AttackedRun(result, poisoned, frozenset(core.quarantined), norm, tuple(norms))
