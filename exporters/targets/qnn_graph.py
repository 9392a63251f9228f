#!/usr/bin/env python3
"""A QDQ A16W8 version of an ONNX export for the Hexagon NPU, run on QNN's HTP emulator.

Runs inside the ``qnn-htp`` target's own environment (onnxruntime + onnxruntime-qnn + onnx +
numpy); nothing from this project is imported but the sibling ``device_runner.py`` (standalone too),
whose task decoding every ONNX session shares. Steps, each needed for HTP:

1. static shapes: the decoder step's ``seq`` and ``past_len`` fixed (HTP has no dynamic shapes);
2. constant folding (ORT basic optimisation, twice: the first pass inlines CastLike functions),
   which removes the shape arithmetic, the causal-mask construction and the rotary tables;
3. the NaN guard after each attention Softmax, ``Where(IsNaN(x), 0, x)``, is dropped: HTP has no
   IsNaN, and with a causal mask no row is fully masked, so it is the identity here;
4. the task slots become plain inputs for quantisation (their zero defaults come back after), so
   the quantiser gives each one a fixed 16-bit encoding calibrated on every task's slot values
   instead of folding them into constant weights;
5. ``qnn_preprocess_model`` + ``get_qnn_qdq_config`` (16-bit activations, 8-bit weights: A8W8 loses
   the LoRA effect, FIELD_NOTES) + ``quantize``.

The check then opens the QDQ graph with the QNN execution provider (``backend_type=htp``) and
``session.disable_cpu_ep_fallback=1``: the session only opens if every node runs on the NPU. It
switches tasks by feeding each task's decoded slots (the task decoder runs on the CPU, once per
task load, as on the host) through the sequence given, and compares every output with the fp32
export on the CPU execution provider.

Usage: ``python qnn_graph.py EXPORT WORKDIR --seq 8 --past 2 --tasks a,b,a`` -> ``WORKDIR/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from device_runner import BankSlots, Export  # the sibling standalone runner (run as a script: its folder is on sys.path)


def fold(src: str, dst: str) -> None:
    for i in range(2):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 3
        ort.InferenceSession(src if i == 0 else dst, so, providers=["CPUExecutionProvider"])


def drop_nan_guards(model: onnx.ModelProto) -> int:
    producers = {o: n for n in model.graph.node for o in n.output}
    rename: dict[str, str] = {}
    for node in list(model.graph.node):
        guard = producers.get(node.input[0]) if node.op_type == "Where" else None
        if guard is not None and guard.op_type == "IsNaN" and guard.input[0] == node.input[2]:
            rename[node.output[0]] = node.input[2]
            model.graph.node.remove(guard)
            model.graph.node.remove(node)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return len(rename)


def htp_session(path: str, fallback: bool = False):
    import onnxruntime_qnn

    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices[:1], {"backend_type": "htp"})
    return ort.InferenceSession(path, so)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("workdir")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--past", type=int, default=2)
    p.add_argument("--tasks", default="")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--calibration", type=int, default=4, help="random token windows per task")
    a = p.parse_args()
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    os.makedirs(a.workdir, exist_ok=True)
    w = lambda name: os.path.join(a.workdir, name)  # noqa: E731
    manifest = json.load(open(os.path.join(a.export, "manifest.json")))
    m = manifest["model"]
    n_kv, kv_shape = 2 * m["n_layers"], (1, m["kv_heads"], 0, m["head_dim"])
    model = onnx.load(os.path.join(a.export, "model.onnx"))
    make_dim_param_fixed(model.graph, "seq", a.seq)
    make_dim_param_fixed(model.graph, "past_len", a.past)
    fix_output_shapes(model)
    onnx.save(model, w("static.onnx"))
    fold(w("static.onnx"), w("folded.onnx"))
    model = onnx.load(w("folded.onnx"))
    guards = drop_nan_guards(model)
    slots = [i.name for i in model.graph.input if i.name.endswith((".lora_a", ".lora_b"))]
    defaults = [i for i in model.graph.initializer if i.name in slots]
    kept = [i for i in model.graph.initializer if i.name not in slots]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, w("pure.onnx"))

    cpu = ort.InferenceSession(os.path.join(a.export, "model.onnx"), providers=["CPUExecutionProvider"])
    export = Export(a.export)
    bank = BankSlots(manifest)
    bank.load_shared(export.verified(export.find("shared"), "the shared file"))
    rng = np.random.default_rng(0)
    decoded = {t: bank.task_slots(t, export.verified_task_file(t)) for t in manifest["tasks"]}

    def window(task: str, ids: np.ndarray) -> dict:
        """The first ``past`` tokens through the fp32 graph on the CPU: the KV cache the NPU step continues."""
        empty = {f"past.{i}": np.zeros(kv_shape, np.float32) for i in range(n_kv)}
        out = cpu.run(None, {"input_ids": ids[None, : a.past].astype(np.int64), **empty, **decoded[task]})
        return {"input_ids": ids[None, a.past:].astype(np.int64), **{f"past.{i}": out[1 + i] for i in range(n_kv)}, **decoded[task]}

    calib = [window(t, rng.integers(0, m["vocab_size"], a.past + a.seq)) for t in manifest["tasks"] for _ in range(a.calibration)]
    reader = type("Reader", (), {"it": iter(calib), "get_next": lambda self: next(self.it, None)})()
    src = w("pre.onnx") if qnn_preprocess_model(w("pure.onnx"), w("pre.onnx")) else w("pure.onnx")
    t0 = time.perf_counter()
    config = get_qnn_qdq_config(onnx.load(src), reader, activation_type=QuantType.QUInt16, weight_type=QuantType.QUInt8, per_channel=a.per_channel)
    quantize(src, w("qdq.onnx"), config)
    quantize_s = time.perf_counter() - t0
    qdq = onnx.load(w("qdq.onnx"))
    names = {d.name for d in defaults}
    for d in defaults:  # zero defaults again: a run without task slots is the base model
        qdq.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(d)), d.name))
    assert names <= {i.name for i in qdq.graph.input}
    onnx.save(qdq, w("qdq.onnx"))

    report: dict = {"ort": ort.__version__, "guards_dropped": guards, "slots": len(slots), "quantize_s": quantize_s,
                    "nodes": len(qdq.graph.node), "ops": sorted({n.op_type for n in qdq.graph.node}),
                    "bytes_qdq": os.path.getsize(w("qdq.onnx")), "seq": a.seq, "past": a.past}
    try:  # the unquantised static graph still has ops HTP lacks: proves the fallback check can fail
        htp_session(w("static.onnx"))
        report["static_graph_on_htp"] = "opened"
    except Exception as e:  # noqa: BLE001
        report["static_graph_on_htp"] = f"refused: {str(e)[:300]}"
    t0 = time.perf_counter()
    session = htp_session(w("qdq.onnx"))
    report["htp_session_ms"] = (time.perf_counter() - t0) * 1e3
    ids = rng.integers(0, m["vocab_size"], a.past + a.seq)
    runs = []
    arrays = {}
    for k, task in enumerate([t for t in a.tasks.split(",") if t] or manifest["tasks"]):
        feeds = window(task, ids)
        t0 = time.perf_counter()
        got = session.run(["logits"], feeds)[0][0]
        ms = (time.perf_counter() - t0) * 1e3
        ref = cpu.run(["logits"], feeds)[0][0]
        others = {t: float(np.abs(got - cpu.run(["logits"], window(t, ids))[0][0]).max()) for t in manifest["tasks"] if t != task}
        arrays[f"{k}"] = got
        runs.append({"task": task, "run_ms": ms, "max_err_vs_fp32": float(np.abs(got - ref).max()),
                     "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "max_err_vs_other_tasks": others})
    report["runs"] = runs
    np.savez(w("logits.npz"), **arrays)
    json.dump(report, open(w("report.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
