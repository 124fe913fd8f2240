"""Lethe's Flower ServerApp: the coordinator on Flower's Grid, push and non-blocking pull.

Two modes, one core (`coordinator.core`):
- `deployment` (real devices): the wall-clock runner (`coordinator.runner`)
  over the Grid. Work goes out the moment the policy decides, replies are
  pulled every few tens of milliseconds and handled as they come; error
  replies (expired TTL, a node gone) make the node leave its group, whose
  deadline still holds; nodes that connect mid-run join. State is durable
  (`coordinator.state`): a restarted coordinator resumes the run.
  Between its scheduling work the loop carries deletion requests from the
  API's store to the devices that hold the subject and into the shared
  model's edit ledger (`coordinator.deletions.propagation`); train messages
  carry the ledger, so every device serves the shared model with the edits.
- `virtual` (a simulated fleet, `lethe simulate`): the virtual clock
  (`coordinator.simulation.clock`) decides when each reply counts; Flower's
  simulation runtime does the training.

Settings come from Flower's run config (`--run-config "policy='fedbuff'"`),
checked by `ServerSettings.from_mapping`; unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.unlearning.edits import LayerEdit, edits_to_arrays
from coordinator.core import Work
from coordinator.deletions.propagation import Answer, Propagator
from coordinator.run_config import RunConfig, typed_value
from coordinator.runner import WallClockConfig, run_wall_clock
from coordinator.simulation.clock import ClockConfig, VirtualResult, draw_speeds, run_virtual
from coordinator.simulation.task import Task
from coordinator.state import StateStore
from shared.fl_messages import (
    MessageError,
    TrainReply,
    TrainRequest,
    UnlearnQuery,
    UnlearnResult,
    announce_query,
    holdings_of,
)
from shared.paths import DataDir, default_data_dir

log = logging.getLogger(__name__)
TRAIN = "train"
QUERY = "query"
PROPAGATION_EVERY_S = 0.5


@dataclass(frozen=True)
class ServerSettings:
    mode: str = "deployment"
    run_name: str = "default"
    data_dir: str = ""  # the coordinator's data directory ("": $LETHE_DATA_DIR or ~/.lethe)
    state_url: str = ""  # "": SQLite in DATA_DIR/coordinator
    deletions_url: str = ""  # the deletion API's store ("": SQLite in DATA_DIR/coordinator)
    ttl_s: float = 600.0
    time_limit_s: float = 0.0  # 0: no limit
    poll_s: float = 0.05
    lost_slack_s: float = 30.0  # work not back after 4x its expected time + this is given up
    model: str = "default"  # deployment: the base model (stored name or directory)
    device: str = "auto"
    # virtual mode: the simulated fleet
    clients: int = 0  # wait for this many nodes before starting (0: whoever is there)
    budget: float = 4000.0
    speeds: str = "exponential"
    dirichlet_alpha: float = 0.5
    fleet_seed: int = 1
    result_file: str = ""  # virtual mode: where to write the run's curve as JSON

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> tuple[ServerSettings, RunConfig]:
        own = {f.name for f in dataclasses.fields(cls)}
        mine, rest = {}, {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in own:
                mine[name] = typed_value(key, value, type(getattr(cls, name)))
            else:
                rest[key] = value
        settings = cls(**mine)
        if settings.mode not in ("deployment", "virtual"):
            raise ValueError(f"mode must be 'deployment' or 'virtual', got {settings.mode!r}")
        return settings, RunConfig.from_mapping(rest)

    def data(self) -> DataDir:
        return DataDir(Path(self.data_dir).expanduser() if self.data_dir else default_data_dir())

    def state_files(self) -> Path:
        return self.data().root / "coordinator"

    def database_url(self) -> str:
        return self.state_url or f"sqlite:///{self.state_files() / 'coordinator.db'}"


class GridFleet:
    """The runner's `Fleet` on Flower's Grid: push work, pull whatever replies are in."""

    def __init__(
        self,
        grid: Grid,
        ttl_s: float,
        node_ids: dict[int, int] | None = None,
        workload: dict[str, Any] | None = None,
        state: StateStore | None = None,
        ledger: Callable[[], list[LayerEdit]] = list,
    ) -> None:
        self.grid = grid
        self.ttl_s = ttl_s
        self.state = state  # deployment: the holdings replies announce are recorded here
        self.ledger = ledger  # the edit ledger every train message carries
        self.waiting: dict[str, int] = {}  # message id -> coordinator node
        self.arrived: dict[str, tuple[int, TrainReply | None]] = {}  # pulled, not yet taken
        # A simulated fleet numbers nodes 0..N-1 (speeds and data follow the index)
        # and tells each ClientApp which workload to train.
        self.to_grid = node_ids
        self.workload = workload or {}
        self.sent_at: dict[str, float] = {}  # message id -> when the work went out
        self.forgotten_at: dict[int, float] = {}  # node -> when it last forgot a subject

    def node_ids(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def send(self, work: Work, seed: int) -> str:
        ledger = edits_to_arrays([edit.factors_only() for edit in self.ledger()])
        request = TrainRequest(
            work.model, work.steps, work.version, seed, **self._workload(work), ledger=ledger
        )
        destination = work.node if self.to_grid is None else self.to_grid[work.node]
        message = Message(request.to_content(), destination, TRAIN, ttl=self.ttl_s)
        [message_id] = list(self.grid.push_messages([message]))
        self.waiting[message_id] = work.node
        self.sent_at[message_id] = time.monotonic()
        return message_id

    def forgot(self, node: int) -> None:
        """`node` is forgetting a subject (told when asked and again when done): work it was
        sent before now may have trained on the subject's records, so its answers are
        refused (the node gets new work)."""
        self.forgotten_at[node] = time.monotonic()

    def poll(self) -> list[tuple[int, TrainReply | None]]:
        self._pull()
        replies = list(self.arrived.values())
        self.arrived.clear()
        return replies

    def poll_for(self, message_id: str, sleep_s: float) -> TrainReply | None:
        """Wait for one message's reply (the virtual clock takes them in its own order)."""
        while message_id not in self.arrived:
            self._pull()
            if message_id not in self.arrived:
                time.sleep(sleep_s)
        return self.arrived.pop(message_id)[1]

    def _pull(self) -> None:
        if self.waiting:
            for reply in self.grid.pull_messages(list(self.waiting)):
                self.arrived[reply.metadata.reply_to_message_id] = self._parse(reply)

    def _parse(self, reply: Message) -> tuple[int, TrainReply | None]:
        message_id = reply.metadata.reply_to_message_id
        node = self.waiting.pop(message_id)
        sent_at = self.sent_at.pop(message_id, 0.0)
        if sent_at < self.forgotten_at.get(node, -1.0):
            log.warning(
                "node %d: update refused, it may hold a subject it has since forgotten", node
            )
            return node, None
        if reply.has_error():
            log.warning("node %d replied with an error: %s", node, reply.error.reason)
            return node, None
        try:
            parsed = TrainReply.from_content(reply.content)
        except MessageError as error:
            log.warning("node %d sent a malformed reply: %s", node, error)
            return node, None
        if parsed.holdings is not None and self.state is not None:
            self.state.record_holdings(node, parsed.holdings)
        return node, parsed

    def _workload(self, work: Work) -> dict[str, Any]:
        if self.to_grid is None:
            return {}
        return {"client_index": work.node, **self.workload}


class GridQueries:
    """Unlearn queries over the Grid (Flower's "query" messages), for the `Propagator`."""

    def __init__(self, grid: Grid, ttl_s: float) -> None:
        self.grid = grid
        self.ttl_s = ttl_s
        self.waiting: dict[str, tuple[int, Callable[[RecordDict], Answer]]] = {}

    def connected(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def send(self, node: int, query: UnlearnQuery) -> str:
        return self._push(node, query.to_content(), UnlearnResult.from_content)

    def announce(self, node: int) -> str:
        return self._push(node, announce_query(), holdings_of)

    def poll(self) -> list[tuple[str, int, Answer, str]]:
        if not self.waiting:
            return []
        out: list[tuple[str, int, Answer, str]] = []
        for reply in self.grid.pull_messages(list(self.waiting)):
            handle = reply.metadata.reply_to_message_id
            node, parse = self.waiting.pop(handle)
            if reply.has_error():
                out.append((handle, node, None, reply.error.reason))
                continue
            try:
                out.append((handle, node, parse(reply.content), ""))
            except MessageError as error:
                out.append((handle, node, None, f"malformed answer: {error}"))
        return out

    def _push(self, node: int, content: RecordDict, parse: Callable[[RecordDict], Answer]) -> str:
        message = Message(content, node, QUERY, ttl=self.ttl_s)
        [message_id] = list(self.grid.push_messages([message]))
        self.waiting[message_id] = (node, parse)
        return message_id


class FlowerTransport:
    """The virtual clock's transport over the Grid (simulation runtime)."""

    def __init__(self, fleet: GridFleet, poll_s: float) -> None:
        self.fleet = fleet
        self.poll_s = poll_s

    def send(self, work: Work, seed: int) -> object:
        return self.fleet.send(work, seed)

    def receive(self, handle: object) -> TrainReply | None:
        return self.fleet.poll_for(str(handle), self.poll_s)


def run_virtual_on_grid(grid: Grid, settings: ServerSettings, config: RunConfig) -> VirtualResult:
    """A simulated fleet, trained by Flower's ClientApps, timed by the virtual clock."""
    # Simulated nodes register one by one: wait for the whole fleet, or the run
    # would depend on how many happened to be up.
    wanted = max(settings.clients, 1)
    deadline = time.monotonic() + 300
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < wanted:
        raise RuntimeError(f"only {len(nodes)} of {wanted} simulated nodes connected in 300 s")
    task = Task.create(settings.fleet_seed)
    workload = {
        "task_seed": settings.fleet_seed,
        "clients": len(nodes),
        "dirichlet_alpha": settings.dirichlet_alpha,
    }
    fleet = GridFleet(grid, settings.ttl_s, dict(enumerate(nodes)), workload)
    core = config.make_coordinator(task.initial_model())
    speeds = draw_speeds(settings.speeds, len(nodes), settings.fleet_seed)
    clock = ClockConfig(budget=settings.budget, seed=settings.fleet_seed)
    return run_virtual(core, FlowerTransport(fleet, 0.005), speeds, task.accuracy, clock)


def run_deployment(grid: Grid, settings: ServerSettings, config: RunConfig) -> None:
    from coordinator.deletions.layout import ApiFiles
    from coordinator.deletions.store import DeletionStore
    from coordinator.shared_model import SharedModel, SharedModelConfig
    from edge_models.model_store import resolve_model
    from shared.receipts import ensure_signing_key

    files = settings.state_files()
    files.mkdir(parents=True, exist_ok=True)
    store = StateStore(settings.database_url(), files, settings.run_name)
    api = ApiFiles(settings.data().root)
    deletions = DeletionStore(settings.deletions_url or api.url())
    model_dir = resolve_model(settings.model, settings.data().models)
    shared = SharedModel(SharedModelConfig(str(model_dir), settings.device))
    saved = store.start(config.policy, dataclasses.asdict(config), shared.initial_b())
    core = config.make_coordinator(shared.initial_b(), journal=store)
    if saved is not None:
        core.restore(saved)
        log.info("resumed run %r at version %d", settings.run_name, core.version)
    shared.load(core.version, core.model, store.ledger())
    if saved is None:
        for name, value in shared.measure().items():
            store.record_metric(0, name, value)

    def aggregated(version: int, model: dict) -> None:
        shared.load(version, model, store.ledger())
        for edit in shared.settle_ledger():
            store.revise_edit(edit)
            log.info("ledger edit %s re-solved for version %d", edit.edit_id, version)
        metrics = shared.measure()
        for name, value in metrics.items():
            store.record_metric(version, name, value)
        log.info("version %d: %s", version, metrics)

    fleet = GridFleet(
        grid, settings.ttl_s, state=store, ledger=lambda: shared.device_model.shared_edits.edits
    )
    propagator = Propagator(
        deletions,
        store,
        GridQueries(grid, settings.ttl_s),
        shared,
        ensure_signing_key(api.signing_key),
        forgot=fleet.forgot,
    )

    last_step = [0.0]

    def between() -> None:
        if time.monotonic() - last_step[0] < PROPAGATION_EVERY_S:
            return
        last_step[0] = time.monotonic()
        try:
            grew = propagator.step()
        except Exception:  # the deletions' database, say: requests wait, training goes on
            log.exception("deletion propagation failed this time; it will try again")
            return
        if grew:  # new edits joined the ledger: serve them from now on
            shared.load(core.version, core.model, store.ledger())

    wall = WallClockConfig(
        poll_s=settings.poll_s,
        lost_slack_s=settings.lost_slack_s,
        max_versions=config.max_versions,
        time_limit_s=settings.time_limit_s or None,
        seed=config.seed,
    )
    try:
        run_wall_clock(
            core,
            fleet,
            wall,
            resumed=saved is not None,
            on_version=aggregated,
            between=between,
            may_train=lambda node: not propagator.owes(node),
        )
    finally:
        deletions.close()
        store.close()


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `overrides` (from `lethe simulate`) win over the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("coordinator").setLevel(logging.INFO)
        settings, config = ServerSettings.from_mapping(
            {**dict(context.run_config), **dict(overrides or {})}
        )
        if settings.mode == "virtual":
            result = run_virtual_on_grid(grid, settings, config)
            if settings.result_file:
                Path(settings.result_file).write_text(json.dumps(virtual_summary(result)))
            return
        run_deployment(grid, settings, config)

    return app


def virtual_summary(result: VirtualResult) -> dict[str, Any]:
    return {
        "times": result.curve.times,
        "versions": result.curve.versions,
        "accuracies": result.curve.accuracies,
        "updates": result.updates,
        "aggregations": result.aggregations,
        "dispatch_steps": {str(k): v for k, v in result.dispatch_steps.items()},
        "wall_s": result.wall_s,
        "overhead_ms_per_update": result.overhead_ms_per_update,
    }


app = make_server_app()
