"""The device's model: one base with two LoRA adapters, "shared" and "personal".

The shared adapter is what federated rounds exchange: every device starts it
from the same seed, so that the coordinator can add up deltas of one common
starting point. The personal adapter learns from this device's user alone and
never leaves the device. Both are active whenever the device answers, so what
it serves is base + shared + personal, plus any unlearning edits (kept apart
from both adapters); `merged_copy` folds all of it into a plain model for the
ONNX export.

Both adapters start with LoRA B = 0: a fresh adapter changes nothing, so a
new device answers exactly like the base model until it has learned.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.lora_training import adapter_parameters
from client.unlearning.edits import AttachedEdits, fold
from edge_models.loading import LoraTargets, find_lora_targets, lora_config
from shared.devices import resolve_torch_device

SHARED = "shared"
PERSONAL = "personal"
ADAPTERS = (SHARED, PERSONAL)
_SHOWN_KEYS = 3  # keys named in an error message


def is_lora_b(key: str) -> bool:
    """Whether an adapter key names a LoRA B factor (the ones federated rounds train)."""
    return ".lora_B." in key


class AdapterStateError(ValueError):
    """An adapter state does not fit the device's adapter; nothing was changed."""


@dataclass(frozen=True)
class AdapterConfig:
    """The shape and the shared starting point of the device's adapters.

    The whole fleet must use one config: shared deltas from devices are only
    comparable (and addable) when rank, targets and the shared seed agree.
    `targets` None means every projection `find_lora_targets` finds in the
    base model's transformer blocks. `rank` and `alpha` are the shared
    adapter's; the personal adapter never leaves the device, so its rank is
    the device's own choice (`personal_rank`, default `rank`; the continual
    learner splits it into blocks) at the same alpha-per-rank scaling.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: LoraTargets | None = None
    shared_seed: int = 0
    personal_rank: int | None = None

    def __post_init__(self) -> None:
        if self.rank < 1 or (self.personal_rank is not None and self.personal_rank < 1):
            raise ValueError(f"ranks must be at least 1, got {self.rank}, {self.personal_rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def personal_alpha(self) -> float:
        return self.alpha * (self.personal_rank or self.rank) / self.rank


DEFAULT_ADAPTER_CONFIG = AdapterConfig()


class DeviceModel:
    """A base model wrapped in one PeftModel (`model`) that holds both adapters.

    The wrapper takes ownership of `base`: peft injects the adapter layers
    into it, so pass a copy to keep the original clean. `personal_seed` draws
    the personal adapter's starting A factors; the shared one comes from
    `config.shared_seed`. Every adapter parameter stays frozen outside
    training (`client.lora_training` unfreezes the one adapter it trains).
    """

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: AdapterConfig = DEFAULT_ADAPTER_CONFIG,
        personal_seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.device = resolve_torch_device(device)
        targets = config.targets or find_lora_targets(base)
        shared = lora_config(targets, config.rank, config.alpha, config.dropout)
        personal = lora_config(
            targets, config.personal_rank or config.rank, config.personal_alpha, config.dropout
        )
        with torch.random.fork_rng():  # peft's own initialisation draws from the global RNG
            self.model: PeftModel = get_peft_model(base.to(self.device), shared, SHARED)
            self.model.add_adapter(PERSONAL, personal)
        self.model.base_model.set_adapter(list(ADAPTERS), inference_mode=True)
        self.model.eval()
        self.load_adapter_state(SHARED, self._initial_state(SHARED, config.shared_seed))
        self.load_adapter_state(PERSONAL, self._initial_state(PERSONAL, personal_seed))
        # Unlearning edits ride on top of both adapters, apart from them (`client.unlearning`):
        # the coordinator's ledger (they belong to the shared model) and this device's own.
        self.shared_edits = AttachedEdits(self.model)
        self.device_edits = AttachedEdits(self.model)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """A CPU copy of one adapter's LoRA tensors, keyed as in peft's adapter files."""
        return {
            key: parameter.detach().cpu().clone()
            for key, parameter in self._parameters(name).items()
        }

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Replace one adapter's LoRA tensors, or raise AdapterStateError and change nothing.

        A state comes from another process or device (the coordinator's global
        adapter, a saved file), so every tensor is checked before any is
        written: the keys, each shape and dtype, and that all values are finite.
        """
        parameters = self._parameters(name)
        _check_state(name, parameters, state)
        with torch.no_grad():
            for key, parameter in parameters.items():
                parameter.copy_(state[key])

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of the model the device serves: base + shared + personal."""
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model(
            input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False
        ).logits

    @contextmanager
    def shared_only(self) -> Iterator[None]:
        """The model as the coordinator serves it to everyone: base + shared adapter + the
        ledger's edits (this device's personal adapter and own edits switched off)."""
        base = self.model.base_model
        with self.device_edits.suspended():
            base.set_adapter([SHARED], inference_mode=True)
            try:
                yield
            finally:
                base.set_adapter(list(ADAPTERS), inference_mode=True)

    def merged_copy(self) -> PreTrainedModel:
        """A plain model (no peft layers) with both adapters and the edits merged, for
        `ensure_export`."""
        with self.shared_edits.suspended(), self.device_edits.suspended():
            merged = copy.deepcopy(self.model).merge_and_unload(adapter_names=list(ADAPTERS))
        fold(merged, [*self.shared_edits.edits, *self.device_edits.edits])
        return merged.eval()

    def _parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        if name not in ADAPTERS:
            raise AdapterStateError(f"unknown adapter {name!r}; expected one of {ADAPTERS}")
        return adapter_parameters(self.model, name)

    def _initial_state(self, name: str, seed: int) -> dict[str, torch.Tensor]:
        """A zero, A drawn from `seed` on the CPU, so every device draws the same values.

        A is uniform in +-1/sqrt(fan_in), the range peft's default (Kaiming)
        initialisation uses; keys are drawn in sorted order so that the
        values do not depend on the order modules were registered in.
        """
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for key, parameter in sorted(self._parameters(name).items()):
            if is_lora_b(key):
                state[key] = torch.zeros(parameter.shape, dtype=parameter.dtype)
            else:
                bound = 1 / math.sqrt(parameter.shape[1])
                uniform = torch.rand(parameter.shape, generator=generator, dtype=torch.float32)
                state[key] = ((2 * uniform - 1) * bound).to(parameter.dtype)
        return state


def _check_state(
    name: str, parameters: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> None:
    unknown = sorted(set(state) - set(parameters))
    missing = sorted(set(parameters) - set(state))
    if unknown or missing:
        raise AdapterStateError(
            f"state does not fit adapter {name!r}: "
            f"{len(unknown)} unknown keys {unknown[:_SHOWN_KEYS]}, "
            f"{len(missing)} missing keys {missing[:_SHOWN_KEYS]}"
        )
    for key, parameter in parameters.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise AdapterStateError(f"{key}: expected a tensor, got {type(value).__name__}")
        if value.shape != parameter.shape:
            raise AdapterStateError(
                f"{key}: shape {tuple(value.shape)}, adapter {name!r} has {tuple(parameter.shape)}"
            )
        if value.dtype != parameter.dtype:
            raise AdapterStateError(
                f"{key}: dtype {value.dtype}, adapter {name!r} has {parameter.dtype}"
            )
        if not bool(torch.isfinite(value).all()):
            raise AdapterStateError(f"{key}: holds NaN or infinite values")
