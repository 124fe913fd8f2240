"""Shared fixtures: a tokenizer and a random-weight default Llama, built once per test run.

The suite runs on two pytest-xdist workers (the slow end-to-end tests mostly wait on
Flower's polling, so two overlap well on two cores). Session fixtures are per worker, so
every test that needs the real default model build runs on one worker (one build), and
so does every test of the PostgreSQL server (one server)."""

from __future__ import annotations

import itertools
import os
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

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one torch thread each, not two each fighting for them.
    torch.set_num_threads(1)

SHARED_BY_GROUP = {
    "built_default_model": "default-model",
    "postgres_url": "postgres",
    "imported_smollm2": "smollm2",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, group in SHARED_BY_GROUP.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


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


@pytest.fixture(scope="session")
def imported_smollm2(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2-135M-Instruct imported from its registry package, once per test session.

    Returns (models root, ModelVersion); treat the files as read-only.
    """
    from edge_models.pretrained import import_packaged

    models_root = tmp_path_factory.mktemp("models")
    version, _new = import_packaged("smollm2", models_root)
    return models_root, version
