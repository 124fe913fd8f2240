"""The export a device serves: base plus adapters, merged, exported once per distinct weights.

Layout under an export root (the data directory's `device/onnx`):

    <root>/<fingerprint>/   model.onnx, onnx_manifest.json, tokenizer files
    <root>/CURRENT          the fingerprint of the export to serve
    <root>/.tmp-*           an export being written, or left by one that died

The fingerprint hashes the merged weights, the architecture, the tokenizer
and the export format, so weights that come back to an earlier state (an
adapter removed, an unlearning edit undone) reuse that export instead of
writing it again. An export is written into a temporary directory beside the
others, checked against PyTorch, flushed to disk and renamed into place; only
then does the pointer switch, with an atomic replace. A process killed at any
moment therefore leaves the previous export current and whole, and a server
(`ServedModel`) keeps serving what it has until the pointer names a complete
new export. The protocol (lock, temporaries, flushing, pointer) is the model
store's, whose helpers this module uses.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from client.inference import KvCacheSession, OnnxGenerator, left_pad, prefill_positions
from edge_models.onnx_export import EXPORT_FORMAT, ExportError, export_causal_lm
from edge_models.quantize import QuantisedWeights, quantise_export
from shared.devices import resolve_torch_device
from shared.durable import (
    TEMP_PREFIX,
    exclusive_lock,
    fsync_path,
    read_pointer,
    remove_temporaries,
    sync_tree,
    write_pointer,
)

AdapterSource = PeftModel | str | Path
ServedWeights = Literal["float32"] | QuantisedWeights
# A wrong graph is off by order 1 relative to the logits' scale; float32 summed in another
# order, by 1e-7 to 1e-5 of it (a 30-layer model with logits near 40: about 2e-3 absolute).
VERIFY_TOLERANCE = 1e-4
_PROBE_PROMPTS = ((3, 4, 5, 6, 7), (8, 9, 10))
_PROBE_DECODE_STEPS = 1


def ensure_export(
    model: PreTrainedModel,
    adapters: Sequence[AdapterSource],
    export_root: str | Path,
    device: str = "auto",
    tokenizer: PreTrainedTokenizerBase | None = None,
    keep: int = 2,
    weights: ServedWeights = "float32",
) -> Path:
    """Make the export of `model` with `adapters` merged current; returns its directory.

    `tokenizer`, when given, is stored in the export so that a server needs
    nothing else. The `keep` most recent exports stay on disk (the current one
    and, by default, the one a server may still be loading). `weights` other
    than float32 serve a weight-only quantised copy of the checked fp32 export
    (`edge_models.quantize`), which answers differently: only on request.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1: the current export")
    root = Path(export_root)
    root.mkdir(parents=True, exist_ok=True)
    merged = merge_adapters(model, adapters, device)
    with exclusive_lock(root):
        remove_temporaries(root)
        staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
        try:
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            final = root / fingerprint(merged, staging, weights)
            if final.is_dir():
                os.utime(final)  # recent again, so pruning spares it
            else:
                export_causal_lm(merged, staging)
                _verify(merged, staging, device)
                if weights != "float32":
                    reference, staging = (
                        staging,
                        Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root)),
                    )
                    quantise_export(reference, staging, weights)
                    shutil.rmtree(reference)
                sync_tree(staging)
                os.rename(staging, final)
                fsync_path(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_pointer(root, final.name)
        _prune(root, final, keep)
    return final


def current_export(export_root: str | Path) -> Path | None:
    """The directory the pointer names, or None before the first export."""
    root = Path(export_root)
    name = read_pointer(root)
    return None if name is None else root / name


class ServedModel:
    """A server's handle on the current export, swapped only for a complete new one.

    Every call to `generator` reads the pointer (one small file). When it names
    another export, one caller loads that export while the others go on with
    the previous generator, which is replaced only once the new one is ready.
    """

    def __init__(self, export_root: str | Path, device: str = "auto", threads: int | None = None):
        self.export_root = Path(export_root)
        self.device = device
        self.threads = threads
        self._served: tuple[Path, OnnxGenerator] | None = None  # swapped as one
        self._loading = threading.Lock()

    @property
    def path(self) -> Path | None:
        """The export being served."""
        return None if self._served is None else self._served[0]

    def generator(self) -> OnnxGenerator:
        path = current_export(self.export_root)
        if path is None:
            raise LookupError(f"nothing has been exported to {self.export_root} yet")
        served = self._served
        if served is not None and (served[0] == path or not self._loading.acquire(blocking=False)):
            return served[1]  # current, or another caller is loading the new export
        if served is None:
            self._loading.acquire()  # nothing to serve until the first load is done
        try:
            served = self._served
            if served is None or served[0] != path:
                served = (path, OnnxGenerator.load(path, self.device, self.threads))
                self._served = served
            return served[1]
        finally:
            self._loading.release()


def merge_adapters(
    model: PreTrainedModel, adapters: Sequence[AdapterSource], device: str = "auto"
) -> PreTrainedModel:
    """A copy of `model` with each adapter's weights merged in, in order; `model` is untouched.

    LoRA updates add up, so the order does not change the result beyond
    float rounding. Adapter layers that peft injected into `model` itself (it
    does so in place when wrapping it) are removed from the copy first, so
    that an adapter given in `adapters` is never applied twice.
    """
    if isinstance(model, PeftModel):
        raise TypeError("pass the base model, and the PeftModel among the adapters")
    merged = copy.deepcopy(model).to(resolve_torch_device(device)).eval()
    _remove_adapter_layers(merged)
    for adapter in adapters:
        if isinstance(adapter, PeftModel):
            for name in adapter.active_adapters:
                weights = get_peft_model_state_dict(adapter, adapter_name=name)
                merged = _merge(merged, adapter.peft_config[name], weights)
        else:
            config = PeftConfig.from_pretrained(str(adapter))
            merged = _merge(merged, config, load_peft_weights(str(adapter), device="cpu"))
    return merged


def _merge(model: PreTrainedModel, config: PeftConfig, weights: dict) -> PreTrainedModel:
    wrapped = PeftModel(model, copy.deepcopy(config))
    loaded = set_peft_model_state_dict(wrapped, weights)
    if loaded.unexpected_keys:
        raise ExportError(f"adapter weights do not fit the model: {loaded.unexpected_keys[:3]}")
    return wrapped.merge_and_unload()


def _remove_adapter_layers(model: torch.nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # what peft left of the wrapping
        del model.peft_config


def fingerprint(
    model: PreTrainedModel, extra_files: Path, weights: ServedWeights = "float32"
) -> str:
    """Hash of everything an export depends on: format, architecture, weights, and `extra_files`."""
    quantised = "" if weights == "float32" else f":{weights}"
    digest = hashlib.sha256(
        f"lethe-onnx-{EXPORT_FORMAT}{quantised}:{type(model).__name__}".encode()
    )
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    digest.update(repr(sorted(config.items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for path in sorted(p for p in extra_files.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(extra_files)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def max_logit_difference(
    model: PreTrainedModel,
    session: KvCacheSession,
    prompts: Sequence[Sequence[int]],
    decode_steps: int,
) -> float:
    """Largest |PyTorch - ONNX| logit over the prompts' real tokens and `decode_steps` steps.

    Both are fed the same tokens (PyTorch's greedy choice), so the figure
    measures the graph rather than where two generations part.
    """
    input_ids, mask = left_pad(prompts, session.manifest.pad_token_id)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)

    def forward(ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits = model(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(attention_mask).to(device),
            position_ids=torch.from_numpy(positions).to(device),
            past_key_values=cache,
            use_cache=True,
        ).logits
        return logits.float().cpu().numpy()

    expected = forward(input_ids, mask, prefill_positions(mask))
    actual, state = session.prefill(input_ids, mask)
    worst = float(np.abs(actual - expected)[mask.astype(bool)].max())
    for _ in range(decode_steps):
        tokens = expected[:, -1].argmax(axis=-1)
        positions = state.next_positions
        actual = session.decode(state, tokens)
        expected = forward(tokens[:, None], state.attention_mask, positions)
        worst = max(worst, float(np.abs(actual - expected[:, -1]).max()))
    return worst


def _verify(model: PreTrainedModel, export_dir: Path, device: str) -> None:
    """Refuse to publish an export whose logits differ from the model it came from."""
    session = KvCacheSession(export_dir, device)
    vocab = session.manifest.vocab_size
    prompts = [[token % vocab for token in prompt] for prompt in _PROBE_PROMPTS]
    difference = max_logit_difference(model, session, prompts, _PROBE_DECODE_STEPS)
    ids, mask = left_pad(prompts, session.manifest.pad_token_id)
    with torch.inference_mode():
        device = next(model.parameters()).device
        logits = model(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
        ).logits
    scale = max(10.0, float(logits.abs().max()))
    if not difference <= VERIFY_TOLERANCE * scale:
        raise ExportError(
            f"export differs from the model by {difference:.3g} in logits of scale {scale:.3g}"
        )


def _prune(root: Path, current: Path, keep: int) -> None:
    """Delete all but the `keep` most recently made current exports (the caller holds the lock)."""
    exports = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(TEMP_PREFIX)]
    others = sorted((p for p in exports if p != current), key=lambda p: p.stat().st_mtime)
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old)
