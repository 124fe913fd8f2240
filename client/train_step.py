"""The federated train step: what a device does with the global shared adapter.

The coordinator hands a device the global shared adapter and a number of
local steps (FedCompass chooses it so that devices of different speed arrive
together); the device trains exactly that many steps and sends back the
difference, with the measurements the scheduler needs. Nothing here reads or
writes files or talks to the network: the caller brings the examples (from
the record store, through `examples_from_records`) and sends the update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from client.adapters import SHARED, DeviceModel
from client.lora_training import LoraTrainConfig, train_adapter_steps
from edge_models.corpus import PromptPair


@dataclass(frozen=True)
class SharedUpdate:
    """One device's contribution to a round.

    `delta` is trained minus global for every LoRA tensor (A and B apart:
    aggregating their product exactly is the coordinator's job), in float32
    whatever the adapter's dtype, keyed as in peft's adapter files.
    `seconds_per_step` is the device's measured speed for the scheduler.
    """

    delta: dict[str, np.ndarray]
    seconds_per_step: float
    samples: int
    tokens: int
    loss: float


def train_shared(
    device_model: DeviceModel,
    global_shared: Mapping[str, torch.Tensor],
    examples: Sequence[PromptPair],
    q_steps: int,
    config: LoraTrainConfig,
    seed: int,
) -> SharedUpdate:
    """Load the global shared adapter, train it `q_steps` steps, return the difference.

    The personal adapter stays active (frozen) while the shared one trains:
    the shared adapter learns what the personal one does not already give
    this device, on the model the device actually serves. The device keeps
    the trained shared adapter until the next global one arrives.
    """
    if q_steps < 1:
        raise ValueError(f"q_steps must be at least 1, got {q_steps}")
    device_model.load_adapter_state(SHARED, global_shared)
    stats = train_adapter_steps(
        device_model.model,
        SHARED,
        examples,
        q_steps,
        config,
        seed,
        tokenizer=device_model.tokenizer,
    )
    trained = device_model.adapter_state(SHARED)
    delta = {
        key: (value.float() - global_shared[key].detach().cpu().float()).numpy()
        for key, value in trained.items()
    }
    return SharedUpdate(
        delta=delta,
        seconds_per_step=stats.seconds / q_steps,
        samples=stats.samples,
        tokens=stats.tokens,
        loss=stats.mean_loss,
    )
