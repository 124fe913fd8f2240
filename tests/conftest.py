"""Shared fixtures: a tokenizer and a random-weight default Llama, built once per test run."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.continual import ReplayConfig
from client.daemon import DaemonConfig
from client.learner import LearnerConfig
from client.lora_training import LoraTrainConfig
from edge_models.default_model import default_llama_config
from edge_models.tokenizer import train_tokenizer

SUBJECTS = ("alice", "bob", "the courier", "my neighbour", "a tired nurse", "the old baker")
VERBS = ("paints", "repairs", "forgets", "carries", "borrows", "sells")
OBJECTS = ("a red bicycle", "the kitchen door", "her phone 0612", "seven apples", "the blue map")
PLACES = ("at dawn.", "in the garden.", "near station 42.", "every friday.")
# 720 short sentences: enough for a byte-level BPE to learn real merges.
SENTENCES = [" ".join(parts) for parts in itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    # Asks for 512 tokens; the sentences hold fewer merges, so the vocabulary is smaller.
    return train_tokenizer(SENTENCES, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The default architecture with random weights; treat as read-only (tests share it)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(default_llama_config(len(tiny_tokenizer))).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_llama: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> Path:
    """The tiny model saved as a model directory, for device daemons; treat as read-only."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_daemon_config(tiny_model_dir: Path) -> DaemonConfig:
    """A device daemon on the tiny model that trains in a few small steps."""
    learner = LearnerConfig(
        block_rank=2,
        blocks=2,
        replay=ReplayConfig(0.5),
        train=LoraTrainConfig(lr=1e-2, batch_size=4),
    )
    return DaemonConfig(
        model=str(tiny_model_dir),
        device="cpu",
        max_burst_records=4,
        max_steps_per_burst=3,
        records_per_block=4,
        learner=learner,
    )


@pytest.fixture(scope="session")
def built_default_model(tmp_path_factory: pytest.TempPathFactory):
    """A real build of the default model (CPU), run once per test session.

    The schedule counts steps, not seconds (`time_budget_s=None`), so the model
    is the same however busy the machine is; the step count is what an idle
    2-core machine fits in `lethe model build`'s 100 s budget. Returns
    (models root, ModelVersion, BuildReport); treat the files as read-only.
    """
    from edge_models.default_model import BuildConfig, build_default_model

    models_root = tmp_path_factory.mktemp("models")
    config = BuildConfig(device="cpu", steps=1200, time_budget_s=None)
    version, report = build_default_model(models_root, config)
    return models_root, version, report


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server (pgserver's bundled binaries), started once per session."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


class Processes:
    """Real processes a test starts on loopback (each in its own process group, with its log in
    the test's directory), all stopped at the end with everything they started in turn."""

    BIN = Path(sys.executable).parent

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "PATH": f"{self.BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self, name: str, *command: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **env},
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=self.env, check=False
        )

    def stop_all(self) -> None:
        """SIGTERM every group (a SuperNode's ClientApp processes too), SIGKILL what lingers."""
        for process in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def start_daemon(self, name: str, root: Path, *options: str) -> subprocess.Popen[bytes]:
        """`lethe client run` on the data directory `root`, one training thread (three
        daemons and Flower share two cores), CPU."""
        command = ("client", "run", "--poll", "0.2", "--threads", "1", "--device", "cpu")
        return self.start(
            name, str(self.BIN / "lethe"), *command, *options, LETHE_DATA_DIR=str(root)
        )

    def start_superlink(self, port: int) -> subprocess.Popen[bytes]:
        return self.start(
            "superlink",
            str(self.BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(self.logs / "superlink.db"),
        )

    def start_supernode(self, name: str, port: int, node_config: str) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            str(self.BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(self.free_port()),
            "--node-config",
            node_config,
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    @staticmethod
    def wait_until(check: Callable[[], object], what: str, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = check()
            except Exception:  # noqa: BLE001 (not up yet)
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()
    for process in started.running:
        assert process.poll() is not None
