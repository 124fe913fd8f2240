"""The federated train step: what a device does with the global shared adapter.

The shared adapter's A factors are fixed fleet-wide (drawn from the shared
seed, `client.adapters`) and only its B factors train, as in FFA-LoRA: then
every device's update B_i A shares one A, the mean of the products is the
product of the mean B, and the coordinator aggregates exactly in the space of
B A by averaging B alone (`coordinator.aggregation`). What travels is B.

The coordinator hands a device the global B factors and a number of
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

from client.adapters import SHARED, AdapterStateError, DeviceModel, is_lora_b
from client.lora_training import LoraTrainConfig, train_adapter_steps
from edge_models.corpus import PromptPair


@dataclass(frozen=True)
class SharedUpdate:
    """One device's contribution to a round.

    `delta` is trained minus global for every LoRA B tensor (A does not
    train), in float32 whatever the adapter's dtype, keyed as in peft's
    adapter files.
    `seconds_per_step` is the device's measured speed for the scheduler.
    """

    delta: dict[str, np.ndarray]
    seconds_per_step: float
    samples: int
    tokens: int
    loss: float


def train_shared(
    device_model: DeviceModel,
    global_b: Mapping[str, torch.Tensor],
    examples: Sequence[PromptPair],
    q_steps: int,
    config: LoraTrainConfig,
    seed: int,
) -> SharedUpdate:
    """Load the global B factors, train them `q_steps` steps, return the difference.

    The shared adapter trains on the model the coordinator serves to everyone
    (base + shared + ledger edits), with this device's personal adapter and
    own edits off: the fleet's objective is the loss of that model on all the
    devices' records. (Trained under the personal adapter, which already
    fits the device's records, the shared one learned only noise: on a real
    fleet its loss on the fleet's records went up, not down.) The device
    keeps the trained shared adapter until the next global one arrives.
    """
    if q_steps < 1:
        raise ValueError(f"q_steps must be at least 1, got {q_steps}")
    current = device_model.adapter_state(SHARED)
    b_keys = {k for k in current if is_lora_b(k)}
    if set(global_b) != b_keys:
        raise AdapterStateError(
            f"the global shared adapter must hold exactly the {len(b_keys)} B factors; "
            f"got {len(set(global_b) & b_keys)} of them and {len(set(global_b) - b_keys)} others"
        )
    fixed_a = {k: v for k, v in current.items() if not is_lora_b(k)}
    device_model.load_adapter_state(SHARED, {**fixed_a, **global_b})
    with device_model.shared_only():
        stats = train_adapter_steps(
            device_model.model,
            SHARED,
            examples,
            q_steps,
            config,
            seed,
            tokenizer=device_model.tokenizer,
            only=is_lora_b,
        )
    trained = device_model.adapter_state(SHARED)
    delta = {
        key: (trained[key].float() - value.detach().cpu().float()).numpy()
        for key, value in global_b.items()
    }
    return SharedUpdate(
        delta=delta,
        seconds_per_step=stats.seconds / q_steps,
        samples=stats.samples,
        tokens=stats.tokens,
        loss=stats.mean_loss,
    )
