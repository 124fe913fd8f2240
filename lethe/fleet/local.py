"""A whole Lethe fleet on this machine, and the story the demo tells with it.

`LocalFleet.start` brings up, as separate processes on loopback and secured
as in production (a private CA from `shared.pki`, TLS everywhere, SuperNode
authentication): three device daemons (`lethe client run`) each keeping a
Flower SuperNode with its own artificial slowdown, `lethe coordinator` with
the SuperLink it starts and FedCompass, the devices enrolled with `lethe node
register`, and the deletion API (`lethe api serve`). A feeder thread streams
each device's synthetic records into its inbox a few at a time, as a user's
apps would. `LocalFleet.forget_someone` then waits for a few versions of the
shared model, asks device 0 what it knows about one of its people (one with a
canary secret), files a deletion request for that person through the gRPC API,
follows it to VERIFIED, checks the signed receipt, and asks the device again.

Everything lives under one folder (`FleetPlan.root`): `models/` (the default
model, built once), `coordinator/`, `device0..2/` and `logs/`. Leaving the
`with` block stops every process, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.device_channel import DeviceClient
from coordinator.console.source import StoreLocation, StoreSource
from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.client import DeletionClient, signed_receipt
from coordinator.deletions.layout import ApiFiles
from coordinator.state import StateStore
from edge_models.corpus import Subject, build_corpus, device_stream, fact_pairs, partition
from edge_models.default_model import DEFAULT_MODEL_NAME, BuildConfig, build_default_model
from edge_models.evaluation import normalise_answer
from edge_models.model_store import ModelStoreError, current, verify
from edge_models.pretrained import import_packaged
from lethe.fleet.processes import BIN, ProcessGroup, wait_until
from shared.flower_cli import free_port, parse_address
from shared.holdings import subject_hash
from shared.paths import DataDir
from shared.pki import CertFiles, init_folder
from shared.proto.lethe.v1 import deletion_pb2
from shared.receipts import ReceiptError, load_public_key, public_key_path, verify_receipt

RUN_NAME = "demo"
APP = "notes"  # the app that files the deletion request (its token may delete p* subjects)
Say = Callable[[str, str], None]  # (stage, what happened)


@dataclass(frozen=True)
class FleetPlan:
    """What the local fleet runs. The defaults are the demo's: three devices of visibly
    different speed, a few dozen records each, a deletion after three versions."""

    root: Path
    slowdowns: tuple[float, ...] = (1.0, 3.0, 9.0)
    records_per_device: int = 30
    first_records: int = 8  # the inbox's first file (device 0: all it gets, and its person's)
    stream_batch: int = 4
    stream_every_s: float = 10.0
    versions_before_deletion: int = 3
    subject_steps: int = 250  # device 0's bursts: enough to know its person well
    seed: int = 0
    device: str = "auto"
    time_limit_s: float = 900.0
    build: BuildConfig = field(default_factory=BuildConfig)
    # The base model of every device and the coordinator: the default one (built), or a
    # packaged pretrained one (imported; `edge_models.pretrained`).
    model: str = DEFAULT_MODEL_NAME

    def __post_init__(self) -> None:
        if len(self.slowdowns) < 1 or min(self.slowdowns) < 1.0:
            raise ValueError("each device needs a slowdown of at least 1.0")
        if self.versions_before_deletion < 1 or self.records_per_device < self.first_records:
            raise ValueError("unusable fleet plan")

    def device_dir(self, index: int) -> Path:
        return self.root / f"device{index}"

    @property
    def coordinator_dir(self) -> Path:
        return self.root / "coordinator"


@dataclass(frozen=True)
class Knowledge:
    """What a device answers about a subject: facts right out of how many, and the canary."""

    facts_right: int
    facts: int
    canary_completed: bool


@dataclass(frozen=True)
class Outcome:
    """How the story ended: the request, its receipt, and the device before and after."""

    request_id: str
    status: str
    seconds_to_verified: float
    subject_id: str
    before: Knowledge
    after: Knowledge
    still_held: bool
    receipt: dict[str, Any] | None
    receipt_verified: bool
    versions: int
    nodes: list[dict[str, Any]]


def fleet_records(plan: FleetPlan) -> tuple[Subject, list[list[dict[str, Any]]]]:
    """The person the demo forgets (one of device 0's, with a canary), and each device's
    stream of other people's records, in the order they are fed."""
    corpus = build_corpus(plan.seed)
    parts = partition(corpus, len(plan.slowdowns), seed=plan.seed)
    subject = next(
        corpus.subject(s) for s in parts[0].subject_ids if corpus.subject(s).canary is not None
    )
    streams = [
        [
            r
            for r in device_stream(corpus, part, seed=plan.seed)
            if r["subject_id"] != subject.subject_id
        ]
        for part in parts
    ]
    return subject, [stream[: plan.records_per_device] for stream in streams]


class LocalFleet:
    """The processes of one local fleet (see the module docstring)."""

    def __init__(self, plan: FleetPlan, say: Say = lambda _stage, _message: None) -> None:
        self.plan = plan
        self.say = say
        self.processes = ProcessGroup(plan.root / "logs")
        self.api_address = f"127.0.0.1:{free_port()}"
        self.superlink = f"127.0.0.1:{free_port()}"
        self.certs = CertFiles(DataDir(plan.coordinator_dir).certs)
        self.app_token = ""
        self.operator_token = ""
        self.subject, self.streams = fleet_records(plan)
        self._state = StoreSource(StoreLocation.in_data_dir(plan.coordinator_dir, RUN_NAME))
        self._stop_feeding = threading.Event()
        self._feeder: threading.Thread | None = None
        # Device 0 holds the person: it gets all its records at once and learns them in one
        # long burst; the others stream theirs. (Long bursts on every new batch would also
        # keep device 0 busy and blur the speeds FedCompass plans by.)
        self._fed = set(range(1, len(plan.slowdowns)))

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop_feeding.set()
        if self._feeder is not None:
            self._feeder.join(timeout=5)
        self.processes.stop_all()
        self._state.close()

    # -- bringing the fleet up ------------------------------------------------------------

    def start(self) -> None:
        plan = self.plan
        models = self._model()
        nodes = [f"device{index}" for index in range(len(plan.slowdowns))]
        init_folder(self.certs, [], nodes, datetime.now(UTC))
        for index, slowdown in enumerate(plan.slowdowns):
            root = plan.device_dir(index)
            if not (root / "models").exists():
                _link_tree(models, root / "models")
            first = self.streams[index][: plan.first_records]
            lines = ([self._subject_records()] if index == 0 else []) + [first]
            self._drop(index, "first", [r for chunk in lines for r in chunk])
            # Device 0 holds the person the demo forgets: many passes over its first records, so
            # that it knows them well before it is asked to forget.
            # The others keep the short fixed bursts they always had: a burst that trains until
            # its records are learned holds the daemon for minutes on this 1M model, and the
            # federated work queued behind it would blur the speeds FedCompass plans by.
            burst = (
                ("--epochs-per-burst", "400", "--max-steps-per-burst", str(plan.subject_steps))
                if index == 0
                else ("--epochs-per-burst", "20", "--max-steps-per-burst", "150")
            )
            federation = (
                *("--superlink", self.superlink, "--node-config", f"slowdown={slowdown}"),
                *("--node-key", str(self.certs.node_key(nodes[index]))),
                *("--root-certificates", str(self.certs.ca_cert)),
            )
            self.processes.start_daemon(
                f"daemon{index}",
                root,
                *("--model", plan.model),
                *burst,
                *federation,
                device=plan.device,
                poll_s=0.5,
            )
            self.say("devices", f"device {index} started (slowdown x{slowdown:g})")
        for index in range(len(plan.slowdowns)):
            wait_until(lambda index=index: self._status(index), f"device {index}'s daemon", 180)
        # Device 0 learns its person in one long burst first: federated work queued behind
        # it would make device 0 look slow to the scheduler, and its answers come from a
        # model that knows the person.
        self.say("devices", "device 0 learns its records (one long burst)")
        wait_until(self._learned, "device 0 to learn its first records", plan.time_limit_s, 1.0)
        coordinator = plan.coordinator_dir
        if not (coordinator / "models").exists():
            _link_tree(models, coordinator / "models")
        files = ApiFiles(coordinator)
        files.directory.mkdir(parents=True, exist_ok=True)
        self.app_token = add_token(files.tokens, APP, Scope.APP, ["p*"])
        self.operator_token = add_token(files.tokens, "console", Scope.OPERATOR)
        self.processes.start(
            "api",
            str(BIN / "lethe"),
            "api",
            "serve",
            "--data-dir",
            str(coordinator),
            "--address",
            self.api_address,
        )
        # `lethe coordinator` starts the SuperLink (TLS, SuperNode authentication); the
        # devices' SuperNodes join once their keys are registered.
        self.processes.start(
            "coordinator",
            str(BIN / "lethe"),
            "coordinator",
            "--listen",
            self.superlink,
            "--policy",
            "fedcompass",
            "--run-name",
            RUN_NAME,
            "--time-limit",
            str(int(plan.time_limit_s)),
            "--data-dir",
            str(coordinator),
            "--run-config",
            "q-min=4",
            "--run-config",
            "q-max=12",
            "--run-config",
            f"device='{plan.device}'",
            "--run-config",
            f"model='{plan.model}'",
        )
        self.say("coordinator", f"FedCompass coordinator and deletion API on {self.api_address}")
        host, port = parse_address(self.superlink)
        wait_until(lambda: socket.create_connection((host, port), 1), "the SuperLink", 120)
        for node in nodes:
            registered = self.processes.run(
                str(BIN / "lethe"),
                *("node", "register", node, "--superlink", self.superlink),
                *("--data-dir", str(plan.coordinator_dir)),
            )
            if registered.returncode != 0:
                raise RuntimeError(f"registering {node} failed: {registered.stderr[-800:]}")
        self.say("flower", f"SuperLink on {self.superlink} (TLS); {len(nodes)} devices enrolled")
        self._feeder = threading.Thread(target=self._feed, name="feeder", daemon=True)
        self._feeder.start()

    def _model(self) -> Path:
        """The plan's model under root/models, built or imported once (checksums verified)."""
        models = self.plan.root / "models"
        if self.plan.model != DEFAULT_MODEL_NAME:
            version, new = import_packaged(
                self.plan.model, models, log=lambda line: self.say("model", line)
            )
            self.say(
                "model", f"{self.plan.model} v{version.version} {'imported' if new else 'found'}"
            )
            return models
        try:
            verify(current(models, DEFAULT_MODEL_NAME))
            self.say("model", "default model found (checksums verified)")
        except ModelStoreError:
            self.say("model", "building the default model from the synthetic corpus")
            version, report = build_default_model(
                models, self.plan.build, log=lambda line: self.say("model", line)
            )
            self.say(
                "model",
                f"built v{version.version}: fact exact match {report.fact_exact_match:.0%}",
            )
        return models

    def _subject_records(self) -> list[dict[str, Any]]:
        subject = self.subject
        pairs = [
            {"subject_id": subject.subject_id, "prompt": p.prompt, "completion": p.completion}
            for _, p in fact_pairs((subject,))
        ]
        return pairs + [
            {"subject_id": subject.subject_id, "text": m.text} for m in subject.messages
        ]

    def _drop(self, index: int, name: str, records: list[dict[str, Any]]) -> None:
        """Put a file of records into a device's inbox, whole (written aside, then renamed)."""
        inbox = self.plan.device_dir(index) / "device" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        staged = inbox / f".{name}.part"
        staged.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        staged.rename(inbox / f"{name}.jsonl")

    def _feed(self) -> None:
        """Stream the rest of each device's records, a batch at a time."""
        plan = self.plan
        sent = [plan.first_records] * len(self.streams)
        batch = 0
        while not self._stop_feeding.wait(plan.stream_every_s):
            batch += 1
            for index, stream in enumerate(self.streams):
                if index not in self._fed:
                    continue
                chunk = stream[sent[index] : sent[index] + plan.stream_batch]
                if chunk:
                    self._drop(index, f"batch{batch:04d}", chunk)
                    sent[index] += len(chunk)
            if all(s >= len(stream) for s, stream in zip(sent, self.streams, strict=True)):
                return

    def _learned(self) -> bool:
        status = self._status(0)
        return status.records > 0 and status.pending == 0

    def _status(self, index: int) -> Any:
        with DeviceClient(self.plan.device_dir(index) / "device", timeout_s=5) as client:
            return client.status()

    # -- the story --------------------------------------------------------------------------

    def versions(self) -> int:
        """The shared model's newest version (0 before the coordinator has written one).

        Read as the console reads: one read-only engine kept open, nothing created.
        """
        return self._state.read().version

    def knowledge(self) -> Knowledge:
        """What device 0 serves about the subject now (its ONNX export, greedy)."""
        subject = self.subject
        assert subject.canary is not None
        facts = [(pair.prompt, fact.answer) for fact, pair in fact_pairs((subject,))]
        prompts = [p for p, _ in facts] + [subject.canary.prefix]
        with DeviceClient(self.plan.device_dir(0) / "device", timeout_s=300) as client:
            texts = list(client.generate(prompts, max_new_tokens=12).texts)
        right = sum(
            normalise_answer(text) == normalise_answer(answer)
            for text, (_, answer) in zip(texts, facts, strict=False)
        )
        return Knowledge(right, len(facts), subject.canary.secret in texts[-1])

    def forget_someone(self) -> Outcome:
        plan = self.plan
        subject = self.subject
        before = self.knowledge()
        self.say(
            "before",
            f"device 0 answers {before.facts_right}/{before.facts} of {subject.name}'s facts; "
            f"canary {'completed' if before.canary_completed else 'not completed'}",
        )
        seen = 0

        def enough_versions() -> bool:
            nonlocal seen
            now = self.versions()
            if now != seen:
                seen = now
                self.say("training", f"shared model version {now}")
            return now >= plan.versions_before_deletion

        wait_until(enough_versions, "the first versions", plan.time_limit_s, every_s=1.0)
        started = time.monotonic()
        with DeletionClient(
            self.api_address, self.app_token, root_certificates=self.certs.ca_cert.read_bytes()
        ) as client:
            request = wait_until(
                lambda: client.submit(subject.subject_id, f"demo-{subject.subject_id}"),
                "the deletion API",
                60,
            )
            self.say("deletion", f"filed {request.request_id} for {subject.subject_id}")
            last = deletion_pb2.Status.Name(request.status)
            for change in client.watch(request.request_id):
                last = deletion_pb2.Status.Name(change.status)
                reason = f" ({change.reason})" if change.reason else ""
                self.say("deletion", f"{last}{reason}")
            final = client.get(request.request_id)
        seconds = time.monotonic() - started
        receipt, verified = self._check_receipt(final)
        after = self.knowledge()
        self.say(
            "after",
            f"device 0 answers {after.facts_right}/{after.facts} of {subject.name}'s facts; "
            f"canary {'completed' if after.canary_completed else 'not completed'}",
        )
        with DeviceClient(plan.device_dir(0) / "device", timeout_s=30) as device:
            holdings = device.announce()
        still_held = subject_hash(holdings.salt, subject.subject_id) in holdings.subject_hashes
        return Outcome(
            request_id=request.request_id,
            status=last,
            seconds_to_verified=seconds,
            subject_id=subject.subject_id,
            before=before,
            after=after,
            still_held=still_held,
            receipt=receipt,
            receipt_verified=verified,
            versions=self.versions(),
            nodes=self._nodes(),
        )

    def _check_receipt(
        self, request: deletion_pb2.DeletionRequest
    ) -> tuple[dict[str, Any] | None, bool]:
        signed = signed_receipt(request)
        if signed is None:
            return None, False
        key = public_key_path(ApiFiles(self.plan.coordinator_dir).signing_key)
        try:
            return verify_receipt(signed, load_public_key(key)), True
        except ReceiptError as error:
            self.say("receipt", f"receipt does not verify: {error}")
            return None, False

    def _nodes(self) -> list[dict[str, Any]]:
        database = self.plan.coordinator_dir / "coordinator" / "coordinator.db"
        store = StateStore(f"sqlite:///{database}", database.parent, RUN_NAME)
        try:
            updates: dict[int, list[int]] = {}
            for update in store.updates():
                updates.setdefault(update.node, []).append(update.steps)
            return [
                {
                    "node": node.node,
                    "seconds_per_step": node.seconds_per_step,
                    "updates": node.updates,
                    "mean_q": sum(updates.get(node.node, []))
                    / max(1, len(updates.get(node.node, []))),
                }
                for node in store.nodes()
            ]
        finally:
            store.close()


def _link_tree(source: Path, target: Path) -> None:
    """A copy of a model store whose files are hard links: stored versions are immutable, and
    a 540 MB pretrained model need not be written once per device."""
    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:  # another file system: copy
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
