"""Apply an ONNX ``--quant`` recipe (``exporters/onnx_recipes.py``) with ONNX Runtime's own
``MatMulNBitsQuantizer``: nothing here quantises by hand."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.onnx_recipes import HEAD, OnnxQuant


def weight_sources(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node name -> the initializer its weight (second input) comes from, through
    Transpose/Cast/Identity; MatMuls whose weight is not a constant are left out."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        name = node.input[1]
        while name in producers and producers[name].op_type in ("Transpose", "Cast", "Identity"):
            name = producers[name].input[0]
        if name in inits:
            out[node.name] = name
    return out


def fold_weight_transposes(model: onnx.ModelProto) -> list[str]:
    """Give every base MatMul a constant (d_in, d_out) weight so the quantiser sees it.

    Returns the names of the LoRA MatMuls, which must stay unquantised.
    """
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    lora_nodes: list[str] = []
    new_inits: dict[str, onnx.TensorProto] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        source, chain = node.input[1], []
        while source in producers and producers[source].op_type in ("Transpose", "Cast", "Identity"):
            chain.append(producers[source].op_type)
            source = producers[source].input[0]
        if "lora_" in source:
            lora_nodes.append(node.name)
            continue
        if source in inits and chain == ["Transpose"]:
            folded = source + ".T"
            if folded not in new_inits:
                new_inits[folded] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[source]).T), folded)
            node.input[1] = folded
    model.graph.initializer.extend(new_inits.values())
    used = {name for n in model.graph.node for name in n.input}  # Transposes and initializers nothing reads any more
    alive = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(alive)
    used = {name for n in model.graph.node for name in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return lora_nodes


def quantize(model: onnx.ModelProto, quant: OnnxQuant) -> onnx.ModelProto:
    """``model`` (fp32, slots as graph inputs) with ``quant``'s weights: one quantiser pass per weight
    width, each over the MatMuls of that width (and, in the 4-bit pass, the embedding Gather)."""
    if quant.bits == 32:
        return model
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # one INFO line per node otherwise

    lora_nodes = fold_weight_transposes(model)
    sources = {n: s for n, s in weight_sources(model).items() if n not in lora_nodes}
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and re.search(HEAD, n.input[0])]
    by_bits: dict[int, list[str]] = {}
    for node, weight in sources.items():
        by_bits.setdefault(quant.bits_of(weight), []).append(node)
    if quant.embedding_4bit:
        by_bits.setdefault(4, [])
    for bits in sorted(by_bits, reverse=True):
        if bits == 32:
            continue
        include = by_bits[bits] + (gathers if quant.embedding_4bit and bits == 4 else [])
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=quant.block_size, is_symmetric=quant.symmetric, accuracy_level=quant.accuracy_level,
            nodes_to_include=include, op_types_to_quantize=(),  # only the nodes listed
            nodes_to_exclude=[n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in include],
        )
        quantizer.process()
        model = quantizer.model.model
    return model
