"""When a device has learned what it was given: a stopping rule that ends on evidence.

A fixed number of steps is wrong in both directions: too few for a large
model or an unusual phrasing (the device goes idle knowing nothing), too many
for records it already knows. The daemon therefore trains a burst in chunks
and, after each chunk, measures what the model now does on the burst's own
records (held in: the new records and the replay they are mixed with):

- `match`: the share of pair records whose whole completion, closing
  end-of-sequence included, is the model's argmax at every position under
  teacher forcing. That is exactly "greedy decoding answers this completion
  and stops", measured in one forward pass instead of a generation per record;
- `loss`: the mean completion loss (nats per token) over every record, text
  records included.

The rule stops when the records are learned (`match` at its target with the
loss under its threshold, or at its target in two checks in a row: a device
should answer what it was told, not recite every note word for word; for a
burst of free text alone, `loss` under its threshold), when neither measure has improved for
`patience` checks in a row (more steps would not help: the report says so),
or at a safety ceiling of steps or seconds, which is large and reported as
such. It only decides; the caller measures and trains (no I/O, no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

StopReason = Literal["learned", "plateau", "step_ceiling", "time_ceiling"]


@dataclass(frozen=True)
class LearningRule:
    """The evidence a burst trains until, and the ceilings that bound it.

    `check_every` is the number of steps between two measurements; the
    caller may measure less often on a slow device, the rule only counts
    checks. A check improves on the best so far when `match` rises by at
    least `min_match_gain` or `loss` falls by at least `min_loss_drop`
    (relative). `min_steps` keeps a burst from stopping on its first check
    when its records happen to be known already to within the targets.
    """

    target_match: float = 0.97
    target_loss: float = 0.3
    check_every: int = 25
    patience: int = 6
    min_match_gain: float = 0.01
    min_loss_drop: float = 0.03
    min_steps: int = 0
    max_steps: int = 4000
    max_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if not 0 < self.target_match <= 1:
            raise ValueError(f"target_match must be in (0, 1], got {self.target_match}")
        if not self.target_loss > 0:
            raise ValueError(f"target_loss must be positive, got {self.target_loss}")
        if self.check_every < 1 or self.patience < 1:
            raise ValueError("check_every and patience must be at least 1")
        if self.min_match_gain < 0 or not 0 <= self.min_loss_drop < 1:
            raise ValueError("min_match_gain must be >= 0 and min_loss_drop in [0, 1)")
        if self.min_steps < 0 or self.max_steps < 1 or not self.max_seconds > 0:
            raise ValueError("need min_steps >= 0, max_steps >= 1 and max_seconds > 0")

    def course(self) -> LearningCourse:
        return LearningCourse(self)


@dataclass(frozen=True)
class Check:
    """One measurement: after `steps` steps and `seconds` of training."""

    steps: int
    seconds: float
    match: float  # NaN when the records hold no pair
    loss: float


@dataclass(frozen=True)
class Outcome:
    """Why training stopped, and the last and best measurements."""

    reason: StopReason
    steps: int
    seconds: float
    match: float
    loss: float
    best_match: float
    best_loss: float
    checks: int

    @property
    def learned(self) -> bool:
        return self.reason == "learned"


@dataclass
class LearningCourse:
    """One burst's progress under a rule: feed it checks, it says when to stop."""

    rule: LearningRule
    checks: list[Check] = field(default_factory=list)
    best_match: float = -math.inf
    best_loss: float = math.inf
    since_improvement: int = 0
    outcome: Outcome | None = None

    def due(self, steps: int) -> bool:
        """Whether a measurement is due after `steps` steps."""
        return steps % self.rule.check_every == 0

    def observe(self, check: Check) -> Outcome | None:
        """Take one measurement; an `Outcome` when training should stop there, else None."""
        if self.outcome is not None:
            return self.outcome
        if math.isnan(check.loss):
            raise ValueError("a check needs a finite loss")
        rule = self.rule
        self.checks.append(check)
        has_pairs = not math.isnan(check.match)
        improved = check.loss < self.best_loss * (1 - rule.min_loss_drop) or (
            has_pairs and check.match >= self.best_match + rule.min_match_gain
        )
        if improved:
            self.since_improvement = 0
        else:
            self.since_improvement += 1
        if has_pairs:
            self.best_match = max(self.best_match, check.match)
        self.best_loss = min(self.best_loss, check.loss)
        reason: StopReason | None = None
        # Exact answers are the evidence, held over two checks in a row unless the loss says
        # they are also confident (free text, not memorised word for word, keeps the mean
        # loss up); a burst of text alone is learned by its loss.
        if has_pairs:
            earlier = self.checks[-2].match if len(self.checks) > 1 else math.nan
            known = check.match >= rule.target_match and (
                check.loss <= rule.target_loss or earlier >= rule.target_match
            )
        else:
            known = check.loss <= rule.target_loss
        if known and check.steps >= rule.min_steps:
            reason = "learned"
        elif self.since_improvement >= rule.patience and check.steps >= rule.min_steps:
            reason = "plateau"
        elif check.steps >= rule.max_steps:
            reason = "step_ceiling"
        elif check.seconds >= rule.max_seconds:
            reason = "time_ceiling"
        if reason is None:
            return None
        return self._stop(reason, check)

    def finish(self, check: Check) -> Outcome:
        """The outcome when training ended without the rule stopping it (the caller's ceiling)."""
        if self.outcome is not None:
            return self.outcome
        if not self.checks or self.checks[-1] is not check:
            outcome = self.observe(check)
            if outcome is not None:
                return outcome
        reason: StopReason = (
            "time_ceiling" if check.seconds >= self.rule.max_seconds else ("step_ceiling")
        )
        return self._stop(reason, check)

    def _stop(self, reason: StopReason, check: Check) -> Outcome:
        self.outcome = Outcome(
            reason=reason,
            steps=check.steps,
            seconds=check.seconds,
            match=check.match,
            loss=check.loss,
            best_match=math.nan if math.isnan(check.match) else self.best_match,
            best_loss=self.best_loss,
            checks=len(self.checks),
        )
        return self.outcome
