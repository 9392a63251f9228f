#!/usr/bin/env python3
"""Single QDQ ops on HTP vs the CPU EP, 16-bit activations: how exact the emulated NPU is per op.

Runs inside the ``qnn-htp`` target's own environment. Hand-built graphs (input -> Q/DQ -> op ->
Q/DQ -> output, scales from the data's min/max) on seeded random data shaped like the real model's:
a MatMul of two dynamic inputs (LoRA A: [4, 576] x [576, 8], the second input 16-bit, then 8-bit),
the same MatMul with a constant 8-bit weight, and an attention Softmax over scores with masked
entries at -100. Per op: relative L2 error vs fp32 on the CPU EP and on HTP (CPU fallback disabled),
and, for the MatMuls, the distance of HTP's output from numpy simulations of the Q/DQ arithmetic with
the second input kept at 16 bits or re-quantised to 8 bits.

Usage: ``python qnn_op_probe.py OUT.json``
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qnn_graph import htp_session


def qparams(lo: float, hi: float, levels: int = 65535) -> tuple[np.float32, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels
    return np.float32(scale), int(round(-lo / scale))


def qdq(x: np.ndarray, scale: float, zp: int, levels: int = 65535) -> np.ndarray:
    return ((np.clip(np.round(x / scale) + zp, 0, levels) - zp) * scale).astype(np.float32)


def build(op: str, inputs: list, out_shape: list, out_range: tuple, path: str, attrs: dict | None = None) -> None:
    """``inputs``: (shape, (lo, hi), bits, constant array or None) per op input."""
    nodes, inits, graph_inputs, names = [], [], [], []
    for i, (shape, (lo, hi), bits, const) in enumerate(inputs):
        dtype, levels = (TensorProto.UINT16, 65535) if bits == 16 else (TensorProto.UINT8, 255)
        scale, zp = qparams(lo, hi, levels)
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s{i}"), helper.make_tensor(f"z{i}", dtype, [], [zp])]
        if const is None:
            graph_inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, shape))
            nodes.append(helper.make_node("QuantizeLinear", [f"x{i}", f"s{i}", f"z{i}"], [f"q{i}"]))
        else:  # a constant weight: stored quantised, as the quantiser writes weights
            codes = np.clip(np.round(const / scale) + zp, 0, levels).astype(np.uint16 if bits == 16 else np.uint8)
            inits.append(numpy_helper.from_array(codes, f"q{i}"))
        nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"]))
        names.append(f"d{i}")
    scale, zp = qparams(*out_range)
    inits += [numpy_helper.from_array(np.array(scale, np.float32), "so"), helper.make_tensor("zo", TensorProto.UINT16, [], [zp])]
    nodes += [helper.make_node(op, names, ["y"], **(attrs or {})), helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["qy"]),
              helper.make_node("DequantizeLinear", ["qy", "so", "zo"], ["out"])]
    graph = helper.make_graph(nodes, op, graph_inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    out, work = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    res: dict = {}
    x = rng.normal(0, 1, (1, 4, 576)).astype(np.float32)
    w = rng.normal(0, 0.05, (576, 8)).astype(np.float32)
    rx, rw = (float(x.min()), float(x.max())), (float(w.min()), float(w.max()))
    y = x @ w
    ry = (float(y.min()) * 1.1, float(y.max()) * 1.1)
    xq = qdq(x, *qparams(*rx))
    sims = {"16": xq @ qdq(w, *qparams(*rw)), "8": xq @ qdq(w, *qparams(*rw, 255), 255)}
    for label, bits, const in (("matmul dynamic x dynamic 16-bit", 16, None), ("matmul dynamic x dynamic 8-bit", 8, None),
                               ("matmul dynamic x constant 8-bit weight", 8, w)):
        path = f"{work}/probe_{len(res)}.onnx"
        build("MatMul", [([1, 4, 576], rx, 16, None), ([576, 8], rw, bits, const)], [1, 4, 8], ry, path)
        feeds = {"x0": x, **({"x1": w} if const is None else {})}
        cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        htp = htp_session(path).run(None, feeds)[0]
        res[label] = {"rel_err_cpu": rel(cpu, y), "rel_err_htp": rel(htp, y), "rel_diff_htp_vs_cpu": rel(htp, cpu),
                      "rel_diff_htp_vs_sim_16bit_in1": rel(htp, sims["16"]), "rel_diff_htp_vs_sim_8bit_in1": rel(htp, sims["8"])}
    s = rng.normal(0, 3, (1, 9, 4, 20)).astype(np.float32)
    s[..., 17:] = -100.0
    path = f"{work}/probe_softmax.onnx"
    build("Softmax", [([1, 9, 4, 20], (-100.0, float(s.max())), 16, None)], [1, 9, 4, 20], (0.0, 1.0), path, {"axis": -1})
    ys = np.exp(s - s.max(-1, keepdims=True))
    ys /= ys.sum(-1, keepdims=True)
    cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x0": s})[0]
    htp = htp_session(path).run(None, {"x0": s})[0]
    res["softmax (masked at -100)"] = {"rel_err_cpu": rel(cpu, ys), "rel_err_htp": rel(htp, ys), "rel_diff_htp_vs_cpu": rel(htp, cpu)}
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
