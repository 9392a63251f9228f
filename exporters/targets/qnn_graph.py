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
   the folded causal mask's ``float32`` minimum (-3.4e38) becomes ``MASK_VALUE`` (``finite_masks``);
   each ``Reciprocal`` (RMSNorm's 1/sqrt) becomes ``Div(1, x)`` (``reciprocals_as_div``);
4. the task slots become plain inputs for quantisation (their zero defaults come back after), so
   the quantiser gives each one a fixed 16-bit encoding calibrated on every task's slot values
   instead of folding them into constant weights; so does the folded causal mask (``attention_bias``,
   default: the mask), so that a prompt shorter than the static cache runs left-padded with the
   padding masked (``--ids`` examples ``{"cached": ids, "step": ids}``; the cached keys are moved to
   their padded positions with ``rope_shift``, checked against the unpadded fp32 graph);
5. ``qnn_preprocess_model`` + ``get_qnn_qdq_config`` (16-bit activations, 8-bit weights: A8W8 loses
   the LoRA effect, FIELD_NOTES) + ``quantize``.

The check then opens the QDQ graph with the QNN execution provider (``backend_type=htp``) and
``session.disable_cpu_ep_fallback=1``: the session only opens if every node runs on the NPU. It
switches tasks by feeding each task's decoded slots (the task decoder runs on the CPU, once per
task load, as on the host) through the sequence given, and compares every output with the fp32
export on the CPU execution provider.

With ``--archs 73,75,79`` each QDQ graph is also compiled offline (``ep.context_enable=1``) into one HTP
context binary per SoC generation, reloaded from its EPContext model without CPU fallback, and run
through ``--context-tasks`` (the switch is a feed: one binary serves every task).

Usage: ``python qnn_graph.py EXPORT WORKDIR --seq 8 --past 2 --tasks a,b,a [--quants a16w8,a8w8] [--archs 73,75,79]``
-> ``WORKDIR/report.json``, ``WORKDIR/logits.npz``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

from device_runner import BankSlots, Export, report_progress  # the sibling standalone runner (run as a script: its folder is on sys.path)
from onnx_edit import rename_inputs


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
    rename_inputs(model.graph, rename)
    return len(rename)


# What a masked attention score becomes (was the float32 minimum). The quantiser calibrates the
# range of ``scores + mask`` (the Softmax input) from its min and max: with -3.4e38 in it a 16-bit
# step is 5.2e33, every unmasked score rounds to the same value and attention becomes uniform over
# the unmasked keys (SmolLM2-135M: max logit error ~30, top-1 agreement 0.25). At -100 the step is
# ~0.003 at real width (scores within +-40), while a masked key still weighs exp(-100 + 80) < 3e-9
# of the row's largest even if the masked score were 80 above the unmasked maximum: the fp32 graph
# is unchanged to float precision.
MASK_VALUE = -100.0


def finite_masks(model: onnx.ModelProto, value: float = MASK_VALUE) -> int:
    """Set every entry below -1e30 of the constant additive masks in front of a Softmax (``Add(scores,
    mask) -> Softmax``) to ``value``; returns how many mask initializers changed."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    changed = set()
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        for name in add.input if add is not None and add.op_type == "Add" else ():
            if name in inits and name not in changed:
                mask = onnx.numpy_helper.to_array(inits[name])
                if mask.dtype == np.float32 and (mask < -1e30).any():
                    inits[name].CopyFrom(onnx.numpy_helper.from_array(np.where(mask < -1e30, np.float32(value), mask), name))
                    changed.add(name)
    return len(changed)


BIAS = "attention_bias"


def mask_as_input(model: onnx.ModelProto) -> onnx.TensorProto | None:
    """Make the folded causal mask (the constant added to every attention score in front of the Softmax)
    one graph input, ``attention_bias``, whose default is that mask; returns the default (None if there is
    no such mask). With a static ``past`` a shorter prompt then fits too: its cache is left-padded and the
    padded key columns are fed ``MASK_VALUE`` (``padded_window``), so one graph serves every prompt up to
    ``past`` tokens. Run after ``finite_masks``; several masks must be equal (one per layer after folding)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "Softmax" else None
        names += [x for x in (add.input if add is not None and add.op_type == "Add" else ()) if x in inits and x not in names]
    if not names:
        return None
    value = onnx.numpy_helper.to_array(inits[names[0]])
    for name in names[1:]:
        if not np.array_equal(onnx.numpy_helper.to_array(inits[name]), value):
            raise ValueError(f"mask_as_input: the attention masks {names[0]} and {name} differ")
    rename_inputs(model.graph, {name: BIAS for name in names})
    kept = [i for i in model.graph.initializer if i.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.append(onnx.helper.make_tensor_value_info(BIAS, onnx.TensorProto.FLOAT, list(value.shape)))
    return onnx.numpy_helper.from_array(value, BIAS)


def rope_shift(keys: np.ndarray, delta: int, theta: float) -> np.ndarray:
    """Cached keys (..., head_dim), rotated by Llama's default RoPE at their positions, moved ``delta``
    positions later: RoPE rotates each pair of channels (i, i + head_dim / 2) by position x frequency, and
    rotations add, so one more rotation by ``delta`` x frequency gives the keys at the new positions
    (attention depends only on query minus key position)."""
    half = keys.shape[-1] // 2
    angle = delta / theta ** (np.arange(half, dtype=np.float64) * 2 / keys.shape[-1])
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    rotated = np.concatenate([-keys[..., half:], keys[..., :half]], axis=-1)
    return (keys * cos + rotated * sin).astype(np.float32)


def reciprocals_as_div(model: onnx.ModelProto) -> int:
    """Replace every ``Reciprocal(x)`` by ``Div(1, x)`` with a constant 1 (returns how many).

    The QNN EP (onnxruntime-qnn 2.7.0) runs a quantised Reciprocal on HTP as a division of a constant
    1 that it encodes with the *input's* encoding: the RMSNorm input ``sqrt(mean(x^2) + eps)`` spans
    [0, 0.14] in SmolLM2's first layer, so 1 is clipped to 0.14 and every normalised activation is
    0.14x its value (measured: HTP vs the same QDQ graph on the CPU EP, ``rsqrt`` relative error
    0.86 = 1 - 0.14, while the Sqrt before it agrees to 5e-4). The CPU EP runs the QDQ graph as
    written and shows nothing. With an explicit 1 the quantiser gives the constant its own encoding."""
    from onnx import helper, numpy_helper

    count = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Reciprocal":
            one = f"{node.output[0]}.one"
            model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            model.graph.node[i].CopyFrom(helper.make_node("Div", [one, node.input[0]], list(node.output), node.name))
            count += 1
    return count


def linear_convs(model: onnx.ModelProto) -> int:
    """Rewrite every ``MatMul(x, W)`` with a constant 2-D ``W`` [K, N] as a 1x1 ``Conv`` (returns how many).

    The QNN EP has no per-channel MatMul (the quantiser keeps MatMul weights per tensor and a
    per-channel one is left to the CPU), but its Conv takes per-output-channel weights. With the
    rows of ``x`` [..., K] as the batch, ``Reshape(Conv(Reshape(x, [R, K, 1, 1]), W^T as [N, K, 1, 1]),
    [..., N])`` is the same product: output row r, channel n = sum_k x[r, k] W[k, n]. Per output
    channel each column of W gets its own 8-bit scale instead of one for the whole matrix (SmolLM2's
    columns differ in range by up to ~10x). Needs static shapes (after ``make_dim_param_fixed``)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input]}
    inits = {i.name: i for i in graph.initializer}
    convs: dict[str, str] = {}
    nodes, count = [], 0
    for node in graph.node:
        x, w = node.input if node.op_type == "MatMul" else ("", "")
        shape = shapes.get(x, [])
        if w not in inits or len(inits[w].dims) != 2 or not shape or 0 in shape:
            nodes.append(node)
            continue
        k, n = inits[w].dims
        if w not in convs:
            convs[w] = f"{w}.conv1x1"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[w]).T[:, :, None, None]), convs[w]))
        rows = int(np.prod(shape[:-1]))
        out = node.output[0]
        for name, value in ((f"{out}.rows_shape", [rows, k, 1, 1]), (f"{out}.out_shape", [*shape[:-1], n])):
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
        nodes += [helper.make_node("Reshape", [x, f"{out}.rows_shape"], [f"{out}.rows"], f"{node.name}.rows"),
                  helper.make_node("Conv", [f"{out}.rows", convs[w]], [f"{out}.conv"], f"{node.name}.conv1x1"),
                  helper.make_node("Reshape", [f"{out}.conv", f"{out}.out_shape"], [out], f"{node.name}.out")]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used or i.name in {g.name for g in graph.input}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


QUANTS = {"a16w8": ("QUInt16", "QUInt8"), "a8w8": ("QUInt8", "QUInt8"), "a16w16": ("QUInt16", "QUInt16")}


def htp_session(path: str, fallback: bool = False, arch: str | None = None, config: dict | None = None):
    """A session on the HTP backend; with ``fallback`` False it opens only if every node runs on the NPU."""
    import onnxruntime_qnn

    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(devices[:1], {"backend_type": "htp", **({"htp_arch": arch} if arch else {})})
    return ort.InferenceSession(path, so)


def context_binary(qdq: str, workdir: str, arch: str) -> dict:
    """Compile ``qdq`` offline for ``htp_arch`` ``arch``: ``ctx_v<arch>.onnx`` (an EPContext node) and
    ``ctx_v<arch>_qnn.bin`` (the HTP context binary a phone loads).

    ORT writes the EPContext model with only the inputs that had no initializer: the task slots
    (inputs with zero defaults) stay node inputs but drop out of the graph's inputs, and the
    reloaded session then refuses the graph ("count of graph inputs should be at least the count
    of tensor_wrapper"). They are put back as graph inputs (zero defaults kept), so one binary
    serves every task by feeding its slots."""
    ctx = os.path.join(workdir, f"ctx_v{arch}.onnx")
    binary = os.path.join(workdir, f"ctx_v{arch}_qnn.bin")
    for stale in (ctx, binary):
        if os.path.exists(stale):
            os.remove(stale)
    t0 = time.perf_counter()
    htp_session(qdq, arch=arch, config={"ep.context_enable": "1", "ep.context_file_path": ctx, "ep.context_embed_mode": "0"})
    compile_s = time.perf_counter() - t0
    inputs = {i.name: i for i in onnx.load(qdq, load_external_data=False).graph.input}
    model = onnx.load(ctx)
    (node,) = model.graph.node
    assert node.op_type == "EPContext", node.op_type
    have = {i.name for i in model.graph.input}
    model.graph.input.extend([inputs[n] for n in node.input if n not in have])
    onnx.save(model, ctx)
    return {"htp_arch": arch, "compile_s": compile_s, "bytes_binary": os.path.getsize(binary), "bytes_epcontext_onnx": os.path.getsize(ctx),
            "sdk": next((a.s.decode() for a in node.attribute if a.name == "ep_sdk_version"), None), "path": ctx}


def prepare(export: str, workdir: str, seq: int, past: int) -> tuple[str, list, dict]:
    """Steps 1-4: the static, folded graph without NaN guards, task slots and the causal mask as plain inputs
    -> ``pure.onnx``. Returns its path, the default initializers of those inputs (slots: zero; ``attention_bias``:
    the causal mask) and facts for the report."""
    w = lambda name: os.path.join(workdir, name)  # noqa: E731
    model = onnx.load(os.path.join(export, "model.onnx"))
    make_dim_param_fixed(model.graph, "seq", seq)
    make_dim_param_fixed(model.graph, "past_len", past)
    fix_output_shapes(model)
    onnx.save(model, w("static.onnx"))
    fold(w("static.onnx"), w("folded.onnx"))
    model = onnx.load(w("folded.onnx"))
    guards = drop_nan_guards(model)
    masks = finite_masks(model)
    reciprocals = reciprocals_as_div(model)
    bias = mask_as_input(model)
    slots = [i.name for i in model.graph.input if i.name.endswith((".lora_a", ".lora_b"))]
    defaults = [i for i in model.graph.initializer if i.name in slots] + ([bias] if bias is not None else [])
    kept = [i for i in model.graph.initializer if i.name not in slots]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, w("pure.onnx"))
    return w("pure.onnx"), defaults, {"guards_dropped": guards, "finite_masks": masks, "mask_value": MASK_VALUE, "reciprocals_as_div": reciprocals, "slots": len(slots),
                                "mask_input": BIAS if bias is not None else None}


def quantize_qdq(pure: str, workdir: str, quant: str, calib: list, defaults: list, per_channel: bool) -> tuple[str, dict]:
    """Step 5: QDQ ``quant`` (a16w8 / a8w8) calibrated on ``calib`` feeds; the slots get their zero defaults back.
    ``per_channel``: the constant-weight MatMuls become 1x1 Convs with per-output-channel weights (``linear_convs``)."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    w = lambda name: os.path.join(workdir, name)  # noqa: E731
    activations, weights = (getattr(QuantType, t) for t in QUANTS[quant])
    reader = type("Reader", (), {"it": iter(calib), "get_next": lambda self: next(self.it, None)})()
    convs = 0
    if per_channel:
        model = onnx.load(pure)
        convs = linear_convs(model)
        onnx.save(model, w("convs.onnx"))
        del model
        pure = w("convs.onnx")
    src = w("pre.onnx") if qnn_preprocess_model(pure, w("pre.onnx")) else pure
    out = w(f"qdq_{quant}.onnx")
    t0 = time.perf_counter()
    config = get_qnn_qdq_config(src, reader, activation_type=activations, weight_type=weights, per_channel=per_channel)
    quantize(src, out, config)
    quantize_s = time.perf_counter() - t0
    qdq = onnx.load(out)
    for d in defaults:  # the defaults again: zero slots (a run without task slots is the base model), the causal mask
        qdq.graph.initializer.append(d if d.name == BIAS else onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(d)), d.name))
    assert {d.name for d in defaults} <= {i.name for i in qdq.graph.input}
    onnx.save(qdq, out)
    return out, {"quant": quant, "quantize_s": quantize_s, "weights": "per output channel (MatMul as 1x1 Conv)" if per_channel else "per tensor",
                 "linear_convs": convs, "nodes": len(qdq.graph.node), "ops": sorted({n.op_type for n in qdq.graph.node}),
                 "bytes_qdq": os.path.getsize(out)}


def lora_probe(session, ctx: str, feeds: dict, section: str, timed) -> dict:
    """QNN's own LoRA route: run option ``qnn.lora_config=<graph>;<adapter binary section>`` on the
    EPContext session. Only QAIRT's tools write a binary section for a graph compiled with
    updatable LoRA tensors; given anything else the EP logs "Unable to load Lora Config" and runs
    the graph unchanged, which this probe shows by comparing with the run without the option."""
    (node,) = onnx.load(ctx).graph.node
    graph = next(x.s.decode() for x in node.attribute if x.name == "partition_name")
    options = ort.RunOptions()
    options.add_run_config_entry("qnn.lora_config", f"{graph};{section}")
    plain, _ = timed(session, feeds)
    try:
        got, _ = timed(session, feeds, options)
    except Exception as e:  # noqa: BLE001
        return {"lora_config": f"{graph};{os.path.basename(section)}", "ran": False, "error": str(e)[:300]}
    return {"lora_config": f"{graph};{os.path.basename(section)}", "ran": True, "output_unchanged": bool(np.array_equal(got, plain))}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("export")
    p.add_argument("workdir")
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--past", type=int, default=2)
    p.add_argument("--tasks", default="", help="comma-separated run order on the QDQ session (default: every task once)")
    p.add_argument("--quants", default="a16w8", help=f"comma-separated, of {', '.join(QUANTS)}")
    p.add_argument("--archs", default="", help="htp_arch values to compile offline context binaries for (e.g. 73,75,79)")
    p.add_argument("--context-quants", default="", help="the quants that get context binaries (default: all)")
    p.add_argument("--context-tasks", default="", help="run order through each context binary (default: --tasks)")
    p.add_argument("--ids", default="", help="JSON {'calibration': {task: [ids]}, 'eval': {task: [ids]}}, each ids of length past+seq, "
                                            "or {'cached': ids (<= past), 'step': ids (<= seq)} (default: random tokens)")
    p.add_argument("--lora-probe", default="", help="a file passed as qnn.lora_config's binary section on the first context binary")
    p.add_argument("--static-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also try the unquantised graph without CPU fallback (it must be refused; slow at real width)")
    p.add_argument("--reuse-qdq", action="store_true", help="reuse WORKDIR/qdq_<quant>.onnx left by an earlier run with the same arguments")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="8-bit weights per output channel (constant-weight MatMuls as 1x1 Convs); --no-per-channel: one scale per matrix")
    p.add_argument("--calibration", type=int, default=4, help="random token windows per task (without --ids)")
    p.add_argument("--rope-theta", type=float, default=None, help="the model's RoPE base (Llama default RoPE): needed for "
                   "--ids examples given as {'cached': ids, 'step': ids} (their cache is left-padded and the keys moved)")
    p.add_argument("--minutes", type=float, default=0, help="start no new example after this many minutes since this script started (0: no limit)")
    p.add_argument("--effect-tasks", type=int, default=2, help="the first N tasks of --tasks also run their first example without "
                   "slots on HTP: the LoRA effect (one more HTP run each)")
    a = p.parse_args()
    started = time.perf_counter()

    os.makedirs(a.workdir, exist_ok=True)
    manifest = json.load(open(os.path.join(a.export, "manifest.json")))
    m = manifest["model"]
    n_kv, kv_shape = 2 * m["n_layers"], (1, m["kv_heads"], 0, m["head_dim"])
    pure, defaults, facts = prepare(a.export, a.workdir, a.seq, a.past)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    cpu = ort.InferenceSession(os.path.join(a.export, "model.onnx"), so, providers=["CPUExecutionProvider"])
    export = Export(a.export)
    bank = BankSlots(manifest)
    bank.load_shared(export.verified(export.find("shared"), "the shared file"))
    decoded, decode_ms = {}, {}
    for t in manifest["tasks"]:
        t0 = time.perf_counter()
        decoded[t] = bank.task_slots(t, export.verified_task_file(t))
        decode_ms[t] = (time.perf_counter() - t0) * 1e3
    zeros = {d.name: np.zeros_like(onnx.numpy_helper.to_array(d)) for d in defaults if d.name != BIAS}
    causal = {d.name: onnx.numpy_helper.to_array(d) for d in defaults if d.name == BIAS}
    rng = np.random.default_rng(0)

    def window(slots: dict, ids) -> dict:
        """The first ``past`` tokens through the fp32 graph on the CPU: the KV cache the NPU step continues."""
        ids = np.asarray(ids, np.int64)
        empty = {f"past.{i}": np.zeros(kv_shape, np.float32) for i in range(n_kv)}
        out = cpu.run(None, {"input_ids": ids[None, : a.past], **empty, **slots})
        return {"input_ids": ids[None, a.past:], **{f"past.{i}": out[1 + i] for i in range(n_kv)}, **slots}

    def padded(slots: dict, example: dict) -> tuple[dict, dict]:
        """A prompt shorter than the static cache: ``example["cached"]`` (at most ``past`` ids) prefilled by the
        fp32 graph on the CPU, then ``example["step"]`` (at most ``seq`` ids, right-padded with its last id:
        causal attention keeps the padding out of the rows before it) as the step. Returns (the dynamic fp32
        graph's feeds: the cache as it is, the reference; the static graph's feeds: the cache left-padded with
        zeros to ``past``, its keys moved to their new positions by ``rope_shift``, the padding masked)."""
        cached, step = np.asarray(example["cached"], np.int64), list(example["step"])
        if not 0 < len(cached) <= a.past or not 0 < len(step) <= a.seq:
            raise ValueError(f"--ids: an example with {len(cached)} cached and {len(step)} step ids does not fit --past {a.past} --seq {a.seq}")
        if a.rope_theta is None or not causal:
            raise ValueError("--ids with cached/step examples needs --rope-theta and a graph with a causal mask")
        empty = {f"past.{i}": np.zeros(kv_shape, np.float32) for i in range(n_kv)}
        kv = cpu.run(None, {"input_ids": cached[None], **empty, **slots})[1:]
        ids = np.asarray(step + step[-1:] * (a.seq - len(step)), np.int64)[None]
        delta = a.past - len(cached)
        pad = np.zeros((*kv_shape[:2], delta, kv_shape[3]), np.float32)
        static = {f"past.{i}": np.concatenate([pad, rope_shift(x, delta, a.rope_theta) if i % 2 == 0 else x], axis=2) for i, x in enumerate(kv)}
        bias = causal[BIAS].copy()
        bias[..., :delta] = MASK_VALUE
        return {"input_ids": ids, **{f"past.{i}": x for i, x in enumerate(kv)}, **slots}, {"input_ids": ids, **static, BIAS: bias, **slots}

    def feeds_of(slots: dict, ids) -> tuple[dict, dict]:
        """(the fp32 reference's feeds, the static graph's feeds) of a window (``past + seq`` ids) or a padded example."""
        if isinstance(ids, dict):
            return padded(slots, ids)
        ref_feeds = window(slots, ids)
        return ref_feeds, {**ref_feeds, **causal}

    given = json.load(open(a.ids)) if a.ids else None
    n = a.past + a.seq
    order = [t for t in a.tasks.split(",") if t] or manifest["tasks"]
    ctx_order = [t for t in a.context_tasks.split(",") if t] or order
    if given:
        calib_ids, eval_ids = given["calibration"], given["eval"]
    else:
        calib_ids = {t: [rng.integers(0, m["vocab_size"], n).tolist() for _ in range(a.calibration)] for t in manifest["tasks"]}
        shared = [rng.integers(0, m["vocab_size"], n).tolist()]
        eval_ids = {t: shared for t in {*order, *ctx_order}}
    assert all(isinstance(x, dict) or len(x) == n for xs in [*eval_ids.values(), *calib_ids.values()] for x in xs), \
        "every window needs past+seq ids"
    feeds: dict = {}
    ref: dict = {}

    def both(slots_of: str | None, owner: str, k: int) -> tuple[dict, dict]:
        if (slots_of, owner, k) not in feeds:
            feeds[(slots_of, owner, k)] = feeds_of(decoded[slots_of] if slots_of else zeros, eval_ids[owner][k])
        return feeds[(slots_of, owner, k)]

    def feed(slots_of: str | None, owner: str, k: int) -> dict:
        """The static graph's feeds: task ``slots_of``'s (None: the base model's zero slots) for window ``k`` of task ``owner``."""
        return both(slots_of, owner, k)[1]

    def fp32(slots_of: str | None, owner: str, k: int) -> np.ndarray:
        """The fp32 export's logits on the CPU EP (the cache unpadded): the reference."""
        if (slots_of, owner, k) not in ref:
            ref[(slots_of, owner, k)] = cpu.run(["logits"], both(slots_of, owner, k)[0])[0][0]
        return ref[(slots_of, owner, k)]

    def real_rows(owner: str, k: int) -> int:
        """The step's rows that are not right-padding."""
        ids = eval_ids[owner][k]
        return len(ids["step"]) if isinstance(ids, dict) else a.seq

    def compare(got: np.ndarray, task: str, k: int, base: np.ndarray | None) -> dict:
        """``got`` vs the fp32 reference on the step's real rows; with ``base`` (the NPU's run without slots) also the
        LoRA effect and the distance to the other tasks' references."""
        n_rows = real_rows(task, k)
        got, r = got[:n_rows], fp32(task, task, k)[:n_rows]
        row = {"task": task, "window": k, "rows": n_rows, "max_err_vs_fp32": float(np.abs(got - r).max()),
               "top1_agreement": float((got.argmax(-1) == r.argmax(-1)).mean())}
        if base is not None:  # the LoRA effect: task minus base, on the NPU and in fp32
            row["max_err_vs_other_tasks"] = {t: float(np.abs(got - fp32(t, task, k)[:n_rows]).max()) for t in dict.fromkeys(order) if t != task}
            base = base[:n_rows]
            effect = r - fp32(None, task, k)[:n_rows]
            row["lora_effect_cosine"] = cosine(got - base, effect)
            row["lora_effect_norm_ratio"] = float(np.linalg.norm(got - base) / (np.linalg.norm(effect) + 1e-30))
        return row

    def timed(s, f: dict, options=None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        got = s.run(["logits"], f, options)[0][0]
        return got, (time.perf_counter() - t0) * 1e3

    report: dict = {"ort": ort.__version__, **facts, "seq": a.seq, "past": a.past, "windows": {t: len(v) for t, v in eval_ids.items()},
                    "task_decode_ms": decode_ms, "kv_prefill": "fp32 export on the CPU execution provider", "rope_theta": a.rope_theta, "minutes": a.minutes, "quants": []}
    if a.static_check:  # the unquantised static graph still has ops HTP lacks: proves the fallback check can fail
        try:
            htp_session(os.path.join(a.workdir, "static.onnx"))
            report["static_graph_on_htp"] = "opened"
        except Exception as e:  # noqa: BLE001
            report["static_graph_on_htp"] = f"refused: {str(e)[:300]}"
    padded_tasks = [t for t in order if any(isinstance(x, dict) for x in eval_ids[t])]
    if padded_tasks:  # the padded cache + moved keys + mask, in fp32 on the CPU: must equal the unpadded reference
        t, k = padded_tasks[0], next(j for j, x in enumerate(eval_ids[padded_tasks[0]]) if isinstance(x, dict))
        got = ort.InferenceSession(pure, so, providers=["CPUExecutionProvider"]).run(["logits"], feed(t, t, k))[0][0]
        report["pad_check_max_err"] = float(np.abs(got - fp32(t, t, k))[: real_rows(t, k)].max())
        if report["pad_check_max_err"] > 1e-3:
            raise RuntimeError(f"the left-padded cache changes the fp32 graph's logits by {report['pad_check_max_err']:.3g} "
                               f"(task {t}, example {k}): is --rope-theta {a.rope_theta} the model's?")
    arrays = {}
    archs = [x for x in a.archs.split(",") if x]
    runs_total, runs_done = len(a.quants.split(",")) * sum(len(eval_ids[t]) for t in order), 0  # progress lines (stderr) for the host
    for quant in a.quants.split(","):
        qdq = os.path.join(a.workdir, f"qdq_{quant}.onnx")
        if a.reuse_qdq and os.path.exists(qdq):  # an earlier run's graph, same arguments (the caller vouches)
            model = onnx.load(qdq, load_external_data=False)
            info = {"quant": quant, "quantize_s": None, "qdq": "reused from an earlier run in this workdir", "nodes": len(model.graph.node),
                    "ops": sorted({n.op_type for n in model.graph.node}), "bytes_qdq": os.path.getsize(qdq)}
            del model
        else:
            calib = [feeds_of(decoded[t], ids)[1] for t, xs in calib_ids.items() for ids in xs]
            qdq, info = quantize_qdq(pure, a.workdir, quant, calib, defaults, a.per_channel)
        t0 = time.perf_counter()
        session = htp_session(qdq, arch=archs[0] if archs else None)
        info["htp_arch_qdq_session"] = archs[0] if archs else "default"
        info["htp_session_s"] = time.perf_counter() - t0
        # the same QDQ graph on the CPU EP (ORT's own Q/DQ arithmetic): where HTP departs from it, the EP's
        # lowering of an op differs from the graph as written (how the Reciprocal encoding was found)
        cpu_qdq = ort.InferenceSession(qdq, so, providers=["CPUExecutionProvider"])
        on_qdq, runs = {}, []
        # example k of every task, then k + 1: a run stopped by --minutes (or one that dies) still covers every task
        for k in range(max(len(eval_ids[t]) for t in order)):
            for i, task in enumerate(order):
                if k >= len(eval_ids[task]) or info.get("stopped"):
                    continue
                if a.minutes and (time.perf_counter() - started) / 60 > a.minutes:
                    info["stopped"] = f"--minutes {a.minutes}: from example {k} of {task} on not run"
                    continue
                n_rows = real_rows(task, k)
                # the LoRA effect (a second HTP run without slots): first example of the first --effect-tasks tasks only (time)
                base = timed(session, feed(None, task, k))[0] if k == 0 and task in order[:a.effect_tasks] else None
                got, ms = timed(session, feed(task, task, k))
                arrays[f"{quant}/qdq/{i}/{k}"] = on_qdq[(task, k)] = got
                arrays[f"fp32/{task}/{k}"] = fp32(task, task, k)
                on_cpu = cpu_qdq.run(["logits"], feed(task, task, k))[0][0]
                runs.append({**compare(got, task, k, base), "run_ms": ms,
                             "max_err_cpu_qdq_vs_fp32": float(np.abs(on_cpu - fp32(task, task, k))[:n_rows].max()),
                             "max_diff_htp_vs_cpu_qdq": float(np.abs(got - on_cpu)[:n_rows].max())})
                # a checkpoint per example: report.json as it stands, this quant's runs so far under "partial"
                np.savez(os.path.join(a.workdir, "logits.npz"), **arrays)
                json.dump({**report, "partial": {**info, "runs": runs}}, open(os.path.join(a.workdir, "report.json"), "w"), indent=1)
                runs_done += 1
                report_progress(runs_done, runs_total)
            for key in [x for x in feeds if x[2] != 0 or x[0] != x[1]]:  # keep only what the context binaries rerun
                del feeds[key]
        del cpu_qdq
        if not info.get("stopped"):  # the same feeds again: a run without a switch, the time a switched run is compared with
            _, info["repeat_run_ms"] = timed(session, feed(runs[-1]["task"], runs[-1]["task"], runs[-1]["window"]))
        info["runs"] = runs
        info["contexts"] = []
        for arch in archs if quant in (a.context_quants or a.quants).split(",") else []:
            ctx = context_binary(qdq, a.workdir, arch)
            path = ctx.pop("path")
            t0 = time.perf_counter()
            cs = htp_session(path)
            ctx["load_s"] = time.perf_counter() - t0
            ctx_runs = []
            for i, task in enumerate(ctx_order):
                got, ms = timed(cs, feed(task, task, 0))
                arrays[f"{quant}/ctx{arch}/{i}/0"] = got
                if (task, 0) not in on_qdq:
                    on_qdq[(task, 0)] = timed(session, feed(task, task, 0))[0]
                ctx_runs.append({**compare(got, task, 0, None), "run_ms": ms, "max_diff_vs_qdq_session": float(np.abs(got - on_qdq[(task, 0)]).max())})
            ctx["runs"] = ctx_runs
            if a.lora_probe and not info["contexts"]:
                ctx["lora_probe"] = lora_probe(cs, path, feed(ctx_order[0], ctx_order[0], 0), a.lora_probe, timed)
            info["contexts"].append(ctx)
            del cs
        report["quants"].append(info)
        report.pop("partial", None)
        del session
        # after each quant, so a run cut short keeps what it measured
        np.savez(os.path.join(a.workdir, "logits.npz"), **arrays)
        json.dump(report, open(os.path.join(a.workdir, "report.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
