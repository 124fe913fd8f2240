"""Durable adapters: peft round trip, fallback past corruption, refusals, and kill -9 mid-save."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import IO

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from client.adapter_store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    load_adapter,
    save_adapter,
)
from shared.versioned_store import IntegrityError, current, verify, versions

NAME = "personal"
KIND = "adapter"
# A config as the coordinator would send it: plain JSON, so the saver needs no peft.
LORA_DICT = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}


def adapter_state(step: int) -> dict[str, torch.Tensor]:
    """4 MB of LoRA-shaped factors, different for every step and tensor, made in a blink.

    Cheap on purpose: the kill test's savers must spend their time saving, not making data.
    """
    state = {}
    for layer in range(4):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for factor, shape in (("lora_A", (16, 4096)), ("lora_B", (4096, 16))):
                values = torch.arange(65_536, dtype=torch.float32).mul_(step + 1).add_(len(state))
                state[f"{prefix}.{factor}.weight"] = values.reshape(shape)
    return state


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_round_trip_in_peft_format_and_versions_increase(
    base: LlamaForCausalLM, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    # Random B factors too, so that a tensor lost on the way cannot pass as zeros.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    state = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), config))

    first = save_adapter(tmp_path, NAME, state, config, {"base": "abc123", "steps": 40})
    second = save_adapter(tmp_path, NAME, adapter_state(0), LORA_DICT)
    third = save_adapter(tmp_path, NAME, state, config, {"steps": 80})

    assert [first.version, second.version, third.version] == [1, 2, 3]
    assert first.checksum == third.checksum != second.checksum
    loaded = load_adapter(tmp_path, NAME)
    assert loaded.version == third == current(tmp_path, NAME, kind=KIND)
    assert loaded.metadata == {"steps": 80}
    assert loaded.config == config
    assert_same_tensors(loaded.state, state)
    assert sorted(path.name for path in third.path.iterdir()) == [
        CONFIG_FILE,
        WEIGHTS_FILE,
        "manifest.json",
    ]
    # peft itself reads a stored version directly.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), third.path)
    assert_same_tensors(get_peft_model_state_dict(peft_model), state)
    # A dict config is stored as given, with peft filling in its defaults on load.
    stored_dict = json.loads((second.path / CONFIG_FILE).read_text())
    assert stored_dict == LORA_DICT
    assert isinstance(LoraConfig.from_pretrained(str(second.path)), LoraConfig)


def test_flipped_byte_in_current_weights_loads_the_previous_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_adapter(tmp_path, NAME, adapter_state(1), LORA_DICT, {"step": 1})
    bad = save_adapter(tmp_path, NAME, adapter_state(2), LORA_DICT, {"step": 2})
    # The middle of the file is tensor data: safetensors would read it without complaint.
    flip_byte(bad.path / WEIGHTS_FILE)

    with caplog.at_level(logging.WARNING):
        loaded = load_adapter(tmp_path, NAME)

    assert loaded.version.version == 1
    assert loaded.metadata == {"step": 1}
    assert_same_tensors(loaded.state, adapter_state(1))
    assert any(
        "version 2" in record.getMessage() and WEIGHTS_FILE in record.getMessage()
        for record in caplog.records
    )


def test_all_versions_corrupt_is_a_clear_error(tmp_path: Path) -> None:
    for step in (1, 2):
        stored = save_adapter(tmp_path, NAME, adapter_state(step), LORA_DICT)
        flip_byte(stored.path / (WEIGHTS_FILE if step == 1 else CONFIG_FILE))

    with pytest.raises(IntegrityError, match=r"no intact version of adapter 'personal'") as caught:
        load_adapter(tmp_path, NAME)
    assert WEIGHTS_FILE in str(caught.value) and CONFIG_FILE in str(caught.value)


def test_bad_adapters_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    nan = adapter_state(3)
    nan[next(iter(nan))][5, 7] = float("nan")
    inf = adapter_state(3)
    inf[next(reversed(inf))][0, 0] = float("-inf")
    refusals = [
        (nan, LORA_DICT, r"lora_A\.weight' holds NaN or infinite values"),
        (inf, LORA_DICT, r"lora_B\.weight' holds NaN or infinite values"),
        ({}, LORA_DICT, r"has no tensors"),
        ({"w": [1.0, 2.0]}, LORA_DICT, r"'w' is a list, not a named tensor"),
        (adapter_state(3), {"peft_type": "PREFIX_TUNING"}, r"not 'LORA'"),
        (adapter_state(3), {**LORA_DICT, "lora_dropout": float("nan")}, r"config is not JSON"),
    ]
    for state, config, message in refusals:
        with pytest.raises(AdapterError, match=message):
            save_adapter(tmp_path, NAME, state, config)
    assert list(tmp_path.iterdir()) == []

    good = save_adapter(tmp_path, NAME, adapter_state(4), LORA_DICT)
    with pytest.raises(AdapterError, match=r"NaN"):
        save_adapter(tmp_path, NAME, nan, LORA_DICT)
    assert versions(tmp_path, NAME, kind=KIND) == [1]
    assert load_adapter(tmp_path, NAME).version == good


def test_only_the_last_three_versions_are_kept(tmp_path: Path) -> None:
    for step in range(5):
        newest = save_adapter(tmp_path, NAME, adapter_state(step), LORA_DICT, {"step": step})

    assert versions(tmp_path, NAME, kind=KIND) == [3, 4, 5]
    assert current(tmp_path, NAME, kind=KIND) == newest
    assert load_adapter(tmp_path, NAME).metadata == {"step": 4}
    assert save_adapter(tmp_path, NAME, adapter_state(9), LORA_DICT, keep=1).version == 6
    assert versions(tmp_path, NAME, kind=KIND) == [6]


# Imports torch once, then forks a saver per line read (the line is its first step), so
# that five kills cost one import. It never touches a tensor and torch runs on one
# thread (a thread pool does not survive a fork), which keeps the fork safe. A saver
# reports its pid, then every save it begins and completes; the factory reports how
# each saver ended once it has reaped it.
SAVER_FACTORY = (
    "import itertools, json, os, sys\nimport torch\ntorch.set_num_threads(1)\n"
    + inspect.getsource(adapter_state)
    + textwrap.dedent(
        """
        from client.adapter_store import save_adapter

        root, name, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


        def report(*words):
            # One write per line: a pipe write this small is atomic, so a kill never leaves
            # half a line for the factory's next one to run into (print may write a line in
            # pieces, e.g. with PYTHONUNBUFFERED set).
            os.write(1, (" ".join(map(str, words)) + "\\n").encode())


        def save_forever(first_step):
            report("pid", os.getpid())
            for step in itertools.count(first_step):
                state = adapter_state(step)
                report("begin", step)
                stored = save_adapter(root, name, state, config, {"step": step})
                report("saved", step, stored.checksum)


        while line := sys.stdin.readline():
            pid = os.fork()
            if pid == 0:
                try:
                    save_forever(int(line))
                finally:
                    os._exit(1)
            report("died", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
)
KILLS = 5


def read_until(stream: IO[str], verb: str, lines: list[list[str]]) -> list[str]:
    """Append the words of each line to `lines` up to the first starting with `verb`."""
    while words := stream.readline().split():
        lines.append(words)
        if words[0] == verb:
            return words
    raise AssertionError(f"the saver factory ended before {verb!r}: {lines}")


@pytest.mark.timeout(180)
def test_kill_9_at_random_moments_never_leaves_a_partial_adapter_in_use(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # One delay in each 80 ms band, so the kills land at different points of a save.
    delays = [rng.uniform(0.08 * band, 0.08 * (band + 1)) for band in range(KILLS)]
    factory = subprocess.Popen(
        [sys.executable, "-c", SAVER_FACTORY, str(tmp_path), NAME, json.dumps(LORA_DICT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert factory.stdin and factory.stdout
    saved: dict[int, str] = {}
    left_by_last_kill: set[str] = set()
    mid_save_kills = 0
    live_saver: int | None = None
    try:
        for run, delay in enumerate(delays):
            context = f"seed {seed}, run {run}, delay {delay:.3f} s"
            factory.stdin.write(f"{1000 * run}\n")
            factory.stdin.flush()
            lines: list[list[str]] = []
            live_saver = int(read_until(factory.stdout, "pid", lines)[1])
            read_until(factory.stdout, "saved", lines)
            # Its first save removed what the previous kill left behind.
            temporaries = {entry.name for entry in (tmp_path / NAME).glob(".tmp-*")}
            assert not temporaries & left_by_last_kill, context

            time.sleep(delay)
            os.kill(live_saver, signal.SIGKILL)
            died = read_until(factory.stdout, "died", lines)
            live_saver = None
            assert int(died[1]) == -signal.SIGKILL, f"{context}: {lines}"

            saved |= {int(words[1]): words[2] for words in lines if words[0] == "saved"}
            in_flight = int(lines[-2][1]) if lines[-2][0] == "begin" else None
            mid_save_kills += in_flight is not None
            loaded = load_adapter(tmp_path, NAME)
            step = loaded.metadata["step"]
            # The current version itself is intact: no fallback was needed.
            assert loaded.version == current(tmp_path, NAME, kind=KIND), context
            verify(loaded.version)
            # Either a save the saver saw complete, or the one it was killed in after
            # the pointer switch (while pruning, say): never anything else.
            if step != in_flight:
                assert saved.get(step) == loaded.version.checksum, f"{context}: {lines}"
            assert_same_tensors(loaded.state, adapter_state(step))
            left_by_last_kill = {entry.name for entry in (tmp_path / NAME).glob(".tmp-*")}
    finally:
        if live_saver is not None:
            with contextlib.suppress(ProcessLookupError):  # it may have died on its own
                os.kill(live_saver, signal.SIGKILL)
        factory.kill()
        factory.communicate()

    # With saves dominating a saver's loop, at least one kill must land inside one.
    assert mid_save_kills >= 1, f"seed {seed}: every kill fell between saves"
    save_adapter(tmp_path, NAME, adapter_state(7), LORA_DICT)
    assert list((tmp_path / NAME).glob(".tmp-*")) == []
    assert len(versions(tmp_path, NAME, kind=KIND)) == 3
