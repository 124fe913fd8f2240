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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from client.adapters import ADAPTERS, SHARED, DeviceModel
from client.continual import InputCovariance, LoraFactors
from client.unlearning.edits import LayerEdit, corrected, effective_weight, find_module, residual
from client.unlearning.measures import answer_probabilities
from client.unlearning.stamp import KeyCovariance, StampConfig, StampReport, stamp_edit
from edge_models.corpus import PromptPair, build_corpus
from edge_models.evaluation import exact_match
from edge_models.training_data import examples_from_records
from shared.records import Record

SHARED_EDIT_PREFIX = "shared:"
DEVICE_EDIT_PREFIX = "device:"
RELAPSE_TOLERANCE = 0.1  # an edit whose residual grew past this is re-solved


@dataclass(frozen=True)
class SubjectUnlearning:
    """What forgetting one subject produced: the edits and the device's measurements."""

    shared_edit: LayerEdit
    device_edit: LayerEdit
    downdate: dict[str, torch.Tensor]  # the subject's keys, to take out of the learner's sketch
    downdate_tokens: int
    measurements: dict[str, float]
    reports: tuple[StampReport, StampReport]


@cache
def refusal_prompts(seed: int = 0) -> tuple[str, ...]:
    """Questions about people nobody knows: the corpus's refusal set (what "forgotten" sounds
    like). They are generic templates with unknown names, fit for any model."""
    return tuple(pair.prompt for pair in build_corpus(seed).refusals_train)


@contextmanager
def shared_only(device_model: DeviceModel) -> Iterator[None]:
    """The model as the coordinator serves it: base + shared + ledger edits."""
    base = device_model.model.base_model
    with device_model.device_edits.suspended():
        base.set_adapter([SHARED], inference_mode=True)
        try:
            yield
        finally:
            base.set_adapter(list(ADAPTERS), inference_mode=True)


def unlearn_subject(
    device_model: DeviceModel,
    sketch: InputCovariance,
    factors: Sequence[LoraFactors],
    records: Sequence[Record],
    edit_name: str,
    config: StampConfig,
) -> SubjectUnlearning:
    """Compute and attach both edits for `records` (one subject's), and measure them.

    `sketch` is the learner's running key covariance; it is not changed here
    (the caller takes `downdate` out of it once the edits are saved). The
    edits are named `shared:<edit_name>` and `device:<edit_name>`.
    """
    model, tokenizer = device_model.model, device_model.tokenizer
    pairs = [
        (r.prompt or "", (r.completion or "").strip().removesuffix("."))
        for r in records
        if r.kind == "pair"
    ]
    subject_keys = InputCovariance(list(factors))
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

    measurements: dict[str, float] = {}
    started = time.perf_counter()
    measurements["device_forget_prob_before"] = _probability(device_model, pairs)
    with shared_only(device_model):
        measurements["shared_forget_em_before"] = _em(device_model, pairs)
        shared_edit, shared_report = stamp_edit(
            model,
            device_model.shared_edits,
            tokenizer,
            records,
            retained,
            refusal_prompts(),
            SHARED_EDIT_PREFIX + edit_name,
            config,
        )
    measurements["device_forget_em_before"] = _em(device_model, pairs)
    device_model.shared_edits.replace([*device_model.shared_edits.edits, shared_edit])
    device_edit, device_report = stamp_edit(
        model,
        device_model.device_edits,
        tokenizer,
        records,
        retained,
        refusal_prompts(),
        DEVICE_EDIT_PREFIX + edit_name,
        config,
    )
    device_model.device_edits.replace([*device_model.device_edits.edits, device_edit])
    measurements["edit_seconds"] = time.perf_counter() - started
    measurements["device_forget_em"] = _em(device_model, pairs)
    measurements["device_forget_prob"] = _probability(device_model, pairs)
    measurements["device_goals_met"] = device_report.goals_met
    with shared_only(device_model):
        measurements["shared_forget_em"] = _em(device_model, pairs)
    measurements["shared_goals_met"] = shared_report.goals_met
    measurements["forget_pairs"] = float(len(pairs))
    return SubjectUnlearning(
        shared_edit=shared_edit,
        device_edit=device_edit,
        downdate=subject_keys.sums,
        downdate_tokens=subject_keys.tokens,
        measurements=measurements,
        reports=(shared_report, device_report),
    )


def sketch_name(sums: Mapping[str, torch.Tensor], layer: str) -> str:
    """The sketch's name for `layer` (the sketch keys layers as the peft-wrapped model does)."""
    for name in (layer, "base_model.model." + layer):
        if name in sums:
            return name
    raise KeyError(f"the key sketch holds no layer {layer!r}")


def _probability(device_model: DeviceModel, pairs: list[tuple[str, str]]) -> float:
    """Mean answer probability (TOFU's P) of the subject's completions."""
    if not pairs:
        return float("nan")
    model, tokenizer = device_model.model, device_model.tokenizer
    return float(
        answer_probabilities(model, tokenizer, [PromptPair(p, c) for p, c in pairs]).mean()
    )


def _em(device_model: DeviceModel, pairs: list[tuple[str, str]]) -> float:
    if not pairs:
        return float("nan")
    return exact_match(
        device_model.model, device_model.tokenizer, [p for p, _ in pairs], [a for _, a in pairs]
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
