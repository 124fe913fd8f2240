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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client.adapter_store import load_adapter, save_adapter
from client.adapters import PERSONAL, SHARED, AdapterConfig, DeviceModel
from client.inbox import InboxResult, process_inbox
from client.inference import Completion, SamplingParams
from client.learner import ContinualLearner, LearnerConfig, LearnerState
from client.lora_training import LoraTrainConfig
from client.record_store import RecordStore
from client.serving import ServedModel, current_export, ensure_export
from client.train_step import SharedUpdate, train_shared
from edge_models.default_model import DEFAULT_MODEL_NAME
from edge_models.loading import ModelLoadError, load_causal_lm
from edge_models.model_store import resolve_model
from edge_models.training_data import examples_from_records
from shared.paths import DataDir
from shared.records import Record
from shared.versioned_store import IntegrityError, NotFoundError, StoreError

log = logging.getLogger(__name__)

_SKETCH_PREFIX = "sketch."


class DaemonError(RuntimeError):
    """The daemon cannot start or go on as configured; the message says what to do."""


@dataclass(frozen=True)
class DaemonConfig:
    """How the device learns. Burst sizes trade freshness against the cost of an export.

    A burst trains `epochs_per_burst` passes over its training set (new
    records plus replay), at most `max_steps_per_burst` steps; a new block of
    the personal adapter opens after `records_per_block` new records (about
    one domain of the bench's stream, which is what the method was tuned on).
    """

    model: str = DEFAULT_MODEL_NAME
    device: str = "auto"
    seed: int = 0
    poll_s: float = 1.0
    max_burst_records: int = 128
    epochs_per_burst: float = 20.0
    max_steps_per_burst: int = 150
    records_per_block: int = 120
    learner: LearnerConfig = LearnerConfig()
    adapters: AdapterConfig = AdapterConfig()
    shared_train: LoraTrainConfig = field(default_factory=lambda: LoraTrainConfig(batch_size=16))

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.epochs_per_burst <= 0:
            raise ValueError("poll_s and epochs_per_burst must be positive")
        if min(self.max_burst_records, self.max_steps_per_burst, self.records_per_block) < 1:
            raise ValueError("burst sizes and records_per_block must be at least 1")


@dataclass(frozen=True)
class BurstReport:
    """One burst of personal training and what it led to."""

    records: int
    trained_through: int
    block: int
    steps: int
    seconds: float
    loss: float
    consolidation_error: float | None
    export: Path


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
        """Stored records the personal adapter has not trained on yet."""
        return self.store.count(after=self.progress.trained_through)

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
            steps = self._burst_steps(len(new))
            seed = self.config.seed * 1_000_003 + self.progress.bursts
            stats = self.learner.learn(new, steps, seed=seed)
            self.progress.trained_through = numbered[-1][0]
            self.progress.block_records += len(new)
            self.progress.bursts += 1
            self._save_personal()
            export = self._export()
            report = BurstReport(
                records=len(new),
                trained_through=self.progress.trained_through,
                block=self.learner.block,
                steps=stats.steps,
                seconds=stats.seconds,
                loss=stats.mean_loss,
                consolidation_error=consolidation,
                export=export,
            )
            log.info("burst: %s", report)
            return report

    # -- what the federated round asks ---------------------------------------

    def train_shared(
        self, global_b: Mapping[str, np.ndarray], steps: int, seed: int, model_version: int
    ) -> SharedUpdate:
        """The federated train step on this device's current records (`client.train_step`)."""
        state = {key: torch.from_numpy(np.array(value)) for key, value in global_b.items()}
        with self._lock:
            examples = examples_from_records(list(self.store.records()))
            if not examples:
                raise DaemonError("the device holds no records to train on")
            update = train_shared(
                self.model, state, examples, steps, self.config.shared_train, seed
            )
            stored = save_adapter(
                self.adapter_root,
                SHARED,
                self.model.adapter_state(SHARED),
                self.model.model.peft_config[SHARED],
                {"model_version": model_version},
            )
            self.progress.shared_version = stored.version
        # The reply does not wait for the export: the round trip is the scheduler's speed.
        threading.Thread(target=self._export_locked, name="export", daemon=True).start()
        return update

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
        examples = new + self.config.learner.replay.replay_count(new)
        passes = self.config.epochs_per_burst * examples / self.config.learner.train.batch_size
        return max(1, min(self.config.max_steps_per_burst, math.ceil(passes)))

    def _save_personal(self) -> None:
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
        stored = save_adapter(
            self.adapter_root,
            PERSONAL,
            self.model.adapter_state(PERSONAL),
            self.model.model.peft_config[PERSONAL],
            metadata,
            extra=extra,
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
                        },
                    )
                )
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
        self.model.load_adapter_state(SHARED, shared.state)
        self.progress.shared_version = shared.version.version

    def _export_locked(self) -> None:
        with self._lock:
            self._export()

    def _export(self) -> Path:
        started = time.perf_counter()
        export = ensure_export(
            self.model.merged_copy(),
            [],
            self.data.onnx_exports,
            self.config.device,
            self.model.tokenizer,
        )
        log.info("export %s ready in %.1f s", export.name[:12], time.perf_counter() - started)
        return export
