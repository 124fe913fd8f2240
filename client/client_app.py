"""Lethe's Flower ClientApp: a SuperNode's train handler.

A SuperNode starts a new process for every message, so this handler holds
no model. On a real device it asks the warm device daemon over its local
channel (`client.device_service`) to run the federated train step; the
node's `--node-config "data-dir='...'"` says where that device lives. For a
simulated fleet (the request names a workload) it trains the simulated task
(`coordinator.simulation.task`) on its client's share of the data.

`slowdown` in the node config (a number >= 1) makes a device that slow on
purpose: after training it waits (slowdown - 1) times the training time, so
tests can run fleets of very different speed on one machine.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.fl_messages import TrainReply, TrainRequest

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    request = TrainRequest.from_content(message.content)
    started = time.perf_counter()
    if request.clients > 0:
        reply = _train_simulated(request)
    else:
        reply = _train_on_device(request, context)
    slowdown = float(context.node_config.get("slowdown", 1.0))
    if slowdown < 1:
        raise ValueError(f"node config slowdown must be at least 1, got {slowdown}")
    elapsed = time.perf_counter() - started
    time.sleep((slowdown - 1) * elapsed)
    if slowdown > 1:  # the scheduler must see the node as slow as it is
        reply = TrainReply(
            reply.delta,
            reply.version,
            reply.samples,
            reply.seconds_per_step * slowdown,
            reply.loss,
        )
    return Message(reply.to_content(), reply_to=message)


def _train_on_device(request: TrainRequest, context: Context) -> TrainReply:
    from client.device_channel import DeviceClient
    from shared.paths import DataDir, default_data_dir

    data_dir = context.node_config.get("data-dir")
    data = DataDir(Path(str(data_dir)) if data_dir else default_data_dir())
    with DeviceClient(data.device) as device:
        answer = device.train_shared(request.model, request.steps, request.seed, request.version)
    return TrainReply(
        answer.delta, answer.model_version, answer.samples, answer.seconds_per_step, answer.loss
    )


def _train_simulated(request: TrainRequest) -> TrainReply:
    task = _task(request.task_seed)
    x, y = task.client_data(request.client_index, request.clients, request.dirichlet_alpha)
    started = time.perf_counter()
    delta = task.train(request.model, x, y, request.steps, request.seed)
    seconds = (time.perf_counter() - started) / max(request.steps, 1)
    return TrainReply(delta, request.version, len(y), seconds, float("nan"))


@cache
def _task(seed: int):  # noqa: ANN202 (a simulation-only import stays inside)
    from coordinator.simulation.task import Task

    return Task.create(seed)
