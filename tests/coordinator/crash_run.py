"""A coordinator process for the kill -9 test: the wall-clock runner, a durable SQLite state,
and a fleet of three local threads of different speed training the simulated task.

    python crash_run.py STATE_DIR MAX_VERSIONS
"""

from __future__ import annotations

import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordinator.core import Coordinator, Work
from coordinator.run_config import RunConfig
from coordinator.runner import WallClockConfig, run_wall_clock
from coordinator.simulation.fleet import ClientTrainer
from coordinator.simulation.task import Task
from coordinator.state import StateStore
from shared.fl_messages import TrainReply

SECONDS_PER_STEP = {0: 0.008, 1: 0.010, 2: 0.013}
CONFIG = RunConfig(policy="fedcompass", q_min=5, q_max=20)


class ThreadFleet:
    def __init__(self, task: Task) -> None:
        self.trainer = ClientTrainer(task, len(SECONDS_PER_STEP), 0.5)
        self.pool = ThreadPoolExecutor(max_workers=len(SECONDS_PER_STEP))
        self.replies: queue.Queue[tuple[int, TrainReply]] = queue.Queue()

    def node_ids(self) -> set[int]:
        return set(SECONDS_PER_STEP)

    def send(self, work: Work, seed: int) -> None:
        def run() -> None:
            reply = self.trainer(work, seed)
            time.sleep(work.steps * SECONDS_PER_STEP[work.node])
            self.replies.put((work.node, reply))

        self.pool.submit(run)

    def poll(self) -> list[tuple[int, TrainReply | None]]:
        out: list[tuple[int, TrainReply | None]] = []
        while not self.replies.empty():
            out.append(self.replies.get())
        return out


def main(state_dir: Path, max_versions: int) -> None:
    task = Task.create(7)
    store = StateStore(f"sqlite:///{state_dir / 'state.db'}", state_dir, "crash")
    saved = store.start(CONFIG.policy, {}, task.initial_model())
    core = Coordinator(CONFIG.make_policy(), task.initial_model(), journal=store)
    if saved is not None:
        core.restore(saved)
    print(f"START {core.version} {len(core.pending)}", flush=True)
    wall = WallClockConfig(poll_s=0.005, discover_s=0.05, max_versions=max_versions, seed=7)
    run_wall_clock(core, ThreadFleet(task), wall, resumed=saved is not None)
    print(f"DONE {core.version}", flush=True)
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
