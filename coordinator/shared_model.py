"""The shared adapter as the coordinator holds it: its starting point and how good it is.

The coordinator loads the same base model as the devices and builds the same
shared adapter (same config, same seed), so its A factors are the ones every
device drew and B starts at zero. It measures each committed version on text
no device holds: the loss (and next-token accuracy, which moves far less)
on the corpus's held-out messages, the style of the records devices learn
from, written by nobody in the corpus.

The model it serves is base + shared B A + the edit ledger (unlearning edits
devices sent, `client.unlearning.edits`). After every aggregation the ledger
is checked against the new weights and any edit that drifted is re-solved
(`settle`), so later rounds cannot bring forgotten data back through the
layers the edits sit on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.adapters import DEFAULT_ADAPTER_CONFIG, SHARED, AdapterConfig, DeviceModel, is_lora_b
from client.unlearning.device import settle, weight_under
from client.unlearning.edits import LayerEdit, effective_weight, find_module, residual
from edge_models.corpus import build_corpus
from edge_models.evaluation import next_token_accuracy
from edge_models.loading import load_causal_lm


@dataclass(frozen=True)
class SharedModelConfig:
    model_dir: str
    device: str = "auto"
    corpus_seed: int = 0
    eval_texts_per_domain: int = 8


class SharedModel:
    def __init__(
        self, config: SharedModelConfig, adapters: AdapterConfig = DEFAULT_ADAPTER_CONFIG
    ) -> None:
        loaded = load_causal_lm(config.model_dir, config.device)
        self.device_model = DeviceModel(
            loaded.model, loaded.tokenizer, adapters, device=config.device
        )
        # Only base + shared is measured: the coordinator has no personal adapter.
        self.device_model.model.base_model.set_adapter([SHARED], inference_mode=True)
        self._b_template = {
            k: v.float().numpy()
            for k, v in self.device_model.adapter_state(SHARED).items()
            if is_lora_b(k)
        }
        self._version = 0
        corpus = build_corpus(config.corpus_seed)
        self.texts = [
            text
            for texts in corpus.heldout_messages.values()
            for text in texts[: config.eval_texts_per_domain]
        ]

    @property
    def version(self) -> int:
        return self._version

    def load(self, version: int, global_b: dict[str, np.ndarray], ledger: list[LayerEdit]) -> None:
        """Make this the shared model: B factors of `version`, with the ledger on top."""
        state = self.device_model.adapter_state(SHARED)
        state.update(
            {k: torch.from_numpy(np.array(v)).to(state[k].dtype) for k, v in global_b.items()}
        )
        self.device_model.load_adapter_state(SHARED, state)
        self.device_model.shared_edits.replace(ledger)
        self._version = version

    def settle_ledger(self) -> list[LayerEdit]:
        """Re-solve the ledger's edits that the current weights moved; returns those."""
        edits = self.device_model.shared_edits.edits
        settled, _ = settle(self.device_model.model, edits)
        changed = [new for new, old in zip(settled, edits, strict=True) if new is not old]
        if changed:
            self.device_model.shared_edits.replace(settled)
        return changed

    def residuals(self, edits: list[LayerEdit]) -> dict[str, float]:
        """How far each edit is from its targets on the current weights (with the ledger)."""
        ledger = self.device_model.shared_edits.edits
        out = {}
        for edit in edits:
            try:
                weight = weight_under(self.device_model.model, edit, ledger)
            except KeyError as error:
                raise ValueError(f"edit {edit.edit_id}: {error}") from error
            if (edit.u.shape[0], edit.v.shape[0]) != tuple(weight.shape):
                raise ValueError(f"edit {edit.edit_id} does not fit {edit.layer}")
            base = effective_weight(find_module(self.device_model.model, edit.layer))
            out[edit.edit_id] = residual(edit, weight, base)
        return out

    def initial_b(self) -> dict[str, np.ndarray]:
        """B of the fleet's starting point (zeros), whatever has been measured since."""
        return {k: np.zeros_like(v) for k, v in self._b_template.items()}

    @torch.inference_mode()
    def measure(self) -> dict[str, float]:
        """Held-out loss (mean NLL per token) and next-token accuracy of the loaded model."""
        model, tokenizer = self.device_model.model, self.device_model.tokenizer
        encoded = tokenizer(
            [tokenizer.bos_token + t for t in self.texts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(self.device_model.device)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels, use_cache=False).loss
        return {
            "heldout_loss": float(loss),
            "heldout_next_token_accuracy": next_token_accuracy(model, tokenizer, self.texts),
        }
