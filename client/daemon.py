"""The device daemon: the long-lived process that keeps a device's model warm.

It ties the device together. It ingests what apps drop in the inbox, trains
the personal adapter in bursts as records arrive (the continual learner, with
replay from the record store), saves adapters durably, re-exports ONNX after
every change and serves generation. It also trains the shared adapter when a
federated round asks (the Flower ClientApp is a new process per message, so it
asks the warm daemon over the local channel, `client.device_service`).

One lock serialises everything that changes the model (a burst, a federated
train step); generation reads the current ONNX export and never waits for it.

Progress is a watermark: the highest record row the personal adapter has
trained on, saved in the same adapter version as the weights and the
learner's input sketch. A crash before a save loses only the burst in
flight, and it is trained again after the restart: no accepted record is
skipped, and none is trained twice into a saved adapter.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from client.adapter_store import load_adapter, save_adapter
from client.adapters import PERSONAL, SHARED, AdapterConfig, DeviceModel
from client.inbox import InboxResult, process_inbox
from client.inference import Completion, SamplingParams
from client.learner import ContinualLearner, LearnerConfig, LearnerState
from client.learning_rule import LearningRule
from client.lora_training import LoraTrainConfig, tokens_within
from client.record_store import RecordStore
from client.serving import ServedModel, ServedWeights, current_export, ensure_export
from client.train_step import SharedUpdate, train_shared
from client.unlearning.device import SubjectUnlearning, settle, unlearn_subject
from client.unlearning.edits import LayerEdit, edits_from_arrays, edits_to_arrays
from client.unlearning.stamp import StampConfig
from edge_models.default_model import DEFAULT_MODEL_NAME
from edge_models.evaluation import normalise_answer
from edge_models.loading import ModelLoadError, load_causal_lm
from edge_models.model_store import resolve_model
from edge_models.training_data import examples_from_records
from shared.edit_ids import SHARED_EDIT_PREFIX, edit_name
from shared.holdings import Holdings, ensure_salt, subject_hash
from shared.paths import DataDir
from shared.records import Record, RecordSelector
from shared.versioned_store import IntegrityError, NotFoundError, StoreError

log = logging.getLogger(__name__)

_SKETCH_PREFIX = "sketch."
_EDIT_PREFIX = "edit."  # this device's edits, saved with the personal adapter
_LEDGER_PREFIX = "ledger."  # the coordinator's edits, saved with the shared adapter


class DaemonError(RuntimeError):
    """The daemon cannot start or go on as configured; the message says what to do."""


@dataclass(frozen=True)
class DaemonConfig:
    """How the device learns.

    A burst takes up to `max_burst_records` new records, mixes in replay and
    trains until `learning` (`client.learning_rule`) says the burst's records
    are learned: the model answers them exactly, teacher forced, and their
    loss is low; or that more steps no longer help. `max_steps_per_burst` is
    only a safety ceiling (a burst that reaches it says so in its report).
    `epochs_per_burst`, when given, restores the old fixed schedule: that many
    passes over the training set, at most `max_steps_per_burst` steps, no
    measurement. A new block of the personal adapter opens after
    `records_per_block` new records.
    """

    model: str = DEFAULT_MODEL_NAME
    device: str = "auto"
    seed: int = 0
    poll_s: float = 1.0
    max_burst_records: int = 128
    epochs_per_burst: float | None = None
    max_steps_per_burst: int = 3000
    records_per_block: int = 120
    learning: LearningRule = LearningRule()
    learner: LearnerConfig = LearnerConfig()
    adapters: AdapterConfig = AdapterConfig()
    unlearning: StampConfig = StampConfig()
    shared_train: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(batch_size=16))
    # What one training step's activations may hold: batches are run in chunks of rows that fit
    # (`tokens_within`; the step is the same). A train config's own max_batch_tokens wins.
    training_memory_mb: float = 512.0
    # What generation serves: the checked fp32 export, or a weight-only quantised copy of it
    # (smaller and faster, answers a little differently: `lethe bench inference` measures it).
    served_weights: ServedWeights = "float32"

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or (self.epochs_per_burst is not None and self.epochs_per_burst <= 0):
            raise ValueError("poll_s and epochs_per_burst must be positive")
        if min(self.max_burst_records, self.max_steps_per_burst, self.records_per_block) < 1:
            raise ValueError("burst sizes and records_per_block must be at least 1")
        if not self.training_memory_mb > 0:
            raise ValueError(f"training_memory_mb must be positive, got {self.training_memory_mb}")


@dataclass(frozen=True)
class BurstReport:
    """One burst of personal training and what it led to.

    `loss` is the mean training loss over the burst's steps; `stopped` says
    why the burst ended (`learned`, `plateau`, `step_ceiling`, `time_ceiling`,
    or `fixed` under a fixed schedule), and `held_in_match` / `held_in_loss`
    are the last measurement of the burst's training set (new and replayed
    records): NaN under a fixed schedule.
    """

    records: int
    trained_through: int
    block: int
    steps: int
    seconds: float
    loss: float
    consolidation_error: float | None
    export: Path
    stopped: str = "fixed"
    held_in_match: float = math.nan
    held_in_loss: float = math.nan


@dataclass(frozen=True)
class DaemonStatus:
    records: int
    subjects: int
    pending: int
    trained_through: int
    block: int
    bursts: int
    export: Path | None
    personal_version: int
    shared_version: int


@dataclass(frozen=True)
class UnlearnAnswer:
    """A subject forgotten on this device (or `held` False: no such subject, nothing changed).

    `shared_edit` is what the coordinator applies to the shared model.
    """

    held: bool
    shared_edit: LayerEdit | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    personal_version_before: int = 0
    personal_version_after: int = 0
    shared_version: int = 0
    records_deleted: int = 0


@dataclass
class _Progress:
    trained_through: int = 0
    block_records: int = 0
    personal_version: int = 0
    shared_version: int = 0
    bursts: int = 0


class DeviceDaemon:
    """One device's model, records and adapters, opened from its data directory."""

    def __init__(self, data: DataDir, config: DaemonConfig = DaemonConfig()) -> None:
        self.data = data.ensure()
        self.config = config
        self.inbox = data.device / "inbox"
        self.adapter_root = data.device / "adapters"
        self.salt = ensure_salt(data.device / "subjects.salt")
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.progress = _Progress()
        try:
            loaded = load_causal_lm(resolve_model(config.model, data.models), config.device)
        except (StoreError, ModelLoadError) as error:
            raise DaemonError(
                f"cannot load model {config.model!r}: {error}. Build the default one with "
                "`lethe model build`, or pass a model directory"
            ) from error
        tokens = tokens_within(loaded.model.config, config.training_memory_mb)
        self.config = config = replace(
            config,
            learner=replace(config.learner, train=_bounded(config.learner.train, tokens)),
            shared_train=_bounded(config.shared_train, tokens),
        )
        layout_rank = config.learner.layout.rank
        adapters = AdapterConfig(
            rank=config.adapters.rank,
            alpha=config.adapters.alpha,
            dropout=config.adapters.dropout,
            targets=config.adapters.targets or loaded.lora_targets,
            shared_seed=config.adapters.shared_seed,
            personal_rank=layout_rank,
        )
        self.store = RecordStore.open(data.record_db, data.master_key)
        try:
            self.model = DeviceModel(
                loaded.model,
                loaded.tokenizer,
                adapters,
                personal_seed=config.seed,
                device=config.device,
            )
            self.learner = ContinualLearner(
                self.model.model,
                PERSONAL,
                loaded.tokenizer,
                self.store,
                config.learner,
                seed=config.seed,
            )
            self._restore()
            # Records the served export has learned from; `pending` counts the rest, so a
            # caller that waits for 0 pending is answered by the model that learned them.
            self._served_through = self.progress.trained_through
            self.served = ServedModel(data.onnx_exports, config.device)
            self._export()
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> DeviceDaemon:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll the inbox and train until `stop` is set; errors are logged, not fatal."""
        while not stop.is_set():
            try:
                self.ingest_inbox()
                burst = self.train_burst()
            except Exception:  # a bad burst must not end the device's service
                log.exception("burst failed; the previous adapter stays in use")
                burst = None
            if burst is None:
                stop.wait(self.config.poll_s)

    def ingest_inbox(self) -> list[InboxResult]:
        results = process_inbox(self.inbox, self.store)
        for result in results:
            if result.accepted:
                log.info("ingested %s: %s", result.file.name, result.report)
            else:
                log.warning("rejected %s: %d bad lines", result.file.name, len(result.errors))
        return results

    def pending(self) -> int:
        """Stored records the served model has not learned from yet (a burst is done when its
        export serves, not when its training ends)."""
        return self.store.count(after=self._served_through)

    def train_burst(self) -> BurstReport | None:
        """Train the personal adapter on the next untrained records; None when there are none."""
        with self._lock:
            numbered = self._next_records()
            if not numbered:
                return None
            new = [record for _row, record in numbered]
            consolidation = None
            block_full = self.progress.block_records >= self.config.records_per_block
            if self.learner.block < 0 or block_full:
                consolidation = self.learner.start_block()
                self.progress.block_records = 0
            seed = self.config.seed * 1_000_003 + self.progress.bursts
            outcome = None
            if self.config.epochs_per_burst is None:
                stats, outcome = self.learner.learn_until(
                    new, self.config.learning, seed, max_steps=self.config.max_steps_per_burst
                )
            else:
                stats = self.learner.learn(new, self._burst_steps(len(new)), seed=seed)
            self._settle_device_edits()
            self.progress.trained_through = numbered[-1][0]
            self.progress.block_records += len(new)
            self.progress.bursts += 1
            self._save_personal()
            export = self._export()
            self._served_through = self.progress.trained_through
            report = BurstReport(
                records=len(new),
                trained_through=self.progress.trained_through,
                block=self.learner.block,
                steps=stats.steps,
                seconds=stats.seconds,
                loss=stats.mean_loss,
                consolidation_error=consolidation,
                export=export,
                **(
                    {}
                    if outcome is None
                    else {
                        "stopped": outcome.reason,
                        "held_in_match": outcome.match,
                        "held_in_loss": outcome.loss,
                    }
                ),
            )
            log.info("burst: %s", report)
            return report

    # -- what the federated round asks ---------------------------------------

    def train_shared(
        self,
        global_b: Mapping[str, np.ndarray],
        steps: int,
        seed: int,
        model_version: int,
        ledger: Sequence[LayerEdit] = (),
    ) -> SharedUpdate:
        """The federated train step on this device's current records (`client.train_step`).

        `ledger` is the coordinator's edit ledger: the shared model is its B
        factors plus those edits, so both are taken before training.
        """
        state = {key: torch.from_numpy(np.array(value)) for key, value in global_b.items()}
        with self._lock:
            examples = examples_from_records(list(self.store.records()))
            if not examples:
                raise DaemonError("the device holds no records to train on")
            self.model.shared_edits.replace(self._merged_ledger(ledger))
            update = train_shared(
                self.model, state, examples, steps, self.config.shared_train, seed
            )
            self._settle_device_edits()
            self._save_shared(model_version)
        # The reply does not wait for the export: the round trip is the scheduler's speed.
        threading.Thread(target=self._export_locked, name="export", daemon=True).start()
        return update

    def holdings(self) -> Holdings:
        """This device's announcement: its salt and the salted hash of every subject it holds."""
        hashes = sorted(subject_hash(self.salt, s) for s in self.store.subject_ids())
        return Holdings(self.salt, tuple(hashes))

    def unlearn(
        self, announced: str, request_id: str, selectors: Sequence[RecordSelector] = ()
    ) -> UnlearnAnswer:
        """Forget the subject announced as `announced` (only the records `selectors` pick,
        when given): edit both models, then shred.

        Order matters for "nothing accepted is lost": the edits (and the
        sketch without the subject) are saved first, then the subject is
        shredded, then the export follows. A crash between the saves and the
        shred leaves the saved edits in place and the records readable; the
        coordinator's retry finds the edits by request id, computes only a
        missing one, and shreds.
        """
        with self._lock:
            subject_id = next(
                (s for s in self.store.subject_ids() if subject_hash(self.salt, s) == announced),
                None,
            )
            name = edit_name(request_id, self.salt)
            shared_id = SHARED_EDIT_PREFIX + name
            done = next((e for e in self.model.shared_edits.edits if e.edit_id == shared_id), None)
            records = [
                r
                for r in (self.store.records(subject_id) if subject_id is not None else ())
                if not selectors or any(s.matches(r) for s in selectors)
            ]
            before = self.progress.personal_version
            if not records:  # nothing (left) to forget: never held, or already shredded
                return UnlearnAnswer(
                    held=subject_id is not None or done is not None,
                    shared_edit=done,
                    personal_version_before=before,
                    personal_version_after=before,
                    shared_version=self.progress.shared_version,
                )
            result = unlearn_subject(
                self.model,
                self.learner.history,
                self.learner.factors,
                records,
                name,
                self.config.unlearning,
            )
            # Older versions still know the subject: keep only the edited ones. The device
            # edit and the sketch without the subject's keys are one file, so they go together.
            if result.downdate_tokens:
                self._forget_keys(result)
                self._save_personal(keep=1)
            if result.shared_edit is not None and done is None:
                self._save_shared(self._shared_model_version(), keep=1)
            deleted = self.store.delete_records(subject_id, set(records).__contains__)
            self._export(keep=1)
            prompts = [(r.prompt or "", r.completion or "") for r in records if r.kind == "pair"]
            measurements = {
                **result.measurements,
                "onnx_forget_em": self._served_exact_match(prompts),
            }
            return UnlearnAnswer(
                held=True,
                shared_edit=result.shared_edit,
                measurements=measurements,
                personal_version_before=before,
                personal_version_after=self.progress.personal_version,
                shared_version=self.progress.shared_version,
                records_deleted=deleted.records_deleted,
            )

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        return self.served.generator().generate(list(prompts), params)

    def status(self) -> DaemonStatus:
        return DaemonStatus(
            records=self.store.count(),
            subjects=len(self.store.subjects()),
            pending=self.pending(),
            trained_through=self.progress.trained_through,
            block=self.learner.block,
            bursts=self.progress.bursts,
            export=current_export(self.data.onnx_exports),
            personal_version=self.progress.personal_version,
            shared_version=self.progress.shared_version,
        )

    # -- inside ---------------------------------------------------------------

    def _next_records(self) -> list[tuple[int, Record]]:
        out = []
        for numbered in self.store.numbered_records(after=self.progress.trained_through):
            out.append(numbered)
            if len(out) >= self.config.max_burst_records:
                break
        return out

    def _burst_steps(self, new: int) -> int:
        """The fixed schedule's steps (only when `epochs_per_burst` is given)."""
        assert self.config.epochs_per_burst is not None
        examples = new + self.config.learner.replay.replay_count(new)
        passes = self.config.epochs_per_burst * examples / self.config.learner.train.batch_size
        return max(1, min(self.config.max_steps_per_burst, math.ceil(passes)))

    def _forget_keys(self, result: SubjectUnlearning) -> None:
        """Take the subject's keys out of the learner's sketch (it must not protect them)."""
        for name, total in result.downdate.items():
            self.learner.history.sums[name] -= total
        self.learner.history.tokens -= result.downdate_tokens

    def _settle_device_edits(self) -> None:
        """Re-solve this device's edits whose targets drifted after the weights moved."""
        edits = self.model.device_edits.edits
        if edits:
            settled, changed = settle(self.model.model, edits, self.model.shared_edits.edits)
            if changed:
                self.model.device_edits.replace(settled)
                log.info("re-solved %d of %d edits after training moved them", changed, len(edits))

    def _merged_ledger(self, ledger: Sequence[LayerEdit]) -> list[LayerEdit]:
        """The coordinator's ledger, plus this device's own shared edits it does not hold yet
        (the coordinator has not taken them in yet)."""
        known = {e.edit_id for e in ledger}
        local = [e for e in self.model.shared_edits.edits if e.edit_id not in known]
        return [*ledger, *local]

    def _shared_model_version(self) -> int:
        try:
            return int(load_adapter(self.adapter_root, SHARED).metadata["model_version"])
        except (NotFoundError, KeyError):
            return -1

    def _save_shared(self, model_version: int, keep: int | None = None) -> None:
        extra = {
            _LEDGER_PREFIX + key: torch.from_numpy(value)
            for key, value in edits_to_arrays(self.model.shared_edits.edits).items()
        }
        stored = save_adapter(
            self.adapter_root,
            SHARED,
            self.model.adapter_state(SHARED),
            self.model.model.peft_config[SHARED],
            {"model_version": model_version},
            extra=extra,
            **({} if keep is None else {"keep": keep}),
        )
        self.progress.shared_version = stored.version

    def _served_exact_match(self, pairs: list[tuple[str, str]]) -> float:
        """Exact match of the ONNX export on (prompt, completion) pairs: what the device serves."""
        if not pairs:
            return float("nan")
        answers = self.generate([p for p, _ in pairs], SamplingParams(max_new_tokens=12))
        hits = sum(
            normalise_answer(a.text) == normalise_answer(c)
            for a, (_, c) in zip(answers, pairs, strict=True)
        )
        return hits / len(pairs)

    def _save_personal(self, keep: int | None = None) -> None:
        state = self.learner.export_state()
        metadata = {
            "trained_through": self.progress.trained_through,
            "block_records": self.progress.block_records,
            "block": state.block,
            "designed": state.designed,
            "consolidations": state.consolidations,
            "sketch_tokens": state.sketch_tokens,
        }
        extra = {_SKETCH_PREFIX + name: total for name, total in state.sketch.items()}
        for key, value in edits_to_arrays(self.model.device_edits.edits).items():
            extra[_EDIT_PREFIX + key] = torch.from_numpy(value)
        stored = save_adapter(
            self.adapter_root,
            PERSONAL,
            self.model.adapter_state(PERSONAL),
            self.model.model.peft_config[PERSONAL],
            metadata,
            extra=extra,
            **({} if keep is None else {"keep": keep}),
        )
        self.progress.personal_version = stored.version

    def _restore(self) -> None:
        """Take back the saved adapters and the learner's state; a fresh device has none."""
        try:
            personal = load_adapter(self.adapter_root, PERSONAL)
        except NotFoundError:
            personal = None
        except IntegrityError as error:
            raise DaemonError(
                f"no intact version of the personal adapter is left ({error}); restore "
                f"{self.adapter_root} from a backup, or move it away to start learning afresh"
            ) from error
        if personal is not None:
            meta = personal.metadata
            try:
                self.model.load_adapter_state(PERSONAL, personal.state)
                self.learner.restore_state(
                    LearnerState(
                        block=int(meta["block"]),
                        designed=bool(meta["designed"]),
                        consolidations=int(meta["consolidations"]),
                        sketch_tokens=int(meta["sketch_tokens"]),
                        sketch={
                            name.removeprefix(_SKETCH_PREFIX): total
                            for name, total in personal.extra.items()
                            if name.startswith(_SKETCH_PREFIX)
                        },
                    )
                )
                self.model.device_edits.replace(_saved_edits(personal.extra, _EDIT_PREFIX))
            except (KeyError, ValueError) as error:
                raise DaemonError(
                    f"the saved personal adapter {personal.version.path} does not fit this "
                    f"model and configuration ({error}); restore the matching model or move "
                    "the adapter away to start learning afresh"
                ) from error
            self.progress.trained_through = int(meta["trained_through"])
            self.progress.block_records = int(meta["block_records"])
            self.progress.personal_version = personal.version.version
        try:
            shared = load_adapter(self.adapter_root, SHARED)
        except NotFoundError:
            return
        try:
            self.model.load_adapter_state(SHARED, shared.state)
            self.model.shared_edits.replace(_saved_edits(shared.extra, _LEDGER_PREFIX))
        except ValueError as error:
            raise DaemonError(
                f"the saved shared adapter {shared.version.path} does not fit this model "
                f"({error}); move it away to take the next one from the coordinator"
            ) from error
        self.progress.shared_version = shared.version.version

    def _export_locked(self) -> None:
        with self._lock:
            self._export()

    def _export(self, keep: int = 2) -> Path:
        started = time.perf_counter()
        export = ensure_export(
            self.model.merged_copy(),
            [],
            self.data.onnx_exports,
            self.config.device,
            self.model.tokenizer,
            keep=keep,
            weights=self.config.served_weights,
        )
        log.info("export %s ready in %.1f s", export.name[:12], time.perf_counter() - started)
        return export


def _saved_edits(extra: Mapping[str, torch.Tensor], prefix: str) -> list[LayerEdit]:
    return edits_from_arrays(
        {k.removeprefix(prefix): v.numpy() for k, v in extra.items() if k.startswith(prefix)}
    )


def _bounded(train: LoraTrainConfig, tokens: int) -> LoraTrainConfig:
    """`train` with `tokens` as its chunk bound, unless it sets one of its own."""
    return train if train.max_batch_tokens is not None else replace(train, max_batch_tokens=tokens)
