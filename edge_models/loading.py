"""Bring your own model: load any local Hugging Face causal LM and find where LoRA goes.

The default model is one choice; an operator may point Lethe at any causal LM
directory on disk instead. Loading checks the directory up front, so that a
wrong path or a half-copied model fails with a message that names what is
missing rather than a deep transformers traceback. Nothing is fetched from a
hub and no code shipped with a model is ever run: an edge device executes only
the transformers it was installed with, and weights are read from safetensors
only (pickled `.bin` weights can execute code when loaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from shared.devices import resolve_torch_device

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelLoadError(Exception):
    """A model directory cannot be loaded; the message says what is missing or wrong."""


@dataclass(frozen=True)
class LoraTargets:
    """Where LoRA adapters go in one model.

    `modules` are leaf module names as peft's `target_modules` expects them.
    `fan_in_fan_out` is True when the layers store their weight transposed
    (transformers' Conv1D, as in GPT-2), which peft must be told.
    """

    modules: tuple[str, ...]
    fan_in_fan_out: bool


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for training and generation, with its tokenizer and LoRA targets."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str
    lora_targets: LoraTargets


def load_causal_lm(
    path: str | Path, device: str = "auto", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a local causal LM directory (config, safetensors weights, tokenizer).

    `dtype` None means float32: LoRA training and the closed-form unlearning
    edits need full precision on a CPU; pass a half type to save memory on a GPU.
    """
    directory = Path(path)
    _check_directory(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=torch.float32 if dtype is None else dtype,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(f"cannot load the model in {directory}: {error}") from error
    _prepare_for_batched_generation(model, tokenizer, directory)
    model.to(resolve_torch_device(device))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=model.config.model_type,
        lora_targets=find_lora_targets(model),
    )


def _check_directory(directory: Path) -> None:
    """Fail early with a specific message for each way a model directory can be incomplete."""
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"no {CONFIG_FILE} in {directory}: not a Hugging Face model directory")
    _check_architecture(config_file)
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"no weights in {directory}: expected {' or '.join(WEIGHT_FILES)} "
            "(only safetensors weights are loaded)"
        )
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"no tokenizer in {directory}: expected {' or '.join(TOKENIZER_FILES)}"
        )


def _check_architecture(config_file: Path) -> None:
    """Accept only architectures this transformers installation implements as causal LMs.

    A config naming classes transformers does not have would need the code
    shipped with the model (`auto_map`), which Lethe refuses to run.
    """
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON: {error}") from error
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and all(
        name in causal_classes for name in architectures
    ):
        return
    if "auto_map" in config:
        raise ModelLoadError(
            f"the model in {config_file.parent} needs remote code (model_type {model_type!r}, "
            f"auto_map {config['auto_map']}); Lethe never runs code shipped with a model"
        )
    raise ModelLoadError(
        f"the model in {config_file.parent} is not a causal LM: model_type {model_type!r}, "
        f"architectures {architectures}"
    )


def _prepare_for_batched_generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """Give the tokenizer a pad token and left padding, and check it fits the embeddings.

    Batched generation of a decoder-only model appends tokens on the right, so
    prompts must be padded on the left; many causal LMs ship without a pad
    token, and padding with eos under an attention mask is the usual remedy.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {directory} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelLoadError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model "
            f"embeds only {embeddings}"
        )


def find_lora_targets(model: nn.Module) -> LoraTargets:
    """Find the attention and MLP projections inside the model's repeated transformer blocks.

    Scanning the block list rather than naming modules per family makes any
    Llama-, Qwen2- or GPT-2-like model work, and keeps the embeddings and the
    lm_head (which live outside the blocks) out of the adapter.
    """
    blocks = _transformer_blocks(model)
    layers = {
        (name.rsplit(".", 1)[-1], isinstance(module, Conv1D))
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    if not layers:
        raise ModelLoadError(
            f"no linear layers inside the transformer blocks of {type(model).__name__}"
        )
    transposed = {is_conv1d for _, is_conv1d in layers}
    if len(transposed) > 1:
        raise ModelLoadError(
            f"{type(model)} mixes nn.Linear and Conv1D layers; LoRA needs one kind"
        )
    return LoraTargets(
        modules=tuple(sorted({name for name, _ in layers})), fan_in_fan_out=transposed.pop()
    )


def _transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated block list: the largest ModuleList whose entries all share one class."""
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ModelLoadError(f"no list of transformer blocks found in {type(model).__name__}")
    return max(candidates, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def lora_config(targets: LoraTargets, rank: int, alpha: float, dropout: float) -> LoraConfig:
    """A peft LoRA configuration for a causal LM with the given targets."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets.modules),
        fan_in_fan_out=targets.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
