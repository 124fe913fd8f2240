"""Training-based unlearning baselines, to compare the closed-form edit against.

Gradient ascent and NPO (Negative Preference Optimization, Zhang et al. 2024) are what
published unlearning results are measured against (see ALGORITHMS.md, sections 3 and 4).
They run here on the device's PERSONAL adapter (where a user's data lives) through the
project's one training loop, so their cost and damage are those of the code a device runs:
the base weights and the shared adapter never move.

Both can take a retain set: its ordinary language-model loss is added (weighted), which
turns gradient ascent into "gradient difference" and keeps NPO from drifting everywhere.
`should_stop(steps_done)` is asked every `check_every` steps so a benchmark can stop as soon
as the forget set is forgotten (e.g. its exact match is 0) and compare methods at equal
forgetting; compare them at equal retained damage too, since ascent forgets fastest by
wrecking the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftModel

from client.adapters import PERSONAL, DeviceModel
from client.lora_training import LoraTrainConfig, train_adapter_steps
from client.unlearning.measures import completion_log_probs, encoded_log_probs
from edge_models.corpus import PromptPair
from edge_models.training_data import Batch, encode_example, padded_batches

StopCheck = Callable[[int], bool]
BatchLoss = Callable[[PeftModel, Batch], torch.Tensor]


@dataclass(frozen=True)
class UnlearnTrainConfig:
    """How long and how hard a baseline unlearns.

    `max_steps` bounds the run; `check_every` is how often `should_stop` is asked (each
    check usually costs a generation pass). `npo_beta` is NPO's inverse temperature; as it
    goes to 0, NPO becomes gradient ascent. `retain_weight` scales the retain-set loss.
    """

    train: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(lr=1e-3, batch_size=8))
    max_steps: int = 200
    check_every: int = 5
    npo_beta: float = 0.1
    retain_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.check_every < 1:
            raise ValueError(
                f"max_steps and check_every must be at least 1, got {self.max_steps}, "
                f"{self.check_every}"
            )
        if not self.npo_beta > 0:
            raise ValueError(f"npo_beta must be positive, got {self.npo_beta}")
        if not self.retain_weight >= 0:
            raise ValueError(f"retain_weight must not be negative, got {self.retain_weight}")


@dataclass(frozen=True)
class BaselineReport:
    """What one baseline run did.

    `seconds` is training time, without the stop checks; `stopped_early` says that
    `should_stop` ended the run (the goal was reached, perhaps on the last step);
    `mean_loss` is the mean of the whole objective over the steps.
    """

    method: str
    steps: int
    seconds: float
    stopped_early: bool
    mean_loss: float


def gradient_ascent(
    device_model: DeviceModel,
    forget: Sequence[PromptPair],
    config: UnlearnTrainConfig,
    should_stop: StopCheck | None = None,
    retain: Sequence[PromptPair] | None = None,
) -> BaselineReport:
    """Raise the language-model loss of the forget completions (minus the retain loss)."""

    def ascent(model: PeftModel, batch: Batch) -> torch.Tensor:
        input_ids, mask, labels = batch
        return -model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    return _unlearn(device_model, "gradient_ascent", forget, ascent, config, should_stop, retain)


def npo(
    device_model: DeviceModel,
    forget: Sequence[PromptPair],
    config: UnlearnTrainConfig,
    should_stop: StopCheck | None = None,
    retain: Sequence[PromptPair] | None = None,
) -> BaselineReport:
    """Negative Preference Optimization on the forget pairs.

    loss = -(2/beta) mean log sigmoid(-beta (log p(y|x) - log p_ref(y|x))), with sequence
    log-probabilities of the completion (and `</s>`). The reference is the model before
    unlearning: its log-probabilities are computed once up front, so no second copy of the
    model is kept. Batches are matched to them by their token ids (equal ids, equal
    reference), since the training loop's batches do not say which examples they hold.
    """
    tokenizer = device_model.tokenizer
    encoded = [encode_example(tokenizer, pair) for pair in forget]
    reference_sums, _ = encoded_log_probs(device_model.model, tokenizer.pad_token_id, encoded)
    reference = {
        tuple(ids): float(value) for (ids, _), value in zip(encoded, reference_sums, strict=True)
    }
    beta = config.npo_beta

    def preference(model: PeftModel, batch: Batch) -> torch.Tensor:
        input_ids, mask, labels = batch
        keys = [
            tuple(row[row_mask].tolist())
            for row, row_mask in zip(input_ids, mask.bool(), strict=True)
        ]
        before = torch.tensor([reference[k] for k in keys], device=input_ids.device)
        now, _ = completion_log_probs(model, input_ids, mask, labels)
        return -(2 / beta) * F.logsigmoid(-beta * (now - before)).mean()

    return _unlearn(device_model, "npo", forget, preference, config, should_stop, retain)


def _unlearn(
    device_model: DeviceModel,
    method: str,
    forget: Sequence[PromptPair],
    forget_loss: BatchLoss,
    config: UnlearnTrainConfig,
    should_stop: StopCheck | None,
    retain: Sequence[PromptPair] | None,
) -> BaselineReport:
    """Train the personal adapter on `forget_loss` (plus the retain loss) until told to stop."""
    asked: list[bool] = []

    def stop(done: int) -> bool:
        if should_stop is None or done % config.check_every:
            return False
        asked.append(should_stop(done))
        return asked[-1]

    objective = (
        forget_loss if not retain else _with_retain(forget_loss, device_model, retain, config)
    )
    stats = train_adapter_steps(
        device_model.model,
        PERSONAL,
        forget,
        config.max_steps,
        config.train,
        config.seed,
        tokenizer=device_model.tokenizer,
        batch_loss=objective,
        stop=stop,
    )
    return BaselineReport(
        method=method,
        steps=stats.steps,
        seconds=stats.seconds,
        stopped_early=any(asked),
        mean_loss=stats.mean_loss,
    )


def _with_retain(
    forget_loss: BatchLoss,
    device_model: DeviceModel,
    retain: Sequence[PromptPair],
    config: UnlearnTrainConfig,
) -> BatchLoss:
    """`forget_loss` plus the weighted language-model loss of a retain batch, drawn in turn."""
    tokenizer = device_model.tokenizer
    device = next(device_model.model.parameters()).device
    batches = padded_batches(
        [encode_example(tokenizer, pair) for pair in retain],
        config.train.batch_size,
        tokenizer.pad_token_id,
        torch.Generator().manual_seed(config.seed + 1),
    )

    def loss(model: PeftModel, batch: Batch) -> torch.Tensor:
        input_ids, mask, labels = (t.to(device) for t in next(batches))
        kept = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        return forget_loss(model, batch) + config.retain_weight * kept

    return loss
