"""Export of a Hugging Face causal LM to ONNX, with its KV cache as graph inputs and outputs.

Every export has the interface of Hugging Face Optimum's decoder exports, so one
generation loop drives any of them:

    inputs   input_ids       (batch, seq)                          int64
             attention_mask  (batch, past + seq)                   int64, 0 = padding
             position_ids    (batch, seq)                          int64
             past_key_values.{i}.key / .value
                             (batch, kv_heads, past, head_dim)     float32
    outputs  logits          (batch, seq, vocab)                   float32
             present.{i}.key / .value
                             (batch, kv_heads, past + seq, head_dim)

Two ways to produce it, chosen per architecture:

- `fused` (Llama and Qwen2): the graph is written directly from the weights with
  ONNX Runtime's fused decoder kernels (GroupQueryAttention, RotaryEmbedding,
  SkipSimplifiedLayerNormalization), about 13 nodes per layer where a trace of
  the transformers code has about 80. A decode step of a small model costs
  per-node dispatch rather than arithmetic, so this is what makes ONNX Runtime
  faster than PyTorch on the edge models.
- `traced` (any other decoder with a standard full-attention cache): the
  torch.export-based exporter traces the transformers forward. Slower to export
  and to run, but it follows whatever the model's code does.

Weights are exported in float32, the precision ONNX Runtime's CPU kernels are
built for; an export does not change the model it is given.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "onnx_manifest.json"
# Bump when the graph interface or layout changes: exports are keyed by it.
EXPORT_FORMAT = 1
FUSED_MODEL_TYPES = frozenset({"llama", "qwen2"})
ONNX_OPSET = 17
# protobuf cannot hold more than 2 GB; larger graphs keep their weights beside them.
_INLINE_WEIGHT_LIMIT = 1 << 30

ExportMethod = Literal["auto", "fused", "traced"]


class ExportError(Exception):
    """The model cannot be exported the way that was asked."""


@dataclass(frozen=True)
class ExportManifest:
    """What a generation loop must know about an export besides the graph itself."""

    format: int
    method: str
    model_type: str
    parameters: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    # "float32", or the weight-only quantisation `edge_models.quantize` applied.
    weights: str = "float32"

    def past_names(self) -> list[str]:
        return [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def save(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ExportManifest:
        fields = json.loads((directory / MANIFEST_FILE).read_text())
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return cls(**fields)


def export_causal_lm(
    model: PreTrainedModel, directory: Path, method: ExportMethod = "auto"
) -> ExportManifest:
    """Write `model.onnx` and its manifest into `directory` (which must exist).

    `auto` takes the fused graph when the architecture has one and the traced
    graph otherwise.
    """
    if method == "auto":
        method = "fused" if supports_fused_graph(model) else "traced"
    manifest = _manifest(model, method)
    if method == "fused":
        _check_fusable(model)
        path = directory / MODEL_FILE
        with WeightFile(path) as weights:
            graph = _FusedDecoderGraph(model, manifest, weights).build()
        onnx.save_model(graph, path)
    elif method == "traced":
        _export_traced(model, manifest, directory / MODEL_FILE)
    else:
        raise ExportError(f"unknown export method {method!r}; expected auto, fused or traced")
    manifest.save(directory)
    return manifest


def supports_fused_graph(model: PreTrainedModel) -> bool:
    try:
        _check_fusable(model)
    except ExportError:
        return False
    return True


def _check_fusable(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type not in FUSED_MODEL_TYPES:
        raise ExportError(f"no fused graph for model type {config.model_type!r}")
    if config.hidden_act != "silu":
        raise ExportError(f"fused graph needs a SiLU MLP, not {config.hidden_act!r}")
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise ExportError("fused graph has no sliding-window attention")


def _manifest(model: PreTrainedModel, method: str) -> ExportManifest:
    config = model.config.get_text_config(decoder=True)
    eos = getattr(model.generation_config, "eos_token_id", None) or config.eos_token_id
    if eos is None:
        eos_ids: tuple[int, ...] = ()
    else:
        eos_ids = (int(eos),) if isinstance(eos, int) else tuple(int(token) for token in eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids or (0,))[0]
    return ExportManifest(
        format=EXPORT_FORMAT,
        method=method,
        model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
    )


def save_graph(graph: onnx.ModelProto, path: Path) -> None:
    """Save a graph, its weights inline unless protobuf's 2 GB limit forces a side file."""
    external = sum(t.ByteSize() for t in graph.graph.initializer) > _INLINE_WEIGHT_LIMIT
    onnx.save_model(
        graph,
        path,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )


class WeightFile:
    """The weights of a graph being built, written to its side file as they come.

    A graph that holds its weights inline is a second copy of the model in
    memory, and serialising it a third (SmolLM2-135M: 4.8 GB peak for 0.5 GB
    of weights). Written here one at a time, each weight is in memory only
    while it is converted; the graph keeps its name, offset and length.
    """

    ALIGNMENT = 64  # lets ONNX Runtime map the file and read each weight in place

    def __init__(self, model_path: Path) -> None:
        self.location = f"{model_path.name}.data"
        self._path = model_path.parent / self.location
        self._file = None

    def __enter__(self) -> WeightFile:
        self._file = self._path.open("wb")
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._file is not None
        self._file.flush()
        self._file.close()

    def tensor(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        """A tensor whose data is appended to the file (not held by the graph)."""
        assert self._file is not None, "use WeightFile as a context manager"
        value = np.ascontiguousarray(value)
        offset = -self._file.tell() % self.ALIGNMENT
        self._file.write(b"\0" * offset)
        start = self._file.tell()
        self._file.write(value.tobytes())
        tensor = TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape
        )
        tensor.data_location = TensorProto.EXTERNAL
        for key, entry in (
            ("location", self.location),
            ("offset", str(start)),
            ("length", str(value.nbytes)),
        ):
            tensor.external_data.add(key=key, value=entry)
        return tensor


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


class _FusedDecoderGraph:
    """Writes a Llama-family decoder as ONNX Runtime fused kernels.

    Per layer: SkipSimplifiedLayerNormalization (residual add and RMSNorm in
    one), one MatMul for q, k and v together, RotaryEmbedding on q and k,
    GroupQueryAttention (appends to the cache, masks and attends), the output
    MatMul, and the MLP as one gate-and-up MatMul, SiLU (QuickGelu with alpha
    1), Mul and the down MatMul.
    """

    def __init__(
        self, model: PreTrainedModel, manifest: ExportManifest, weights: WeightFile
    ) -> None:
        self.model = model
        self.manifest = manifest
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def build(self) -> onnx.ModelProto:
        decoder = self.model.model
        hidden = self.op(
            "Gather", [self.weight("embed_tokens", decoder.embed_tokens.weight), "input_ids"]
        )
        self._attention_inputs()
        self._rotary_caches(decoder.rotary_emb)
        residual: str | None = None
        for index, layer in enumerate(decoder.layers):
            normed, residual = self._rms_norm(hidden, residual, layer.input_layernorm)
            attended = self._attention(normed, layer.self_attn, index)
            normed, residual = self._rms_norm(attended, residual, layer.post_attention_layernorm)
            hidden = self._mlp(normed, layer.mlp)
        normed, _ = self._rms_norm(hidden, residual, decoder.norm)
        self._lm_head(normed, self.model.lm_head)
        return self._model_proto()

    def op(
        self, op_type: str, inputs: list[str], output: str = "", domain: str = "", **attrs
    ) -> str:
        """Append a single-output node; returns the name of its output."""
        return self.multi_op(op_type, inputs, [output] if output else 1, domain, **attrs)[0]

    def multi_op(
        self, op_type: str, inputs: list[str], outputs: int | list[str], domain: str = "", **attrs
    ) -> list[str]:
        """Append a node; `outputs` is a count of fresh names or the names themselves."""
        name = f"{op_type}_{len(self.nodes)}"
        names = [f"{name}_{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs)
        )
        return names

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """A constant kept in the side file (weights, caches): see `WeightFile`."""
        self.initializers.append(self.weights.tensor(name, _float32(tensor)))
        return name

    def _attention_inputs(self) -> None:
        """The per-step inputs every GroupQueryAttention shares, computed once per run.

        All rows have the same total length (left padding), so `seqlens_k` is
        total - 1 everywhere and padding is masked by an additive bias of
        float32 min, as transformers' eager attention does.
        """
        total = self.op(
            "Gather",
            [self.op("Shape", ["attention_mask"]), self.constant("one", np.array(1, np.int64))],
            axis=0,
        )
        self.op("Cast", [total], "total_sequence_length", to=TensorProto.INT32)
        batch = self.op("Shape", ["input_ids"], start=0, end=1)
        last = self.op(
            "Sub", ["total_sequence_length", self.constant("one_i32", np.array(1, np.int32))]
        )
        self.op("Expand", [last, batch], "seqlens_k")
        mask = self.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        masked = self.op("Sub", [mask, self.constant("one_f32", np.array(1, np.float32))])
        bias = self.op(
            "Mul",
            [masked, self.constant("mask_value", np.array(np.finfo(np.float32).max, np.float32))],
        )
        bias = self.op("Unsqueeze", [bias, self.constant("axes_1_2", np.array([1, 2], np.int64))])
        seq = self.op("Shape", ["input_ids"], start=1, end=2)
        shape = self.op(
            "Concat",
            [
                self.constant("ones_2", np.array([1, 1], np.int64)),
                seq,
                self.constant("ones_1", np.array([1], np.int64)),
            ],
            axis=0,
        )
        self.op("Expand", [bias, shape], "attention_bias")

    def _rotary_caches(self, rotary: torch.nn.Module) -> None:
        """cos and sin for every position from the model's own rotary module.

        Any rope scaling that depends on the position alone is thereby exported as is.
        """
        device = self.model.model.embed_tokens.weight.device
        positions = torch.arange(self.manifest.max_positions, device=device).unsqueeze(0)
        with torch.no_grad():
            # The first argument only carries the dtype and device of the result.
            cos, sin = rotary(torch.zeros(1, device=device), positions)
        half = self.manifest.head_dim // 2
        if cos.shape[-1] != self.manifest.head_dim:
            raise ExportError("fused graph needs rotary embedding over the whole head")
        self.weight("cos_cache", cos[0, :, :half])
        self.weight("sin_cache", sin[0, :, :half])

    def _rms_norm(
        self, hidden: str, residual: str | None, norm: torch.nn.Module
    ) -> tuple[str, str]:
        """RMSNorm of hidden + residual; returns (normalised, new residual stream)."""
        epsilon = float(norm.variance_epsilon)
        weight = self.weight(f"norm_{len(self.nodes)}", norm.weight)
        if residual is None:
            return self.op(
                "SimplifiedLayerNormalization", [hidden, weight], axis=-1, epsilon=epsilon
            ), hidden
        normed, _, _, summed = self.multi_op(
            "SkipSimplifiedLayerNormalization",
            [hidden, residual, weight],
            4,
            "com.microsoft",
            epsilon=epsilon,
        )
        return normed, summed

    def _linear(self, hidden: str, layers: list[torch.nn.Linear]) -> str:
        """One MatMul (and bias Add) for several linear layers that read the same input."""
        index = len(self.nodes)
        weight = torch.cat([layer.weight for layer in layers]).T
        out = self.op("MatMul", [hidden, self.weight(f"linear_{index}", weight)])
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat(
                [
                    layer.bias
                    if layer.bias is not None
                    else layer.weight.new_zeros(layer.out_features)
                    for layer in layers
                ]
            )
            out = self.op("Add", [out, self.weight(f"linear_{index}_bias", bias)])
        return out

    def _split(self, packed: str, sizes: list[int]) -> list[str]:
        sizes_name = self.constant(f"split_{len(self.nodes)}", np.array(sizes, np.int64))
        return self.multi_op("Split", [packed, sizes_name], len(sizes), axis=-1)

    def _attention(self, hidden: str, attention: torch.nn.Module, index: int) -> str:
        config = self.model.config
        heads, kv_heads, head_dim = (
            config.num_attention_heads,
            self.manifest.num_kv_heads,
            self.manifest.head_dim,
        )
        packed = self._linear(hidden, [attention.q_proj, attention.k_proj, attention.v_proj])
        query, key, value = self._split(
            packed, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        )
        rotary = ["position_ids", "cos_cache", "sin_cache"]
        query = self.op(
            "RotaryEmbedding", [query, *rotary], domain="com.microsoft", num_heads=heads
        )
        key = self.op("RotaryEmbedding", [key, *rotary], domain="com.microsoft", num_heads=kv_heads)
        attended = self.multi_op(
            "GroupQueryAttention",
            [
                query,
                key,
                value,
                f"past_key_values.{index}.key",
                f"past_key_values.{index}.value",
                "seqlens_k",
                "total_sequence_length",
                "",
                "",
                "",  # cos/sin caches and positions: rotary is applied above, per row
                "attention_bias",
            ],
            [f"attention_{index}", f"present.{index}.key", f"present.{index}.value"],
            "com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(attention.scaling),
        )[0]
        return self._linear(attended, [attention.o_proj])

    def _mlp(self, hidden: str, mlp: torch.nn.Module) -> str:
        packed = self._linear(hidden, [mlp.gate_proj, mlp.up_proj])
        gate, up = self._split(packed, [mlp.gate_proj.out_features, mlp.up_proj.out_features])
        activated = self.op("QuickGelu", [gate], domain="com.microsoft", alpha=1.0)
        return self._linear(self.op("Mul", [activated, up]), [mlp.down_proj])

    def _lm_head(self, hidden: str, head: torch.nn.Linear) -> None:
        """Gemm with transB reads the [vocab, hidden] matrix as stored: tied weights stay single."""
        flat = self.op(
            "Reshape",
            [
                hidden,
                self.constant(
                    "flat_shape", np.array([-1, self.model.config.hidden_size], np.int64)
                ),
            ],
        )
        tied = head.weight is self.model.model.embed_tokens.weight
        weight = "embed_tokens" if tied else self.weight("lm_head", head.weight)
        inputs = [flat, weight] + (
            [self.weight("lm_head_bias", head.bias)] if head.bias is not None else []
        )
        logits = self.op("Gemm", inputs, transB=1)
        shape = self.op(
            "Concat",
            [
                self.op("Shape", ["input_ids"]),
                self.constant("vocab", np.array([self.manifest.vocab_size], np.int64)),
            ],
            axis=0,
        )
        self.op("Reshape", [logits, shape], "logits")

    def _model_proto(self) -> onnx.ModelProto:
        m = self.manifest
        cache = ["batch", m.num_kv_heads, "past", m.head_dim]
        present = ["batch", m.num_kv_heads, "total", m.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        ] + [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in m.past_names()
        ]
        outputs = [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", "seq", m.vocab_size]
            )
        ] + [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, present)
            for name in m.present_names()
        ]
        graph = helper.make_graph(self.nodes, "lethe_decoder", inputs, outputs, self.initializers)
        standard = helper.make_opsetid("", ONNX_OPSET)
        opsets = [standard, helper.make_opsetid("com.microsoft", 1)]
        return helper.make_model(
            graph,
            opset_imports=opsets,
            ir_version=helper.find_min_ir_version_for([standard]),
            producer_name="lethe",
        )


class _FlatCacheDecoder(torch.nn.Module):
    """The model's forward with the cache as flat tensors, as an ONNX graph takes and gives it."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for index in range(len(past) // 2):
            cache.update(past[2 * index], past[2 * index + 1], index)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def _export_traced(model: PreTrainedModel, manifest: ExportManifest, path: Path) -> None:
    """torch.export-based export with example shapes that no dimension can be specialised to.

    An example batch of 1 (or a length of 0 or 1) would be baked in as a
    constant, so the example has batch 2, 3 new tokens and 4 cached ones.
    """
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        raise ExportError("traced export needs a full-attention cache in every layer")
    batch, new, cached = 2, 3, 4
    device = next(model.parameters()).device
    shape = (batch, manifest.num_kv_heads, cached, manifest.head_dim)
    past = tuple(torch.zeros(shape, device=device) for _ in manifest.past_names())
    example = (
        torch.full((batch, new), manifest.pad_token_id, dtype=torch.int64, device=device),
        torch.ones(batch, cached + new, dtype=torch.int64, device=device),
        torch.arange(cached, cached + new, device=device).expand(batch, new),
        past,
    )
    dims = {name: torch.export.Dim(name) for name in ("batch", "seq", "past", "total")}
    dynamic_shapes = (
        {0: dims["batch"], 1: dims["seq"]},
        {0: dims["batch"], 1: dims["total"]},
        {0: dims["batch"], 1: dims["seq"]},
        tuple({0: dims["batch"], 2: dims["past"]} for _ in past),
    )
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    wrapper = _FlatCacheDecoder(model).eval()
    program = torch.onnx.export(
        wrapper,
        example,
        input_names=["input_ids", "attention_mask", "position_ids", *manifest.past_names()],
        output_names=["logits", *manifest.present_names()],
        dynamic_shapes=dynamic_shapes,
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))
