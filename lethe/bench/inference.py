"""`lethe bench inference`: per-token latency of PyTorch eager and ONNX Runtime, both with KV cache.

Greedy generation of 64 tokens after a 32-token prompt, batch 1, for the
default model and for a ~26M-parameter Llama (random weights: latency does not
depend on their values), so that the scaling shows. The two engines get the
same thread count, their own KV cache and the same loop (forward, argmax,
feed back); PyTorch runs under `torch.inference_mode`, and transformers'
`generate` is timed too, the faster of the two being PyTorch's figure.

Each engine is timed in blocks that start with a warm-up run, and the blocks
rotate over several rounds: noise from other processes then falls on all
engines, while the thread pools that keep spinning after a run (ONNX
Runtime's, OpenMP's) do not steal the cores from the next engine's run, which
alternating single runs let them do (PyTorch measured 60% slower that way).
Medians are reported, with the load average around the bench.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from client.inference import KvCacheSession
from client.serving import max_logit_difference
from edge_models.default_model import BuildConfig, default_llama_config
from edge_models.onnx_export import export_causal_lm
from lethe.bench.report import machine_facts, write_report
from shared.devices import resolve_torch_device

PROMPT_TOKENS = 32
NEW_TOKENS = 64
ROUNDS = 4


def bench_configs() -> dict[str, LlamaConfig]:
    """The default architecture, and a wider and deeper one of about 26M parameters."""
    vocab = BuildConfig().vocab_size
    larger = default_llama_config(vocab)
    larger.update(
        {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 64,
        }
    )
    return {"default": default_llama_config(vocab), "llama-26m": larger}


@dataclass(frozen=True)
class Timing:
    """One generation: seconds for the prompt (and first token) and for the rest."""

    prefill_s: float
    decode_s: float

    @property
    def per_token_ms(self) -> float:
        return (self.prefill_s + self.decode_s) * 1000 / NEW_TOKENS


def run_inference_bench(json_path: Path, runs: int = 20, device: str = "auto") -> dict[str, Any]:
    """Measure every bench config, write the JSON report to `json_path` and return it."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    configs = {
        name: _bench_config(config, runs, device, threads)
        for name, config in bench_configs().items()
    }
    report = {
        "configs": configs,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "batch": 1,
        "runs": runs,
        "statistic": "median",
        "torch_threads": threads,
        "onnx_intra_op_threads": threads,
        "onnxruntime": ort.__version__,
        **machine_facts(device, load_before),
    }
    return write_report(json_path, report)


def _bench_config(config: LlamaConfig, runs: int, device: str, threads: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(resolve_torch_device(device))
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        manifest = export_causal_lm(model, Path(directory))
        export_s = time.perf_counter() - started
        session = KvCacheSession(Path(directory), device, threads)
        return {
            "params": manifest.parameters,
            **_compare(model, session, runs),
            "onnx_export_method": manifest.method,
            "onnx_export_s": round(export_s, 2),
            "onnx_providers": session.providers,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
        }


def _compare(model: LlamaForCausalLM, session: KvCacheSession, runs: int) -> dict[str, Any]:
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, PROMPT_TOKENS).tolist()
    difference = max_logit_difference(model, session, [prompt], NEW_TOKENS - 1)
    contenders: dict[str, Callable[[], Timing]] = {
        "torch": lambda: _torch_loop(model, prompt),
        "torch_generate": lambda: _torch_generate(model, prompt),
        "onnx": lambda: _onnx_loop(session, prompt),
    }
    timings: dict[str, list[Timing]] = {name: [] for name in contenders}
    names = list(contenders)
    rounds = min(ROUNDS, runs)
    for round_ in range(rounds):
        block = runs // rounds + (round_ < runs % rounds)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            contenders[name]()  # warm-up: caches, and the previous engine's threads settle
            timings[name].extend(contenders[name]() for _ in range(block))

    def median(name: str, measure: Callable[[Timing], float]) -> float:
        return round(statistics.median(measure(t) for t in timings[name]), 4)

    torch_ms = min(median("torch", _per_token), median("torch_generate", _per_token))
    onnx_ms = median("onnx", _per_token)
    return {
        "torch_ms_per_token": torch_ms,
        "onnx_ms_per_token": onnx_ms,
        "speedup": round(torch_ms / onnx_ms, 2),
        "max_abs_logit_diff": float(f"{difference:.3g}"),
        "torch_loop_ms_per_token": median("torch", _per_token),
        "torch_generate_ms_per_token": median("torch_generate", _per_token),
        "torch_prefill_ms": median("torch", _prefill_ms),
        "torch_decode_ms_per_token": median("torch", _decode_ms),
        "onnx_prefill_ms": median("onnx", _prefill_ms),
        "onnx_decode_ms_per_token": median("onnx", _decode_ms),
    }


def _per_token(timing: Timing) -> float:
    return timing.per_token_ms


def _prefill_ms(timing: Timing) -> float:
    return timing.prefill_s * 1000


def _decode_ms(timing: Timing) -> float:
    return timing.decode_s * 1000 / (NEW_TOKENS - 1)


@torch.inference_mode()
def _torch_loop(model: LlamaForCausalLM, prompt: list[int]) -> Timing:
    """The leanest eager loop: forward with the cache, argmax, feed the token back."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    logits = model(torch.tensor([prompt], device=device), past_key_values=cache).logits
    token = logits[:, -1:].argmax(dim=-1)
    _synchronize(device)
    prefilled = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        logits = model(token, past_key_values=cache).logits
        token = logits[:, -1:].argmax(dim=-1)
    _synchronize(device)
    return Timing(prefilled - started, time.perf_counter() - prefilled)


@torch.inference_mode()
def _torch_generate(model: LlamaForCausalLM, prompt: list[int]) -> Timing:
    """transformers' own greedy generate (no prefill/decode split: all counted as decode)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    started = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    _synchronize(device)
    return Timing(0.0, time.perf_counter() - started)


def _onnx_loop(session: KvCacheSession, prompt: list[int]) -> Timing:
    started = time.perf_counter()
    logits, state = session.prefill(np.array([prompt]), np.ones((1, len(prompt)), np.int64))
    token = logits[:, -1].argmax(axis=-1)
    prefilled = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        token = session.decode(state, token).argmax(axis=-1)
    return Timing(prefilled - started, time.perf_counter() - prefilled)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
