"""Weight-only quantised exports: MatMulNBits in place of the float MatMuls, the tied head untied,
close to the fp32 export, refused twice, and served only when asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from client.inference import KvCacheSession, left_pad
from client.serving import current_export, ensure_export
from edge_models.onnx_export import MODEL_FILE, ExportManifest, export_causal_lm
from edge_models.quantize import quantise_export

PROMPTS = [[5, 17, 42, 99, 3, 250, 64, 12], [11, 12, 13]]


@pytest.fixture(scope="module")
def fp32_export(tiny_llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fp32")
    export_causal_lm(tiny_llama, directory)
    return directory


def _logits(directory: Path) -> np.ndarray:
    session = KvCacheSession(directory, "cpu")
    ids, mask = left_pad(PROMPTS, session.manifest.pad_token_id)
    logits, state = session.prefill(ids, mask)
    step = session.decode(state, logits[:, -1].argmax(-1))
    return np.concatenate([logits[mask.astype(bool)], step])


def _graph_bytes(export: Path) -> int:
    """The graph and its weights file, if it has one."""
    return sum(f.stat().st_size for f in export.iterdir() if f.name.startswith(MODEL_FILE))


@pytest.mark.parametrize(("weights", "correlation"), [("int8", 0.999), ("int4", 0.95)])
def test_a_quantised_export_uses_nbit_matmuls_and_stays_close(
    fp32_export: Path, tmp_path: Path, weights: str, correlation: float
) -> None:
    manifest = quantise_export(fp32_export, tmp_path, weights)
    assert manifest.weights == weights
    assert ExportManifest.load(tmp_path).weights == weights
    graph = onnx.load(str(tmp_path / MODEL_FILE))
    ops = [node.op_type for node in graph.graph.node]
    assert "MatMul" not in ops and "Gemm" not in ops  # every product quantised, the head too
    bits = {
        attr.i
        for node in graph.graph.node
        if node.op_type == "MatMulNBits"
        for attr in node.attribute
        if attr.name == "bits"
    }
    assert bits == ({4, 8} if weights == "int4" else {8})  # the head keeps 8 bits
    assert _graph_bytes(tmp_path) < _graph_bytes(fp32_export) / (2 if weights == "int8" else 3)
    reference, quantised = _logits(fp32_export), _logits(tmp_path)
    assert np.isfinite(quantised).all()
    assert np.corrcoef(reference.ravel(), quantised.ravel())[0, 1] >= correlation


def test_a_quantised_export_is_not_quantised_again(fp32_export: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    quantise_export(fp32_export, first, "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quantise_export(first, second, "int4")
    with pytest.raises(ValueError, match="weights must be one of"):
        quantise_export(fp32_export, second, "int3")  # type: ignore[arg-type]
    assert not any(second.iterdir())


def test_devices_serve_float32_unless_asked(
    tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    plain = ensure_export(tiny_llama, [], tmp_path, "cpu", tiny_tokenizer)
    assert ExportManifest.load(plain).weights == "float32"
    small = ensure_export(tiny_llama, [], tmp_path, "cpu", tiny_tokenizer, weights="int4")
    assert small != plain and current_export(tmp_path) == small
    assert ExportManifest.load(small).weights == "int4"
    assert (small / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
