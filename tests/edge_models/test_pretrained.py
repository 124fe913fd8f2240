"""Importing a pretrained model shipped in a registry package: checks first, store untouched on
failure, once only; the real SmolLM2 import is shared by the slow tests (`imported_smollm2`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_models import model_store
from edge_models.loading import load_causal_lm
from edge_models.pretrained import (
    EXTRA,
    PACKAGED_MODELS,
    ModelImportError,
    PackagedModel,
    check_gguf,
    import_gguf,
    import_packaged,
    packaged_file,
)

SMOLLM2 = PACKAGED_MODELS["smollm2"]


def test_the_packaged_file_is_found_without_running_the_package() -> None:
    import sys

    path = packaged_file(SMOLLM2)
    assert path.name == SMOLLM2.filename and path.stat().st_size > 90_000_000
    assert SMOLLM2.package not in sys.modules  # its plugin code needs a runtime we lack
    check_gguf(path)


def test_a_missing_package_names_the_extra() -> None:
    absent = PackagedModel("ghost", "lethe_no_such_package", "no-such-dist", "x.gguf", "")
    with pytest.raises(ModelImportError, match=f"{EXTRA!r} extra"):
        packaged_file(absent)


def test_an_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="known: smollm2"):
        import_packaged("gpt-17", tmp_path)


@pytest.mark.parametrize("cut", ["header", "half", "last-bytes"])
def test_a_truncated_gguf_is_refused_and_the_store_stays_empty(tmp_path: Path, cut: str) -> None:
    data = packaged_file(SMOLLM2).read_bytes()
    length = {"header": 3, "half": len(data) // 2, "last-bytes": len(data) - 7}[cut]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:length])
    root = tmp_path / "models"
    with pytest.raises(ModelImportError, match="not a GGUF file|corrupt or truncated"):
        import_gguf(broken, root, "smollm2")
    assert not (root / "smollm2").exists() or not any(
        p.name.isdigit() for p in (root / "smollm2").iterdir()
    )


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelImportError, match="not a GGUF file"):
        check_gguf(fake)


@pytest.mark.slow
def test_the_import_is_a_stored_checksummed_llama_that_knows_things(imported_smollm2) -> None:
    root, version = imported_smollm2
    model_store.verify(version)
    assert version.metadata["source_sha256"] and version.metadata["dtype"] == "float32"
    assert model_store.resolve_model("smollm2", root) == version.path
    loaded = load_causal_lm(version.path, "cpu")
    config = loaded.model.config
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert not hasattr(config, "quantization_config")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    again, new = import_packaged("smollm2", root)
    assert not new and again.version == version.version


@pytest.mark.slow
def test_the_fused_export_of_smollm2_matches_torch_and_quantised_exports_stay_close(
    imported_smollm2, tmp_path: Path
) -> None:
    """Grouped-query attention with 3 KV heads, tied head, RoPE theta 1e5, 30 layers.

    Parity is asked relative to the logits' scale: over 30 layers float32's own
    rounding is of order 1e-4 on logits near 30 (PyTorch fp32 itself differs from
    fp64 by 4-7e-5 here), so an absolute 1e-4 would test the summation order.
    """
    import numpy as np

    from client.inference import KvCacheSession, OnnxGenerator, SamplingParams
    from client.serving import max_logit_difference
    from edge_models.onnx_export import export_causal_lm
    from edge_models.quantize import quantise_export

    _root, version = imported_smollm2
    loaded = load_causal_lm(version.path, "cpu")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    manifest = export_causal_lm(model, fp32)
    assert (manifest.method, manifest.num_kv_heads, manifest.head_dim) == ("fused", 3, 64)
    session = KvCacheSession(fp32, "cpu")
    texts = ["The capital of France is", "Hi", "Once upon a time, in a small village by the sea,"]
    batch = [tokenizer(text)["input_ids"] for text in texts]
    with torch.inference_mode():
        scale = float(model(torch.tensor([batch[2]])).logits.abs().max())
    for prompts in ([batch[0]], batch):  # one prompt; a left-padded batch of three
        assert max_logit_difference(model, session, prompts, decode_steps=4) <= 1e-5 * scale

    passage = tokenizer(
        "The river runs through the middle of the old town, past the market square and the "
        "church, before it turns east towards the sea."
    )["input_ids"]
    full = _passage_nll(session, passage)
    # 8 bits cost next to nothing; 4 bits re-quantise weights that were Q4_1 already and
    # cost about half a nat on this passage (docs/benchmarks/inference.json): close, not equal.
    for weights, allowed in (("int8", 0.1), ("int4", 0.75)):
        quantised = tmp_path / weights
        quantised.mkdir()
        assert quantise_export(fp32, quantised, weights).weights == weights
        generator = OnnxGenerator.load(quantised, "cpu", tokenizer=tokenizer)
        answer = generator.generate(["The capital of France is"], SamplingParams(max_new_tokens=3))
        assert "Paris" in answer[0].text
        small = _passage_nll(generator.session, passage)
        assert np.isfinite(small) and small <= full + allowed, (weights, full, small)


def _passage_nll(session, ids: list[int]) -> float:
    """Mean negative log-likelihood of a passage's tokens under an export."""
    import numpy as np

    from client.inference import left_pad

    logits = session.prefill(*left_pad([ids], 2))[0][0, :-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean())
