"""Lethe's Flower ClientApp: a SuperNode's train and unlearn handlers.

A SuperNode starts a new process for every message, so this handler holds
no model. On a real device it asks the warm device daemon over its local
channel (`client.device_service`) to run the federated train step; the
node's `--node-config "data-dir='...'"` says where that device lives. For a
simulated fleet (the request names a workload) it trains the simulated task
(`coordinator.simulation.task`) on its client's share of the data.

`slowdown` in the node config (a number >= 1) makes a device that slow on
purpose: after training it waits (slowdown - 1) times the training time, so
tests can run fleets of very different speed on one machine.

The query handler takes the coordinator's unlearn queries to the daemon: the
daemon edits its models, shreds the subject and answers with the edit of the
shared model (`client.daemon.DeviceDaemon.unlearn`). Replies to both carry
the device's holdings (salted subject hashes), so the coordinator always
knows which devices to ask.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.fl_messages import (
    TrainReply,
    TrainRequest,
    UnlearnQuery,
    UnlearnResult,
    announce_reply,
    is_announce_query,
)

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
            reply.holdings,
        )
    return Message(reply.to_content(), reply_to=message)


@app.query()
def answer_query(message: Message, context: Context) -> Message:
    """An unlearn query, or a request to announce what the device holds."""
    from client.device_channel import DeviceClient
    from shared.records import selectors_to_json

    if is_announce_query(message.content):
        with DeviceClient(_device_dir(context)) as device:
            return Message(announce_reply(device.announce()), reply_to=message)
    query = UnlearnQuery.from_content(message.content)
    with DeviceClient(_device_dir(context)) as device:
        answer = device.unlearn(
            query.request_id, query.subject_hash, selectors_to_json(query.selectors)
        )
    result = UnlearnResult(
        request_id=query.request_id,
        held=answer.held,
        shared_edit=answer.shared_edit,
        measurements=answer.measurements,
        versions={
            "personal-version-before": answer.personal_version_before,
            "personal-version-after": answer.personal_version_after,
            "shared-version": answer.shared_version,
            "records-deleted": answer.records_deleted,
        },
        holdings=answer.holdings,
    )
    return Message(result.to_content(), reply_to=message)


def _device_dir(context: Context) -> Path:
    from shared.paths import DataDir, default_data_dir

    data_dir = context.node_config.get("data-dir")
    return DataDir(Path(str(data_dir)) if data_dir else default_data_dir()).device


def _train_on_device(request: TrainRequest, context: Context) -> TrainReply:
    from client.device_channel import DeviceClient

    with DeviceClient(_device_dir(context)) as device:
        answer = device.train_shared(
            request.model, request.steps, request.seed, request.version, request.ledger
        )
    return TrainReply(
        answer.delta,
        answer.model_version,
        answer.samples,
        answer.seconds_per_step,
        answer.loss,
        answer.holdings,
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
