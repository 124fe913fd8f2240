"""Weight-only quantised copies of an ONNX export, for devices short of memory bandwidth.

A decode step of a small LLM on a CPU streams every weight once per token, so
its time is bounded by weight bytes over memory bandwidth. Storing the MatMul
weights in 4 or 8 bits (ONNX Runtime's `MatMulNBits`, blockwise scales,
activations stay float32) cuts those bytes 4-8x. The fp32 export stays the
reference: a quantised copy is made from it, carries its own manifest field
(`weights`), and is served only when a caller asks for it, because it changes
answers (`lethe bench inference` measures by how much).

The fused export reads the language-model head from the tied embedding matrix
through a `Gemm` (one copy of the weights); quantisation unties it into a
`MatMul` over a transposed copy, so that the head, a fifth of SmolLM2's
weights, is quantised too (always to 8 bits), while the embedding lookup keeps
float32 rows.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_models.onnx_export import MANIFEST_FILE, MODEL_FILE, ExportManifest, save_graph

QuantisedWeights = Literal["int4", "int8"]
BITS: dict[str, int] = {"int4": 4, "int8": 8}
DEFAULT_BLOCK_SIZE = 32


def quantise_export(
    source: Path,
    target: Path,
    weights: QuantisedWeights = "int4",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> ExportManifest:
    """Write a weight-only quantised copy of the fp32 export in `source` into `target`.

    `target` must exist; the tokenizer files beside the graph are copied along.
    """
    if weights not in BITS:
        raise ValueError(f"weights must be one of {sorted(BITS)}, got {weights!r}")
    manifest = ExportManifest.load(source)
    if manifest.weights != "float32":
        raise ValueError(f"{source} is already quantised ({manifest.weights})")
    graph = onnx.load(str(source / MODEL_FILE))
    head = _untie_head(graph)
    # The head decides every token among 49k and measured the most sensitive to 4 bits
    # (top-1 agreement with fp32 fell from 82% to 63% when it joined the layers at 4 bits),
    # so it keeps 8 bits at the cost of a few MB.
    graph = _quantised(graph, BITS[weights], block_size, exclude=[head] if head else [])
    if head:
        graph = _quantised(graph, max(BITS[weights], 8), block_size, include=[head])
    save_graph(graph, target / MODEL_FILE)
    for extra in source.iterdir():
        # The tokenizer files go along; the graph (and any weights file beside it) does not.
        if (
            extra.is_file()
            and extra.name != MANIFEST_FILE
            and not extra.name.startswith(MODEL_FILE)
        ):
            shutil.copy2(extra, target / extra.name)
    quantised = dataclasses.replace(manifest, weights=weights)
    quantised.save(target)
    return quantised


def _quantised(
    graph: onnx.ModelProto,
    bits: int,
    block_size: int,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> onnx.ModelProto:
    """The graph with its MatMuls (those in `include`, all but `exclude`) in `bits` bits.

    Asymmetric blocks with integer zero points and accuracy level 4 (int8
    activations in the kernel) are the layout ONNX Runtime's CPU kernels run
    fastest; HQQ's float zero points measured 17x slower per token.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        graph,
        bits=bits,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=4,
        nodes_to_include=include,
        nodes_to_exclude=exclude or [],
    )
    quantizer.process()
    return quantizer.model.model


def _untie_head(graph: onnx.ModelProto) -> str | None:
    """Replace the head's `Gemm(hidden, embeddings, transB=1)` by a `MatMul` on its own copy.

    Returns the new node's name (None when the graph has no such head).
    """
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    for index, node in enumerate(graph.graph.node):
        if node.op_type != "Gemm" or len(node.input) != 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        weight = initializers.get(node.input[1])
        if not trans_b or weight is None:
            continue
        transposed = np.ascontiguousarray(numpy_helper.to_array(weight).T)
        name = f"{node.input[1]}_head_t"
        graph.graph.initializer.append(numpy_helper.from_array(transposed, name))
        graph.graph.node.remove(node)
        graph.graph.node.insert(
            index, helper.make_node("MatMul", [node.input[0], name], list(node.output), node.name)
        )
        if not any(node.input[1] in other.input for other in graph.graph.node):
            graph.graph.initializer.remove(weight)  # an untied head's matrix: now unused
        return node.name
    return None
