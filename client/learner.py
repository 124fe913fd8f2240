"""The continual learner: how the personal adapter takes in a stretch of the stream.

`client.continual` has the pieces (replay, blocks, input sketch); this puts
them together into one policy object that the device daemon and the
continual bench both drive, so the method the bench measures is the method
the device runs. The policy is chosen by `Method`: Lethe's is replay plus
InfLoRA-style blocks with a frozen A (`LETHE_METHOD`); the others exist so
that the bench can set them side by side.

A stretch of the stream is a block. The caller decides where blocks begin
(`start_block`): the bench at each domain, the daemon after a number of new
records. The block's A rows are designed from the first records it sees and
then stay fixed, later records in the same block train its B. When every
block is used, `start_block` consolidates: each layer's product B A is
re-factorised by truncated SVD into the first `blocks - 1` blocks, freeing
the last one. The error of that truncation is measured and returned, not
hidden; the input sketch keeps everything learned protected either way.

No files here: the state to persist is `LearnerState`, the caller saves it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from client.continual import (
    BlockLayout,
    BlockMask,
    ComplementProjection,
    InputCovariance,
    OrthogonalityConfig,
    OrthogonalityPenalty,
    RecordSource,
    ReplayConfig,
    design_block,
    lora_factors,
    mix_replay,
)
from client.learning_rule import Check, LearningRule, Outcome
from client.lora_training import LoraTrainConfig, TrainStats, train_adapter_steps
from edge_models.evaluation import completion_fit
from edge_models.training_data import examples_from_records
from shared.records import Record

log = logging.getLogger(__name__)

Subspace = Literal["none", "inflora", "inflora-train-a", "olora"]


@dataclass(frozen=True)
class Method:
    """A continual-learning method: whether it replays, and which subspace method it adds."""

    replay: bool
    subspace: Subspace


LETHE_METHOD = Method(replay=True, subspace="inflora")


@dataclass(frozen=True)
class LearnerConfig:
    """The method and its settings; defaults are the ones `lethe bench continual` chose."""

    method: Method = LETHE_METHOD
    block_rank: int = 8
    blocks: int = 5
    replay: ReplayConfig = ReplayConfig(0.5)
    protected_energy: float = 0.99
    orthogonality_weight: float = 0.5
    train: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(lr=2e-3, batch_size=32))

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.block_rank, self.blocks)


@dataclass
class LearnerState:
    """What must survive a restart: the current block, whether its A is designed, the sketch."""

    block: int = -1
    designed: bool = False
    consolidations: int = 0
    sketch_tokens: int = 0
    sketch: dict[str, torch.Tensor] = field(default_factory=dict)


class ContinualLearner:
    """Trains one adapter of `model` on new records as a continual-learning method.

    `source` is where replay comes from (the record store, read when a
    training set is mixed, so a deleted subject is never replayed).
    """

    def __init__(
        self,
        model: PeftModel,
        adapter: str,
        tokenizer: PreTrainedTokenizerBase,
        source: RecordSource,
        config: LearnerConfig = LearnerConfig(),
        seed: int = 0,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.source = source
        self.config = config
        self.factors = lora_factors(model, adapter)
        rank = self.factors[0].a.shape[0]
        if config.method.subspace != "none" and rank != config.layout.rank:
            raise ValueError(
                f"adapter {adapter!r} has rank {rank}, the learner's blocks need "
                f"{config.layout.rank} ({config.blocks} x {config.block_rank})"
            )
        self.history = InputCovariance(self.factors)
        self.state = LearnerState()
        self._rng = random.Random(seed)

    @property
    def block(self) -> int:
        return self.state.block

    def start_block(self) -> float | None:
        """Open the next block; when all are used, consolidate first.

        Returns the relative Frobenius error of the consolidation (the largest
        over layers) when one happened, else None.
        """
        error = None
        if self.state.block + 1 >= self.config.blocks:
            error = self._consolidate()
            self.state.block = self.config.blocks - 1
            self.state.consolidations += 1
        else:
            self.state.block += 1
        self.state.designed = False
        return error

    def training_set(self, new: Sequence[Record]) -> list[Record]:
        if not self.config.method.replay:
            return list(new)
        return mix_replay(new, self.source, self.config.replay, self._rng)

    def learn(
        self,
        new: Sequence[Record],
        steps: int,
        seed: int,
        stop: Callable[[int], bool] | None = None,
        training: Sequence[Record] | None = None,
    ) -> TrainStats:
        """Train the current block for `steps` steps on `new` plus replay, then sketch `new`.

        `stop` (asked after every step, as `train_adapter_steps` does) may end
        training earlier; `training` is the mixed training set when the caller
        drew it already (`training_set`).
        """
        if self.state.block < 0:
            self.start_block()
        examples = examples_from_records(
            training if training is not None else self.training_set(new)
        )
        new_examples = examples_from_records(new)
        subspace = self.config.method.subspace
        layout = self.config.layout
        rows = layout.rows(self.state.block)
        extra_loss: Callable[[PeftModel], torch.Tensor] | None = None
        hooks: list[Callable[[PeftModel], None]] = []
        projection = None
        if subspace != "none":
            hooks.append(BlockMask(self.factors, rows, train_a=subspace != "inflora"))
        if subspace == "olora":
            penalty = OrthogonalityConfig(self.config.orthogonality_weight)
            extra_loss = OrthogonalityPenalty(self.factors, layout, self.state.block, penalty)
        redesign = subspace.startswith("inflora") and not self.state.designed
        if redesign or subspace == "inflora-train-a":
            complement = self.history.complement(self.config.protected_energy)
            if redesign:
                new_inputs = InputCovariance(self.factors)
                new_inputs.observe(self.model, self.tokenizer, new_examples)
                design_block(self.factors, layout, self.state.block, complement, new_inputs)
            if subspace == "inflora-train-a":
                projection = ComplementProjection(self.factors, rows, complement)
                hooks.append(projection)
        self.state.designed = True
        stats = train_adapter_steps(
            self.model,
            self.adapter,
            examples,
            steps,
            self.config.train,
            seed=seed,
            extra_loss=extra_loss,
            after_backward=_chained(hooks),
            tokenizer=self.tokenizer,
            stop=stop,
        )
        if projection is not None:
            projection.settle()
        if subspace.startswith("inflora"):
            self.history.observe(self.model, self.tokenizer, new_examples)
        return stats

    def learn_until(
        self,
        new: Sequence[Record],
        rule: LearningRule,
        seed: int,
        max_steps: int | None = None,
    ) -> tuple[TrainStats, Outcome]:
        """Train on `new` plus replay until `rule` says the records are learned (or that
        more steps would not help, or a ceiling is reached).

        Every `rule.check_every` steps the model is measured on the whole
        training set, new and replayed records alike (`completion_fit`:
        teacher-forced exact match of pair completions and loss), so the
        burst ends when it knows its new records and still knows the old
        ones it replays. The measuring time is not counted in the stats'
        seconds, but it is in the rule's time ceiling.
        """
        training = self.training_set(new)
        examples = examples_from_records(training)
        pairs = [i for i, record in enumerate(training) if record.kind == "pair"]
        # The loss that must fall is the answers' (pairs); free text, whose every token is a
        # target, weighs in only when a burst holds nothing else.
        scored = pairs or list(range(len(training)))
        course = rule.course()
        ceiling = rule.max_steps if max_steps is None else min(max_steps, rule.max_steps)
        started = time.perf_counter()
        last: list[Check] = []

        def measure(steps: int) -> Check:
            fit = completion_fit(self.model, self.tokenizer, examples)
            check = Check(
                steps=steps,
                seconds=time.perf_counter() - started,
                match=fit.match(pairs),
                loss=fit.mean_loss(scored),
            )
            last[:] = [check]
            log.info(
                "step %d: held-in match %.3f, loss %.3f (%.0f s)",
                steps,
                check.match,
                check.loss,
                check.seconds,
            )
            return check

        def stop(steps: int) -> bool:
            if not course.due(steps) and steps < ceiling:
                return False
            return course.observe(measure(steps)) is not None

        stats = self.learn(new, ceiling, seed, stop=stop, training=training)
        if course.outcome is not None:
            return stats, course.outcome
        check = last[0] if last and last[0].steps == stats.steps else measure(stats.steps)
        return stats, course.finish(check)

    def export_state(self) -> LearnerState:
        """A copy of the state, with the sketch, for the caller to persist."""
        return LearnerState(
            block=self.state.block,
            designed=self.state.designed,
            consolidations=self.state.consolidations,
            sketch_tokens=self.history.tokens,
            sketch={name: s.clone() for name, s in self.history.sums.items()},
        )

    def restore_state(self, state: LearnerState) -> None:
        """Take a persisted state back; the sketch must fit this adapter's layers."""
        if state.sketch:
            expected = {name: tuple(s.shape) for name, s in self.history.sums.items()}
            found = {name: tuple(s.shape) for name, s in state.sketch.items()}
            if found != expected:
                raise ValueError("the saved input sketch does not fit this adapter's layers")
            self.history.sums = {name: s.double().clone() for name, s in state.sketch.items()}
        self.history.tokens = state.sketch_tokens
        self.state = LearnerState(
            block=state.block, designed=state.designed, consolidations=state.consolidations
        )

    @torch.no_grad()
    def _consolidate(self) -> float:
        """Fold every layer's B A into the first `blocks - 1` blocks (truncated SVD)."""
        kept = self.config.layout.rows(self.config.blocks - 1).start
        worst = 0.0
        for f in self.factors:
            product = f.b.double() @ f.a.double()
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            b = u[:, :kept] * s[:kept]
            a = vh[:kept]
            total = float(s.pow(2).sum())
            if total > 0:
                worst = max(worst, (float(s[kept:].pow(2).sum()) / total) ** 0.5)
            f.a.zero_()
            f.b.zero_()
            f.a[:kept] = a.to(f.a.dtype)
            f.b[:, :kept] = b.to(f.b.dtype)
        return worst


def _chained(hooks: list[Callable[[PeftModel], None]]) -> Callable[[PeftModel], None] | None:
    """One `after_backward` hook that runs `hooks` in order (None when there are none)."""
    if not hooks:
        return None

    def run(model: PeftModel) -> None:
        for hook in hooks:
            hook(model)

    return run
