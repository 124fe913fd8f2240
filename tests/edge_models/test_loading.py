"""Bring-your-own-model loading: tiny random Llama, Qwen2 and GPT-2 directories, and broken ones."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.pytorch_utils import Conv1D

from edge_models.loading import ModelLoadError, find_lora_targets, load_causal_lm, lora_config
from edge_models.tokenizer import BOS, EOS, train_tokenizer

TEXTS = [
    "alice lives at 12 rose street and her pin is 4821",
    "bob likes the quick brown fox that jumps over the lazy dog",
    "the weather today is sunny with a light breeze from the west",
] * 10

KNOWN_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
}
FAMILIES = tuple(KNOWN_TARGETS)
# Embeddings larger than the vocabulary, as real checkpoints have: transformers loads a
# qwen2 directory's tokenizer as Qwen2Tokenizer, which adds an unk token to ours.
EMBEDDINGS = 320


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, vocab_size=300)


def tiny_config(
    family: str, tokenizer: PreTrainedTokenizerFast, vocab_size: int
) -> PretrainedConfig:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids
        )
    config_class = LlamaConfig if family == "llama" else Qwen2Config
    return config_class(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **ids,
    )


def save_model_dir(
    directory: Path,
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    vocab_size: int | None = None,
) -> Path:
    torch.manual_seed(0)
    config = tiny_config(family, tokenizer, vocab_size or EMBEDDINGS)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> dict[str, Path]:
    """One directory per family; GPT-2's tokenizer has no pad token, as the real GPT-2's has not."""
    root = tmp_path_factory.mktemp("models")
    without_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token=BOS, eos_token=EOS
    )
    assert without_pad.pad_token is None
    return {
        family: save_model_dir(
            root / family, family, without_pad if family == "gpt2" else tokenizer
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_known_projection_names(family: str, model_dirs: dict[str, Path]) -> None:
    loaded = load_causal_lm(model_dirs[family], device="cpu")

    assert loaded.family == family
    assert set(loaded.lora_targets.modules) == KNOWN_TARGETS[family]
    assert loaded.lora_targets.fan_in_fan_out is (family == "gpt2")
    assert find_lora_targets(loaded.model) == loaded.lora_targets


def test_tokenizer_without_pad_pads_with_eos_on_the_left(model_dirs: dict[str, Path]) -> None:
    tokenizer = load_causal_lm(model_dirs["gpt2"], device="cpu").tokenizer

    assert tokenizer.pad_token == EOS
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["alice", "the quick brown fox"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.eos_token_id
    assert batch["attention_mask"][0][0] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wraps_every_block_projection_and_trains_only_adapters(
    family: str, model_dirs: dict[str, Path]
) -> None:
    torch.manual_seed(0)
    loaded = load_causal_lm(model_dirs[family], device="cpu")
    tokenizer = loaded.tokenizer
    projections = {
        name
        for name, module in loaded.model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and name != "lm_head"
    }
    model = get_peft_model(loaded.model, lora_config(loaded.lora_targets, 4, 8, 0.0))

    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert wrapped == projections
    assert len(wrapped) == 2 * (4 if family == "gpt2" else 7)
    assert not isinstance(model.get_input_embeddings(), LoraLayer)
    assert not isinstance(model.get_output_embeddings(), LoraLayer)

    prompts = ["alice lives at", "the weather today is sunny with"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        alone = model.generate(
            **tokenizer(prompts[:1], return_tensors="pt"),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )
    width = batch["input_ids"].shape[1]
    assert generated.shape == (2, width + 4)
    # Left padding must not change what the shorter prompt generates.
    assert generated[0, width:].tolist() == alone[0, -4:].tolist()

    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss.backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if "lora_" in name}
    assert any("lora_B" in name for name in changed)


def remove(*names: str) -> Callable[[Path], None]:
    def breaker(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()

    return breaker


def edit_config(**changes: object) -> Callable[[Path], None]:
    def breaker(directory: Path) -> None:
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text()) | changes
        config_file.write_text(json.dumps(config))

    return breaker


def truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


BROKEN = {
    "missing directory": (lambda d: shutil.rmtree(d), r"does not exist"),
    "no config": (remove("config.json"), r"no config\.json"),
    "pickle weights only": (
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        r"no weights .*only safetensors",
    ),
    "no tokenizer": (remove("tokenizer.json", "tokenizer_config.json"), r"no tokenizer"),
    "classifier architecture": (
        edit_config(architectures=["LlamaForSequenceClassification"]),
        r"not a causal LM.*LlamaForSequenceClassification",
    ),
    "vision model type": (
        edit_config(model_type="vit", architectures=["ViTModel"]),
        r"not a causal LM.*'vit'",
    ),
    "truncated weights": (truncate_weights, r"cannot load the model"),
}


@pytest.fixture
def llama_copy(model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dirs["llama"], tmp_path / "llama"))


@pytest.mark.parametrize("case", BROKEN)
def test_broken_directory_gives_its_own_message(case: str, llama_copy: Path) -> None:
    breaker, message = BROKEN[case]
    breaker(llama_copy)

    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(llama_copy, device="cpu")


def test_remote_code_is_refused_and_never_run(llama_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    for module in ("configuration_custom", "modeling_custom"):
        (llama_copy / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        )
    edit_config(
        model_type="lethe_custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )(llama_copy)

    with pytest.raises(ModelLoadError, match=r"needs remote code"):
        load_causal_lm(llama_copy, device="cpu")
    assert not marker.exists()


def test_tokenizer_larger_than_embeddings_is_refused(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    directory = save_model_dir(
        tmp_path / "small", "llama", tokenizer, vocab_size=len(tokenizer) - 8
    )

    with pytest.raises(
        ModelLoadError, match=rf"{len(tokenizer)} tokens .* only {len(tokenizer) - 8}"
    ):
        load_causal_lm(directory, device="cpu")
