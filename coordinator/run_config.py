"""A run's configuration: which policy with which settings, from Flower's run config or flags.

Flower passes `--run-config "policy='fedbuff' buffer-size=3"` to the ServerApp
as a flat mapping of TOML values; `RunConfig.from_mapping` accepts exactly the
fields below (dashes or underscores), checks their types, and refuses any
unknown key with the list of known ones, so a typo never silently runs the
default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from coordinator.aggregation import RobustRule, UpdateLimits
from coordinator.baselines import (
    FedAsync,
    FedAsyncConfig,
    FedAvg,
    FedAvgConfig,
    FedBuff,
    FedBuffConfig,
)
from coordinator.core import Coordinator, Journal
from coordinator.fedcompass import FedCompass, FedCompassConfig
from coordinator.policy import Policy, Staleness

PolicyName = Literal["fedavg", "fedasync", "fedbuff", "fedcompass"]
POLICIES: tuple[str, ...] = get_args(PolicyName)


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run; defaults are the reference ones (ALGORITHMS.md)."""

    policy: PolicyName = "fedcompass"
    # FedCompass
    q_min: int = 20
    q_max: int = 100
    latest_factor: float = 1.5
    speed_momentum: float = 0.9
    server_rate: float = 0.9
    staleness_a: float = 0.5
    normalise: Literal["clients", "updates"] = "clients"
    time_weighting: bool = False
    # the baselines
    local_steps: int = 50
    fedavg_rate: float = 1.0
    fedasync_alpha: float = 0.9
    buffer_size: int = 3
    fedbuff_rate: float = 1.0
    # the run
    max_versions: int = 0  # 0: no limit
    max_norm: float = 50.0
    quarantine_after: int = 3  # rejected updates in a row; 0: never quarantine
    clip_norm: float = 0.0  # robust aggregation: clip each update's norm (0: off)
    trim_fraction: float = 0.0  # robust aggregation: coordinate-wise trimmed mean (0: off)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.normalise not in ("clients", "updates"):
            raise ValueError(f"normalise must be 'clients' or 'updates', got {self.normalise!r}")
        if self.local_steps < 1 or self.buffer_size < 1 or self.max_versions < 0:
            raise ValueError("local_steps and buffer_size must be >= 1, max_versions >= 0")
        self.make_policy()  # each policy checks its own settings
        self.update_limits()
        self.robust_rule()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in fields:
                known = ", ".join(sorted(k.replace("_", "-") for k in fields))
                raise ValueError(f"unknown run config key {raw_key!r}; known keys: {known}")
            kwargs[key] = typed_value(raw_key, value, type(getattr(cls, key)))
        return cls(**kwargs)

    def update_limits(self) -> UpdateLimits:
        return UpdateLimits(self.max_norm, self.quarantine_after)

    def robust_rule(self) -> RobustRule:
        return RobustRule(self.clip_norm, self.trim_fraction)

    def make_coordinator(
        self, model: Mapping[str, np.ndarray], journal: Journal | None = None
    ) -> Coordinator:
        """The core this run config describes: its policy, checks and aggregation rule."""
        return Coordinator(
            self.make_policy(), model, self.update_limits(), journal, self.robust_rule()
        )

    def make_policy(self) -> Policy:
        staleness = Staleness("polynomial", a=self.staleness_a)
        if self.policy == "fedcompass":
            return FedCompass(
                FedCompassConfig(
                    q_min=self.q_min,
                    q_max=self.q_max,
                    latest_factor=self.latest_factor,
                    speed_momentum=self.speed_momentum,
                    server_rate=self.server_rate,
                    staleness=staleness,
                    normalise=self.normalise,
                    time_weighting=self.time_weighting,
                )
            )
        if self.policy == "fedavg":
            return FedAvg(FedAvgConfig(self.local_steps, self.fedavg_rate))
        if self.policy == "fedasync":
            return FedAsync(FedAsyncConfig(self.local_steps, self.fedasync_alpha, staleness))
        return FedBuff(
            FedBuffConfig(self.local_steps, self.buffer_size, self.fedbuff_rate, staleness)
        )


def typed_value(key: str, value: Any, expected: type) -> Any:
    """`value` as the field's type; ints are fine where floats are expected, nothing else."""
    if isinstance(value, bool) or expected is bool:
        ok = isinstance(value, bool) and expected is bool
    elif expected is float:
        ok = isinstance(value, int | float)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(f"run config {key!r} must be a {expected.__name__}, got {value!r}")
    return float(value) if expected is float else value


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (VALUE in TOML: 3, 0.5, 'text', true) as a mapping."""
    import tomllib

    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{item!r}: the value is not TOML ({error}); quote text") from error
    return values


def toml_assignments(values: dict[str, Any]) -> str:
    """The mapping as Flower's `--run-config` wants it: `k1=v1 k2=v2`, values in TOML."""
    import json

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)  # a TOML basic string
        return repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in values.items())
