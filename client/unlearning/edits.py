"""Unlearning edits as their own low-rank deltas, kept apart from every adapter.

An edit changes one MLP down projection: `W <- W + U V^T`. It is not merged
into an adapter, because training overwrites adapters: a later burst or a new
global shared adapter would silently take the edit away. Instead an edit is
attached to the module as a forward hook (`attach`) on the device and the
coordinator alike, and folded into plain weights only for an export (`fold`).

An edit also keeps what it was solved for: its keys `K` (the layer inputs at
the forget positions, d_in x n) and the outputs it must produce there
(`targets`, d_out x n). That lets the owner check it after the weights under
it moved (`residual`) and re-solve it in closed form (`corrected`) in the
same row space `V`, which is what carries the protection of retained keys,
without the forget text or any retained data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_FIELDS = ("u", "v", "keys", "targets")
_SEPARATOR = "|"  # in array keys `<edit id>|<layer>|<field>`; ids and layer names never hold it


@dataclass(frozen=True)
class LayerEdit:
    """`W <- W + u v^T` on the module named `layer` (named as in the plain causal LM)."""

    edit_id: str
    layer: str
    u: torch.Tensor  # d_out x n
    v: torch.Tensor  # d_in x n
    keys: torch.Tensor  # d_in x n
    targets: torch.Tensor  # d_out x n

    def __post_init__(self) -> None:
        for name in ("u", "v", "keys", "targets"):
            if getattr(self, name).ndim != 2:
                raise ValueError(f"edit {self.edit_id}: {name} must be a matrix")
        n = self.u.shape[1]
        d_out, d_in = self.u.shape[0], self.v.shape[0]
        shapes = {
            "u": (d_out, n),
            "v": (d_in, n),
            "keys": (d_in, self.keys.shape[1]),
            "targets": (d_out, self.keys.shape[1]),
        }
        for name, shape in shapes.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise ValueError(f"edit {self.edit_id}: {name} has shape {tuple(value.shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"edit {self.edit_id}: {name} holds NaN or infinite values")

    @property
    def delta(self) -> torch.Tensor:
        return self.u @ self.v.T

    def factors_only(self) -> LayerEdit:
        """The edit as it is served to others: U and V. Keys and targets are activations at
        the forgotten text's positions, so they stay with the edit's owner, the only one
        who checks and re-solves it."""
        return LayerEdit(
            self.edit_id, self.layer, self.u, self.v, self.keys[:, :0], self.targets[:, :0]
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float32 arrays keyed `<field>`, for files and Flower messages."""
        return {name: getattr(self, name).detach().cpu().float().numpy() for name in _FIELDS}

    @classmethod
    def from_arrays(cls, edit_id: str, layer: str, arrays: Mapping[str, np.ndarray]) -> LayerEdit:
        missing = [name for name in _FIELDS if name not in arrays]
        if missing:
            raise ValueError(f"edit {edit_id}: missing {missing}")
        tensors = {
            name: torch.from_numpy(np.array(arrays[name], dtype=np.float32)) for name in _FIELDS
        }
        return cls(edit_id=edit_id, layer=layer, **tensors)


def find_module(model: nn.Module, layer: str) -> nn.Module:
    """The module `layer` names, in a plain causal LM or the same model wrapped by peft."""
    modules = dict(model.named_modules())
    for prefix in ("", "base_model.model."):
        if prefix + layer in modules:
            return modules[prefix + layer]
    raise KeyError(f"no module {layer!r} in the model")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly LoRA-wrapped) linear layer applies now: base plus active adapters.

    Hooks (edits) are not included: this is the weight under the edits.
    """
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach().clone()
    lora_a = getattr(module, "lora_A", None)
    if lora_a is not None and not getattr(module, "disable_adapters", False):
        for name in module.active_adapters:
            if name in lora_a:
                a = lora_a[name].weight.detach()
                b = module.lora_B[name].weight.detach()
                weight += module.scaling[name] * (b @ a)
    return weight


def residual(edit: LayerEdit, weight: torch.Tensor, base: torch.Tensor | None = None) -> float:
    """How far `weight + edit` is from producing the edit's targets at its keys, relative to
    how far the layer's own weight `base` (no edit at all; `weight` when omitted) is from
    them: 0 on target, 1 as if there were no edit. `weight` may hold other edits of the layer.
    """
    w = weight.to(edit.u)
    b = w if base is None else base.to(edit.u)
    moved = (w + edit.delta) @ edit.keys - edit.targets
    needed = edit.targets - b @ edit.keys
    # An edit that had (almost) nothing to move is measured against a sliver of its outputs,
    # so that rounding noise over a push of ~0 does not read as a failed edit.
    scale = torch.maximum(needed.norm(), 1e-3 * edit.targets.norm()).clamp_min(1e-12)
    return float(moved.norm() / scale)


def corrected(edit: LayerEdit, weight: torch.Tensor) -> LayerEdit:
    """The edit re-solved for the weight under it now, in the same row space `v`.

    Solves `(weight + u' v^T) keys = targets` for `u'` in least squares: the
    row space `v` is the one the device chose to leave retained keys alone, so
    the correction keeps that protection.
    """
    w = weight.to(edit.u)
    needed = edit.targets - w @ edit.keys  # d_out x n_keys
    gram = edit.v.T @ edit.keys  # n x n_keys
    u = torch.linalg.lstsq(gram.T, needed.T).solution.T
    return LayerEdit(edit.edit_id, edit.layer, u, edit.v, edit.keys, edit.targets)


class AttachedEdits:
    """Edits attached to a live model as forward hooks; `replace` swaps the whole set."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.edits: list[LayerEdit] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def replace(self, edits: Sequence[LayerEdit]) -> None:
        """Attach exactly `edits` (checked against the modules first; nothing changes on error)."""
        modules = [find_module(self.model, e.layer) for e in edits]
        for edit, module in zip(edits, modules, strict=True):
            weight = effective_weight(module)
            if (edit.u.shape[0], edit.v.shape[0]) != tuple(weight.shape):
                raise ValueError(
                    f"edit {edit.edit_id} is {edit.u.shape[0]}x{edit.v.shape[0]}, "
                    f"{edit.layer} is {tuple(weight.shape)}"
                )
        self.clear()
        for edit, module in zip(edits, modules, strict=True):
            like = getattr(module, "base_layer", module).weight
            self._handles.append(module.register_forward_hook(_adding(edit, like)))
        self.edits = list(edits)

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.edits = []

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run without the edits (to measure or solve against the weights under them)."""
        edits = list(self.edits)
        self.clear()
        try:
            yield
        finally:
            self.replace(edits)


def _adding(edit: LayerEdit, like: torch.Tensor):  # noqa: ANN202 (a hook closure)
    u = edit.u.to(like)
    v = edit.v.to(like)

    def hook(
        _module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return output + (args[0] @ v) @ u.T

    return hook


@torch.no_grad()
def fold(model: nn.Module, edits: Sequence[LayerEdit]) -> None:
    """Add the edits into a plain model's weights (an export copy: hooks do not export)."""
    for edit in edits:
        module = find_module(model, edit.layer)
        module.weight += edit.delta.to(module.weight)


def edits_to_arrays(edits: Sequence[LayerEdit]) -> dict[str, np.ndarray]:
    """A set of edits as one flat dict of arrays (safetensors bytes, a Flower ArrayRecord)."""
    out = {}
    for edit in edits:
        if _SEPARATOR in edit.edit_id or _SEPARATOR in edit.layer:
            raise ValueError(f"edit ids and layer names must not hold {_SEPARATOR!r}")
        for name, value in edit.to_arrays().items():
            out[_SEPARATOR.join((edit.edit_id, edit.layer, name))] = value
    return out


def edits_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[LayerEdit]:
    """The inverse of `edits_to_arrays`, in edit id order; ValueError on anything malformed."""
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        parts = key.split(_SEPARATOR)
        if len(parts) != 3 or parts[2] not in _FIELDS or not parts[0] or not parts[1]:
            raise ValueError(f"not an edit array key: {key!r}")
        grouped.setdefault((parts[0], parts[1]), {})[parts[2]] = value
    ids = [edit_id for edit_id, _ in grouped]
    if len(ids) != len(set(ids)):
        raise ValueError("an edit id names more than one layer")
    return [LayerEdit.from_arrays(i, layer, grouped[(i, layer)]) for i, layer in sorted(grouped)]
