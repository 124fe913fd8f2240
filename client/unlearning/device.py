"""Forgetting one subject on a device: the two edits, and the device's own check.

A device holds a subject's records, so it is the only party that can compute
an edit for them. It computes two:
- the shared edit, on base + shared adapter + the coordinator's edit ledger
  (its personal adapter and its own edits switched off): this is the model
  the coordinator serves to everyone, and the edit's factors are what the
  device sends back (never the records);
- the device edit, on everything the device serves, with the new shared edit
  already in place, so the two do not fight.
Both use the low-rank variant over the learner's key sketch, with the
subject's own keys taken out of it first (they are what must move), so no
retained record is read. The device then measures, on its records of the
subject, that neither model answers them any more (exact match and answer
probability, `client.unlearning.measures`), before the caller shreds.

No files here: `client.daemon` persists, shreds and exports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from client.adapters import DeviceModel
from client.continual import InputCovariance, LoraFactors
from client.unlearning.edits import (
    AttachedEdits,
    LayerEdit,
    corrected,
    effective_weight,
    find_module,
    residual,
)
from client.unlearning.measures import answer_probabilities
from client.unlearning.stamp import KeyCovariance, NothingToForget, StampConfig, stamp_edit
from edge_models.corpus import PromptPair, build_corpus
from edge_models.evaluation import exact_match
from edge_models.training_data import examples_from_records
from shared.edit_ids import DEVICE_EDIT_PREFIX, SHARED_EDIT_PREFIX
from shared.records import Record

RELAPSE_TOLERANCE = 0.1  # an edit whose residual grew past this is re-solved


@dataclass(frozen=True)
class SubjectUnlearning:
    """What forgetting one subject produced: the edits and the device's measurements.

    An edit is None when the records disclose nothing an edit could remove
    (free text with no digits, say): the subject is then only shredded.
    `downdate` is empty when the device edit was already in place (a retry):
    the sketch lost the subject's keys when that edit was saved.
    """

    shared_edit: LayerEdit | None
    device_edit: LayerEdit | None
    downdate: dict[str, torch.Tensor]  # the subject's keys, to take out of the learner's sketch
    downdate_tokens: int
    measurements: dict[str, float]


@cache
def refusal_prompts(seed: int = 0) -> tuple[str, ...]:
    """Prompts the edits' refusal target is built from (the corpus's `refusals_train`, whose
    answers are "I don't know" and the like). They are generic templates with unknown names,
    fit for any model."""
    return tuple(pair.prompt for pair in build_corpus(seed).refusals_train)


def unlearn_subject(
    device_model: DeviceModel,
    sketch: InputCovariance,
    factors: Sequence[LoraFactors],
    records: Sequence[Record],
    edit_name: str,
    config: StampConfig,
) -> SubjectUnlearning:
    """Compute and attach the edits for `records` (one subject's) that are not attached yet,
    and measure them.

    The edits are named `shared:<edit_name>` and `device:<edit_name>`; one
    already attached (a retry after a crash between the two saves) is kept
    as it is. Nothing is attached unless both edits are in place at the end:
    a failure half way leaves the model as it was. `sketch` is the learner's
    running key covariance; it is not changed here (the caller takes
    `downdate` out of it when it saves the device edit).
    """
    model, tokenizer = device_model.model, device_model.tokenizer
    pairs = [PromptPair(r.prompt or "", r.completion or "") for r in records if r.kind == "pair"]
    shared_id, device_id = SHARED_EDIT_PREFIX + edit_name, DEVICE_EDIT_PREFIX + edit_name
    shared_edit = _attached(device_model.shared_edits.edits, shared_id)
    device_edit = _attached(device_model.device_edits.edits, device_id)
    subject_keys = InputCovariance(list(factors))
    if device_edit is None:
        subject_keys.observe(model, tokenizer, examples_from_records(records))

    def retained(layer: str) -> KeyCovariance:
        name = sketch_name(sketch.sums, layer)
        tokens = sketch.tokens - subject_keys.tokens
        if tokens <= 0:
            # Nothing else was learned here: no direction is worth sparing more than another,
            # so the prior is isotropic at the scale of the subject's own keys.
            own = subject_keys.sums[name]
            scale = float(own.diagonal().mean()) / max(subject_keys.tokens, 1)
            return KeyCovariance(torch.eye(own.shape[0]) * max(scale, 1e-12))
        return KeyCovariance.from_sums(sketch.sums[name] - subject_keys.sums[name], tokens)

    def solve(attached: AttachedEdits, edit_id: str, which: str) -> LayerEdit:
        edit, report = stamp_edit(
            model, attached, tokenizer, records, retained, refusal_prompts(), edit_id, config
        )
        measurements[f"{which}_goals_met"] = report.goals_met
        return edit

    measurements: dict[str, float] = {"forget_pairs": float(len(pairs))}
    started = time.perf_counter()
    measurements["device_forget_prob_before"] = _probability(device_model, pairs)
    with device_model.shared_only():
        measurements["shared_forget_em_before"] = _em(device_model, pairs)
    measurements["device_forget_em_before"] = _em(device_model, pairs)
    shared_before = device_model.shared_edits.edits
    try:
        if shared_edit is None:
            with device_model.shared_only():
                shared_edit = solve(device_model.shared_edits, shared_id, "shared")
            device_model.shared_edits.replace([*shared_before, shared_edit])
        if device_edit is None:
            device_edit = solve(device_model.device_edits, device_id, "device")
            device_model.device_edits.replace([*device_model.device_edits.edits, device_edit])
    except NothingToForget:
        device_model.shared_edits.replace(shared_before)
        measurements["edited"] = 0.0
        return SubjectUnlearning(None, None, subject_keys.sums, subject_keys.tokens, measurements)
    except BaseException:
        device_model.shared_edits.replace(shared_before)
        raise
    measurements["edited"] = 1.0
    measurements["edit_seconds"] = time.perf_counter() - started
    measurements["device_forget_em"] = _em(device_model, pairs)
    measurements["device_forget_prob"] = _probability(device_model, pairs)
    with device_model.shared_only():
        measurements["shared_forget_em"] = _em(device_model, pairs)
    return SubjectUnlearning(
        shared_edit, device_edit, subject_keys.sums, subject_keys.tokens, measurements
    )


def _attached(edits: Sequence[LayerEdit], edit_id: str) -> LayerEdit | None:
    return next((e for e in edits if e.edit_id == edit_id), None)


def sketch_name(sums: Mapping[str, torch.Tensor], layer: str) -> str:
    """The sketch's name for `layer` (the sketch keys layers as the peft-wrapped model does)."""
    for name in (layer, "base_model.model." + layer):
        if name in sums:
            return name
    raise KeyError(f"the key sketch holds no layer {layer!r}")


def _probability(device_model: DeviceModel, pairs: list[PromptPair]) -> float:
    """Mean answer probability (TOFU's P) of the subject's completions, as they were trained."""
    if not pairs:
        return float("nan")
    return float(answer_probabilities(device_model.model, device_model.tokenizer, pairs).mean())


def _em(device_model: DeviceModel, pairs: list[PromptPair]) -> float:
    return exact_match(
        device_model.model,
        device_model.tokenizer,
        [p.prompt for p in pairs],
        [p.completion for p in pairs],
    )


def weight_under(
    model: torch.nn.Module, edit: LayerEdit, others: Sequence[LayerEdit]
) -> torch.Tensor:
    """The weight `edit` acts on: its layer's effective weight plus the other edits there."""
    weight = effective_weight(find_module(model, edit.layer)).to(edit.u)
    for other in others:
        if other.layer == edit.layer and other.edit_id != edit.edit_id:
            weight = weight + other.delta.to(weight)
    return weight


def settle(
    model: torch.nn.Module, edits: Sequence[LayerEdit], others: Sequence[LayerEdit] = ()
) -> tuple[list[LayerEdit], int]:
    """Re-solve every edit in `edits` whose residual drifted past `RELAPSE_TOLERANCE` after
    the weights under it moved (training, a new shared adapter); `others` are further edits
    attached to the same model. Edits are settled one after the other, each against the
    others as they are by then, so two edits of one layer share the work instead of
    undoing each other. Returns the edits and how many were re-solved."""
    out, changed = list(edits), 0
    for index, edit in enumerate(out):
        weight = weight_under(model, edit, [*out, *others])
        base = effective_weight(find_module(model, edit.layer)).to(edit.u)
        if residual(edit, weight, base) > RELAPSE_TOLERANCE:
            out[index] = corrected(edit, weight)
            changed += 1
    return out, changed
