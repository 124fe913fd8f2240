"""ONNX export: logits of the exported graph against PyTorch, prefill and cached decode steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from client.inference import KvCacheSession
from client.serving import max_logit_difference
from edge_models.onnx_export import (
    MODEL_FILE,
    ExportError,
    ExportManifest,
    export_causal_lm,
    supports_fused_graph,
)

PARITY = 1e-4
DECODE_STEPS = 6
# One prompt of one token, one long prompt, and batches whose rows are left-padded.
PROMPT_BATCHES = {
    "single-token": [[7]],
    "one-prompt": [[5, 17, 42, 99, 3, 250, 64, 12, 8, 31, 77, 150]],
    "batch-of-3-padded": [[11, 12, 13, 14, 15], [40, 41], [90, 91, 92, 93, 94, 95, 96, 97, 98]],
    "batch-of-2-equal": [[20, 21, 22], [23, 24, 25]],
}


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Grouped-query attention (4 query heads share 2 kv heads), q/k/v biases, untied head."""
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama_export(tiny_llama: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    export_causal_lm(tiny_llama, directory)
    return directory


@pytest.fixture(scope="module")
def llama_session(llama_export: Path) -> KvCacheSession:
    return KvCacheSession(llama_export, "cpu")


@pytest.mark.parametrize("prompts", PROMPT_BATCHES.values(), ids=PROMPT_BATCHES.keys())
def test_fused_llama_logits_match_torch_in_prefill_and_decode(
    tiny_llama: LlamaForCausalLM, llama_session: KvCacheSession, prompts: list[list[int]]
) -> None:
    assert llama_session.manifest.method == "fused"
    assert max_logit_difference(tiny_llama, llama_session, prompts, DECODE_STEPS) < PARITY


def test_fused_qwen2_with_grouped_query_attention_matches_torch(tmp_path: Path) -> None:
    model = tiny_qwen2()
    manifest = export_causal_lm(model, tmp_path)
    assert (manifest.method, manifest.num_kv_heads) == ("fused", 2)
    session = KvCacheSession(tmp_path, "cpu")
    for prompts in PROMPT_BATCHES.values():
        assert max_logit_difference(model, session, prompts, DECODE_STEPS) < PARITY


def test_fused_graph_has_few_nodes_per_layer(tiny_llama: LlamaForCausalLM, llama_export: Path):
    """Node count is what a small model's decode step costs; a trace has about 80 per layer."""
    graph = onnx.load(llama_export / MODEL_FILE, load_external_data=False).graph
    per_layer = len(graph.node) / tiny_llama.config.num_hidden_layers
    assert per_layer < 20
    ops = {node.op_type for node in graph.node}
    assert {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops


def test_fused_graph_keeps_its_weights_in_a_side_file(
    tiny_llama: LlamaForCausalLM, llama_export: Path
) -> None:
    """Written one by one (never all in memory at once): the graph holds none of them."""
    weights = 4 * sum(p.numel() for p in tiny_llama.parameters())
    graph = onnx.load(str(llama_export / MODEL_FILE), load_external_data=False)
    assert (llama_export / MODEL_FILE).stat().st_size < weights / 20
    assert (llama_export / f"{MODEL_FILE}.data").stat().st_size >= weights
    assert all(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in graph.graph.initializer
        if t.name == "embed_tokens" or t.name.startswith("linear_")
    )


def test_export_leaves_the_model_unchanged(tiny_llama: LlamaForCausalLM, tmp_path: Path) -> None:
    before = {name: tensor.clone() for name, tensor in tiny_llama.state_dict().items()}
    export_causal_lm(tiny_llama, tmp_path)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_manifest_describes_the_cache(tiny_llama: LlamaForCausalLM, llama_export: Path) -> None:
    manifest = ExportManifest.load(llama_export)
    config = tiny_llama.config
    assert manifest.num_layers == config.num_hidden_layers
    assert manifest.head_dim == tiny_llama.model.layers[0].self_attn.head_dim
    assert manifest.eos_token_ids == (2,) and manifest.pad_token_id == 0
    assert manifest.parameters == sum(p.numel() for p in tiny_llama.parameters())


def test_only_llama_family_gets_the_fused_graph(tiny_llama: LlamaForCausalLM) -> None:
    sliding = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0,
    )  # fmt: skip
    gelu = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, hidden_act="gelu",
    )  # fmt: skip
    assert supports_fused_graph(tiny_llama)
    assert supports_fused_graph(tiny_qwen2())
    assert not supports_fused_graph(tiny_gpt2())
    assert not supports_fused_graph(Qwen2ForCausalLM(sliding))
    assert not supports_fused_graph(LlamaForCausalLM(gelu))


def test_fused_export_of_an_unsupported_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="gpt2"):
        export_causal_lm(tiny_gpt2(), tmp_path, method="fused")
    assert not (tmp_path / MODEL_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_qwen2], ids=["gpt2", "qwen2"])
def test_traced_export_matches_torch(build: Callable[[], PreTrainedModel], tmp_path: Path) -> None:
    """The torch.export path, for decoders without a fused graph (about 10 s per model)."""
    model = build()
    assert export_causal_lm(model, tmp_path, method="traced").method == "traced"
    session = KvCacheSession(tmp_path, "cpu")
    for prompts in PROMPT_BATCHES.values():
        assert max_logit_difference(model, session, prompts, DECODE_STEPS) < PARITY
