"""`lethe bench inference`: per-token latency of PyTorch eager and ONNX Runtime, both with KV cache.

Greedy generation of 64 tokens after a 32-token prompt, batch 1, for the
default model and for a ~26M-parameter Llama (random weights: latency does not
depend on their values), so that the scaling shows. Each stored model named
with `--model` (a real pretrained one such as SmolLM2) is measured too, with
its weight-only quantised exports (`edge_models.quantize`): their speed, what
they cost in accuracy against the fp32 export (next-token accuracy on a few
written passages, exact match on general-knowledge prompts), and the memory
bandwidth floor: the weight bytes a decode step streams divided by a copy
bandwidth measured in the same run. The two engines get the
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from client.inference import KvCacheSession, OnnxGenerator, SamplingParams, left_pad
from client.serving import max_logit_difference
from edge_models.default_model import BuildConfig, default_llama_config
from edge_models.evaluation import normalise_answer
from edge_models.loading import load_causal_lm
from edge_models.onnx_export import MODEL_FILE, export_causal_lm
from edge_models.quantize import BITS, quantise_export
from lethe.bench.report import machine_facts, write_report
from shared.devices import resolve_torch_device

PROMPT_TOKENS = 32
NEW_TOKENS = 64
ROUNDS = 4
COPY_BYTES = 256 << 20

# General knowledge a small instruction model answers; the quantised exports are scored
# against the fp32 export's exact match on them.
KNOWLEDGE_PROBES: tuple[tuple[str, str], ...] = (
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"),
    ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"),
    ("The capital of England is", "London"),
    ("The capital of Russia is", "Moscow"),
    ("The capital of Egypt is", "Cairo"),
    ("The capital of Canada is", "Ottawa"),
    ("The capital of China is", "Beijing"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The largest planet in our solar system is", "Jupiter"),
    ("The planet closest to the Sun is", "Mercury"),
    ("The chemical symbol for gold is", "Au"),
    ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"),
    ("The day after Monday is", "Tuesday"),
    ("The month after January is", "February"),
    ("One, two, three, four,", "five"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The first man to walk on the Moon was Neil", "Armstrong"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The freezing point of water in degrees Celsius is", "0"),
    ("Bees make", "honey"),
    ("A baby cat is called a", "kitten"),
    ("The color of the sky on a clear day is", "blue"),
    ("The longest river in Africa is the", "Nile"),
    ("The currency of the United States is the", "dollar"),
    ("Christmas is celebrated in the month of", "December"),
)

# Plain passages for next-token accuracy, written for this bench.
ACCURACY_PASSAGES: tuple[str, ...] = (
    "The history of the town goes back to the Roman period, when a small fort was built "
    "beside the river. Over the centuries it grew into a market town, and in the nineteenth "
    "century the railway brought mills, warehouses and thousands of new workers.",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide "
    "and water into sugar and oxygen. It takes place mainly in the leaves, inside small "
    "structures called chloroplasts.",
    "To make a simple tomato sauce, warm olive oil in a pan, add a chopped onion and cook it "
    "until soft. Add garlic, a tin of tomatoes and a pinch of salt, then let it simmer for "
    "twenty minutes.",
    "def mean(values):\n    if not values:\n        raise ValueError('no values')\n"
    "    return sum(values) / len(values)\n",
)


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


def run_inference_bench(
    json_path: Path,
    runs: int = 20,
    device: str = "auto",
    models: Mapping[str, Path] | None = None,
    model_runs: int = 8,
) -> dict[str, Any]:
    """Measure every bench config and each of `models` (name: model directory, `model_runs`
    runs each), write the JSON report to `json_path` and return it."""
    if runs < 1 or model_runs < 1:
        raise ValueError("runs must be at least 1")
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    configs = {
        name: _bench_config(config, runs, device, threads)
        for name, config in bench_configs().items()
    }
    for name, directory in (models or {}).items():
        configs[name] = _bench_model(directory, model_runs, device, threads)
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


def _bench_model(directory: Path, runs: int, device: str, threads: int) -> dict[str, Any]:
    """A real model: PyTorch against its fp32 export, then each quantised export against that."""
    loaded = load_causal_lm(directory, device)
    model = loaded.model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        fp32_dir = Path(scratch) / "float32"
        fp32_dir.mkdir()
        started = time.perf_counter()
        manifest = export_causal_lm(model, fp32_dir)
        export_s = time.perf_counter() - started
        session = KvCacheSession(fp32_dir, device, threads)
        bandwidth = copy_bandwidth_gb_s()
        result: dict[str, Any] = {
            "model": str(directory),
            "params": manifest.parameters,
            **_compare(model, session, runs),
            "onnx_export_method": manifest.method,
            "onnx_export_s": round(export_s, 2),
            "onnx_providers": session.providers,
            "layers": manifest.num_layers,
            "hidden_size": model.config.hidden_size,
            "copy_bandwidth_gb_s": round(bandwidth, 2),
        }
        exports = {"float32": (fp32_dir, session)}
        for weights in BITS:
            quantised = Path(scratch) / weights
            quantised.mkdir()
            quantise_export(fp32_dir, quantised, weights)
            exports[weights] = (quantised, KvCacheSession(quantised, device, threads))
        result["exports"] = _exports_compared(exports, loaded.tokenizer, runs, bandwidth)
    fp32 = result["exports"]["float32"]
    result["onnx_vs_bandwidth_floor"] = fp32["vs_bandwidth_floor"]
    return result


def _exports_compared(
    exports: Mapping[str, tuple[Path, KvCacheSession]],
    tokenizer: Any,
    runs: int,
    bandwidth: float,
) -> dict[str, dict[str, Any]]:
    """Speed and accuracy of each export; quantised ones against the float32 one."""
    prompt = tokenizer(ACCURACY_PASSAGES[0])["input_ids"][:PROMPT_TOKENS]
    timings: dict[str, list[Timing]] = {name: [] for name in exports}
    for round_ in range(min(ROUNDS, runs)):
        for name, (_, session) in exports.items():
            _onnx_loop(session, prompt)  # warm-up
            block = runs // min(ROUNDS, runs) + (round_ < runs % min(ROUNDS, runs))
            timings[name].extend(_onnx_loop(session, prompt) for _ in range(block))
    out: dict[str, dict[str, Any]] = {}
    for name, (directory, session) in exports.items():
        ms = statistics.median(t.per_token_ms for t in timings[name])
        decode_ms = statistics.median(_decode_ms(t) for t in timings[name])
        streamed = streamed_weight_bytes(directory / MODEL_FILE)
        floor_ms = streamed / (bandwidth * 1e9) * 1000
        out[name] = {
            "ms_per_token": round(ms, 3),
            "decode_ms_per_token": round(decode_ms, 3),
            "file_mb": round((directory / MODEL_FILE).stat().st_size / 1e6, 1),
            "streamed_weight_mb_per_token": round(streamed / 1e6, 1),
            "bandwidth_floor_ms_per_token": round(floor_ms, 3),
            "vs_bandwidth_floor": round(decode_ms / floor_ms, 2),
            "next_token_accuracy": round(_next_token_accuracy(session, tokenizer), 4),
            "knowledge_exact_match": round(_knowledge_exact_match(session, tokenizer), 4),
        }
    reference = out["float32"]
    for figures in out.values():
        figures["speedup_vs_float32"] = round(
            reference["ms_per_token"] / figures["ms_per_token"], 2
        )
        figures["next_token_accuracy_change_points"] = round(
            100 * (figures["next_token_accuracy"] - reference["next_token_accuracy"]), 2
        )
        figures["knowledge_exact_match_change_points"] = round(
            100 * (figures["knowledge_exact_match"] - reference["knowledge_exact_match"]), 2
        )
    return out


def _next_token_accuracy(session: KvCacheSession, tokenizer: Any) -> float:
    """Share of the passages' tokens that the export predicts as its top-1 next token."""
    hits = total = 0
    for passage in ACCURACY_PASSAGES:
        ids = tokenizer(passage)["input_ids"]
        tokens, mask = left_pad([ids], session.manifest.pad_token_id)
        logits, _ = session.prefill(tokens, mask)
        predicted = logits[0, :-1].argmax(axis=-1)
        hits += int((predicted == np.array(ids[1:])).sum())
        total += len(ids) - 1
    return hits / total


def _knowledge_exact_match(session: KvCacheSession, tokenizer: Any) -> float:
    """Share of the general-knowledge prompts whose greedy answer begins with the answer."""
    generator = OnnxGenerator(session, tokenizer)
    prompts = [prompt for prompt, _ in KNOWLEDGE_PROBES]
    answers = generator.generate(prompts, SamplingParams(max_new_tokens=6))
    hits = sum(
        normalise_answer(answer.text).startswith(normalise_answer(expected))
        for answer, (_, expected) in zip(answers, KNOWLEDGE_PROBES, strict=True)
    )
    return hits / len(KNOWLEDGE_PROBES)


def streamed_weight_bytes(graph_path: Path) -> int:
    """Bytes of the weights a decode step reads in full: those of its matrix products.

    Embedding rows and rotary tables are looked up a row per token and so are
    left out; a tied head reads the embedding matrix through its Gemm and so
    counts it.
    """
    graph = onnx.load(str(graph_path))
    sizes = {t.name: _tensor_bytes(t) for t in graph.graph.initializer}
    products = {"MatMul", "Gemm", "MatMulNBits"}
    used = {name for node in graph.graph.node if node.op_type in products for name in node.input}
    return sum(size for name, size in sizes.items() if name in used)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return (
        int(np.prod(tensor.dims, dtype=np.int64))
        * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    )


def copy_bandwidth_gb_s(repeats: int = 7) -> float:
    """Memory bandwidth of a large copy (bytes read plus bytes written per second), median."""
    source = np.ones(COPY_BYTES // 4, np.float32)
    target = np.empty_like(source)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - started)
    return 2 * COPY_BYTES / statistics.median(seconds) / 1e9


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
