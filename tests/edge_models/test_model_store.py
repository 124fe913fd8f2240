"""Versioned model store: versions, integrity checks and crash safety with a real SIGKILL."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edge_models.loading import load_causal_lm
from edge_models.model_store import (
    ModelIntegrityError,
    ModelNotFoundError,
    ModelStoreError,
    current,
    get,
    publish,
    resolve_model,
    verify,
)
from edge_models.tokenizer import train_tokenizer

NAME = "tiny"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(["alice lives at 12 rose street", "the quick brown fox"] * 10, 300)


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_publish_twice_gives_versions_1_and_2_and_current_is_2(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    first = publish(model, tokenizer, tmp_path, NAME, {"loss": 2.5, "steps": 10})
    second = publish(model, tokenizer, tmp_path, NAME, {"loss": 1.25})

    assert (first.version, second.version) == (1, 2)
    assert current(tmp_path, NAME) == second
    assert get(tmp_path, NAME, 1) == first
    assert first.metadata == {"loss": 2.5, "steps": 10}
    assert second.path == (tmp_path / NAME / "2").resolve()
    # Same weights and tokenizer, so the same content checksum.
    assert first.checksum == second.checksum
    manifest = json.loads((second.path / "manifest.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= manifest["files"].keys()
    weights = (second.path / "model.safetensors").read_bytes()
    assert manifest["files"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    verify(second)
    assert resolve_model(NAME, tmp_path) == second.path
    loaded = load_causal_lm(resolve_model(NAME, tmp_path), device="cpu")
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def test_flipped_byte_fails_verify_naming_the_file(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    stored = publish(model, tokenizer, tmp_path, NAME)
    weights = stored.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors"):
        verify(stored)
    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors"):
        resolve_model(NAME, tmp_path)
    with pytest.raises(ModelIntegrityError, match=r"model\.safetensors"):
        resolve_model(stored.path, tmp_path)


def test_missing_or_extra_file_fails_verify(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    stored = publish(model, tokenizer, tmp_path, NAME)
    (stored.path / "pytorch_model.bin").write_bytes(b"smuggled")
    with pytest.raises(ModelIntegrityError, match=r"pytorch_model\.bin .*not in its manifest"):
        verify(stored)
    (stored.path / "pytorch_model.bin").unlink()
    (stored.path / "tokenizer.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"tokenizer\.json missing"):
        verify(stored)


def test_resolve_accepts_a_local_directory_and_refuses_unknown_specs(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    outside = tmp_path / "my-model"
    model.save_pretrained(outside)
    tokenizer.save_pretrained(outside)
    store = tmp_path / "store"

    assert resolve_model(outside, store) == outside.resolve()
    assert resolve_model(str(outside), store) == outside.resolve()
    with pytest.raises(ModelNotFoundError, match=r"'absent' is neither"):
        resolve_model("absent", store)
    with pytest.raises(ModelNotFoundError, match=r"no model named 'absent'"):
        current(store, "absent")
    with pytest.raises(ModelNotFoundError, match=r"no version 7"):
        get(store, "absent", 7)


def test_bad_input_is_refused_and_writes_nothing(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    with pytest.raises(ModelStoreError, match=r"not JSON"):
        publish(model, tokenizer, tmp_path, NAME, {"loss": float("nan")})
    with pytest.raises(ModelStoreError, match=r"invalid model name"):
        publish(model, tokenizer, tmp_path, "../escape")
    assert list(tmp_path.iterdir()) == []


DYING_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from edge_models.model_store import publish

    class DyingTokenizer(PreTrainedTokenizerFast):
        # Killed right after its files are written: the weights are already in the
        # temporary directory, the manifest and the rename are not done yet.
        def save_pretrained(self, *args, **kwargs):
            saved = super().save_pretrained(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return saved

    source, root, name = sys.argv[1:]
    model = LlamaForCausalLM.from_pretrained(source, local_files_only=True)
    tokenizer = DyingTokenizer.from_pretrained(source, local_files_only=True)
    publish(model, tokenizer, root, name, {"note": "never lands"})
    """
)


def test_publish_killed_midway_leaves_the_previous_version_current(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    first = publish(model, tokenizer, tmp_path, NAME)

    child = subprocess.run(
        [sys.executable, "-c", DYING_PUBLISH, str(first.path), str(tmp_path), NAME],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = list((tmp_path / NAME).glob(".tmp-*"))
    assert len(leftovers) == 1
    assert (leftovers[0] / "model.safetensors").is_file()
    assert current(tmp_path, NAME) == first
    verify(first)
    assert load_causal_lm(resolve_model(NAME, tmp_path), device="cpu").family == "llama"

    second = publish(model, tokenizer, tmp_path, NAME)
    assert second.version == 2
    assert current(tmp_path, NAME) == second
    assert not leftovers[0].exists()


def test_a_version_left_without_pointer_is_not_current_and_its_number_not_reused(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """The state a crash between the rename and the pointer update leaves behind."""
    first = publish(model, tokenizer, tmp_path, NAME)
    orphan = tmp_path / NAME / "2"
    shutil.copytree(first.path, orphan)

    assert current(tmp_path, NAME) == first
    assert publish(model, tokenizer, tmp_path, NAME).version == 3
