"""Decode cost of the switchable slots in other ONNX graph forms: what issue 15's next lever would gain,
measured before the exporter is changed.

The slots of today's programs cost more than their arithmetic (slot_overhead_onnx.md: +5.5 to +6.7 %
at 4 bits). A rank-1 to rank-3 HydraOpt bank costs nearly what a rank-8 one does, so the cost is per
node, not per multiply-add: per layer the q and v slots are six nodes (two MatMul each, with the
transposes folded in, and an Add) beside three 4-bit projections. This script rewrites an export's
``model.onnx`` (graph surgery with onnx; the exports themselves are left as they are) into:

- ``stacked``: the projections as exported, one slot pair per layer: ``A = [A_q; A_v]`` (r_q + r_v
  rows) and ``B`` with ``B_q`` in the q rows and first r_q columns, ``B_v`` in the v rows and last
  r_v columns, zero elsewhere, so ``B A x = [B_q A_q x; B_v A_v x]``, split and added to q and v:
  two MatMul, a Split and two Add per layer where there were four MatMul and two Add.
- ``qkv``: the q, k and v projections as one ``MatMulNBits`` (the three weights' 4-bit blocks and
  scales concatenated along N: the same quantised values) and a ``Split``; slots as exported.
- ``qkv-stacked``: ``qkv`` with the stacked slot pair on the fused output (``B`` also has the k rows,
  zero): ``B A x = [B_q A_q x; 0; B_v A_v x]`` added before the split, two MatMul and one Add per layer.
  A recipe with v at 8 bits and q, k at 4 (``int4-mixed``) cannot fuse the three into one ``MatMulNBits``.

Each form is checked against the export as it is (same task active, the same 8 tokens after a
16-token prefill: max logit difference at the first step and over the 8; the 4-bit ``MatMulNBits``
quantise their input activations to 8 bits (accuracy level 4), so a last-bit difference in a slot's
sum can flip a rounding and grow through the cache), then every graph is timed side by side as slot_overhead.py does (token by token, order
alternating, two fresh processes with opposite open orders, rounds pooled). Overheads are ratios to
the merged export *in the same form* (a fused program would be exported for both sides).

    python benchmarks/onnx_slot_forms.py MERGED_EXPORT SWITCHABLE_EXPORT [SWITCHABLE_EXPORT ...] --lock /work/runs/cpu.lock

The exports: slot_overhead.py's ``--work`` folders for one recipe (``merged-int4``, ``none-int4``,
``hydraopt-int4``). Writes benchmarks/results/onnx_slot_forms.{json,md}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import statistics
import sys
from pathlib import Path

from common import RESULTS_DIR, cpu_lock, machine_probe, open_lock, time_in_two_processes  # first: it puts this checkout on sys.path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.slot_overhead import PREFILL, interleaved, median_ci
from exporters.runtime import open_export
from exporters.targets.device_runner import OrtDecoder, open_ort_session
from hydraopt_mobile.app.records import markdown_table, write_record

FORMS = ("as-exported", "stacked", "qkv", "qkv-stacked")
REFERENCE = {"as-exported": "as-exported", "stacked": "as-exported", "qkv": "qkv", "qkv-stacked": "qkv"}  # the merged program of each form


def _projection_nodes(nodes: list[onnx.NodeProto], layer: int) -> dict[str, onnx.NodeProto]:
    """The q, k, v ``MatMulNBits`` nodes of one layer, by the name of their weight."""
    out = {}
    for node in nodes:
        if node.op_type == "MatMulNBits":
            for p in ("q_proj", "k_proj", "v_proj"):
                if f".layers.{layer}.self_attn.{p}." in node.input[1]:
                    out[p] = node
    return out


def _slot_chain(nodes: list[onnx.NodeProto], inputs: set[str], base_out: str) -> tuple[onnx.NodeProto, list[onnx.NodeProto], list[str]] | None:
    """The ``Add`` that adds a slot's delta to ``base_out``, the nodes computing that delta back to the
    slot inputs (among the graph's ``inputs``), and those inputs' names (None when ``base_out`` has no slot)."""
    producers = {o: n for n in nodes for o in n.output}
    adds = [n for n in nodes if n.op_type == "Add" and base_out in n.input]
    if not adds:
        return None
    add = adds[0]
    delta = [x for x in add.input if x != base_out][0]
    chain, slots, todo = [], [], [delta]
    while todo:
        name = todo.pop()
        if name in inputs:
            slots.append(name)
            continue
        node = producers.get(name)
        if node is None or node.op_type not in ("MatMul", "Transpose"):
            continue  # the projection's input x, shared with the base
        chain.append(node)
        todo += list(node.input)
    return add, chain, slots


def _toposorted(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the producers of its inputs (stable otherwise)."""
    done, out, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in done for i in n.input):
                out.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    return out


def rewrite(model: onnx.ModelProto, form: str, n_layers: int) -> tuple[onnx.ModelProto, dict]:
    """``model`` in ``form``; with a stacked form also ``{layer: (A slot names, B slot names (by q/v),
    row counts of the q, k, v blocks of the stacked B (k's 0 when k is not fused), ranks of q, v)}``
    for :func:`stacked_values`."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    stacking: dict = {}
    fuse, stack = form.startswith("qkv"), form.endswith("stacked")
    nodes = list(graph.node)
    for layer in range(n_layers):
        proj = _projection_nodes(nodes, layer)
        q, k, v = proj["q_proj"], proj["k_proj"], proj["v_proj"]
        x = q.input[0]
        assert k.input[0] == x and v.input[0] == x, f"layer {layer}: q, k, v do not share an input"
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in (q, k, v)]
        Ns = [a["N"] for a in attrs]
        prefix = f"qkv.{layer}"
        new_inits, new_nodes, removed = [], [], []
        outs = [q.output[0], k.output[0], v.output[0]]
        if stack:
            chains = {p: _slot_chain(nodes, {i.name for i in graph.input}, n.output[0]) for p, n in (("q", q), ("v", v))}
            assert all(chains.values()), f"layer {layer}: q or v has no slot"
            a_names, b_names, finals = {}, {}, {}
            for p, (add, chain, slots) in chains.items():
                removed += [add, *chain]
                finals[p] = add.output[0]
                a_names[p] = next(s for s in slots if s.endswith("lora_a"))
                b_names[p] = next(s for s in slots if s.endswith("lora_b"))
            ranks = [int(inits[a_names[p]].dims[0]) for p in ("q", "v")]
            rows = Ns if fuse else [Ns[0], 0, Ns[2]]
            a_in, b_in = f"slot.{layer}.qv_a", f"slot.{layer}.{'qkv' if fuse else 'qv'}_b"
            d_in = int(inits[a_names["q"]].dims[1])
            new_inits += [numpy_helper.from_array(np.zeros((sum(ranks), d_in), np.float32), a_in), numpy_helper.from_array(np.zeros((sum(rows), sum(ranks)), np.float32), b_in)]
            graph.input.extend([helper.make_tensor_value_info(a_in, onnx.TensorProto.FLOAT, [sum(ranks), d_in]), helper.make_tensor_value_info(b_in, onnx.TensorProto.FLOAT, [sum(rows), sum(ranks)])])
            new_nodes += [
                helper.make_node("Transpose", [a_in], [f"{prefix}.at"], name=f"{prefix}.at"),
                helper.make_node("MatMul", [x, f"{prefix}.at"], [f"{prefix}.h"], name=f"{prefix}.h"),
                helper.make_node("Transpose", [b_in], [f"{prefix}.bt"], name=f"{prefix}.bt"),
                helper.make_node("MatMul", [f"{prefix}.h", f"{prefix}.bt"], [f"{prefix}.delta"], name=f"{prefix}.delta"),
            ]
            stacking[layer] = (a_names, b_names, rows, ranks)
        if fuse:
            weights = [numpy_helper.to_array(inits[n.input[1]]) for n in (q, k, v)]
            scales = [numpy_helper.to_array(inits[n.input[2]]) for n in (q, k, v)]
            new_inits += [numpy_helper.from_array(np.concatenate(weights), f"{prefix}.weight_Q4"), numpy_helper.from_array(np.concatenate(scales), f"{prefix}.weight_scales"),
                          numpy_helper.from_array(np.array(Ns, dtype=np.int64), f"{prefix}.split")]
            new_nodes.append(helper.make_node("MatMulNBits", [x, f"{prefix}.weight_Q4", f"{prefix}.weight_scales"], [f"{prefix}.out"], domain="com.microsoft", name=f"{prefix}.matmul", **dict(attrs[0], N=sum(Ns))))
            removed += [q, k, v]
            total = f"{prefix}.out"
            if stack:  # the delta is added once, to the fused output
                new_nodes.append(helper.make_node("Add", [total, f"{prefix}.delta"], [f"{prefix}.sum"], name=f"{prefix}.sum"))
                total = f"{prefix}.sum"
                outs = [finals["q"], k.output[0], finals["v"]]
            new_nodes.append(helper.make_node("Split", [total, f"{prefix}.split"], outs, axis=-1, name=f"{prefix}.split"))
        elif stack:  # q and v stay apart: the delta is split and added to each
            new_inits.append(numpy_helper.from_array(np.array([Ns[0], Ns[2]], dtype=np.int64), f"{prefix}.split"))
            new_nodes += [
                helper.make_node("Split", [f"{prefix}.delta", f"{prefix}.split"], [f"{prefix}.dq", f"{prefix}.dv"], axis=-1, name=f"{prefix}.split"),
                helper.make_node("Add", [q.output[0], f"{prefix}.dq"], [finals["q"]], name=f"{prefix}.addq"),
                helper.make_node("Add", [v.output[0], f"{prefix}.dv"], [finals["v"]], name=f"{prefix}.addv"),
            ]
        gone = {n.name for n in removed}
        assert "" not in gone and len(gone) == len(removed), f"layer {layer}: nodes without unique names"
        nodes = [n for n in nodes if n.name not in gone] + new_nodes
        graph.initializer.extend(new_inits)
        inits.update({t.name: t for t in new_inits})
    if stack:  # the per-module slot inputs and their defaults are gone
        old = {n for a, b, _, _ in stacking.values() for n in (*a.values(), *b.values())}
        keep_in = [i for i in graph.input if i.name not in old]
        del graph.input[:]
        graph.input.extend(keep_in)
    used = {i for n in nodes for i in n.input}
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    del graph.node[:]
    graph.node.extend(_toposorted(nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return model, stacking


def stacked_pair(a_q: np.ndarray, a_v: np.ndarray, b_q: np.ndarray, b_v: np.ndarray, k_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's stacked slot pair: ``A = [A_q; A_v]`` and ``B`` with ``B_q`` in the q rows and first
    r_q columns, ``B_v`` in the v rows (after ``k_rows`` zero rows of k) and last r_v columns, so that
    ``B A x = [B_q A_q x; 0; B_v A_v x]``."""
    r_q = a_q.shape[0]
    B = np.zeros((b_q.shape[0] + k_rows + b_v.shape[0], r_q + a_v.shape[0]), np.float32)
    B[: b_q.shape[0], :r_q] = b_q
    B[b_q.shape[0] + k_rows:, r_q:] = b_v
    return np.ascontiguousarray(np.concatenate([a_q, a_v])), B


def stacked_values(slots: dict, stacking: dict) -> dict:
    """A stacked form's slot arrays from a task's per-module ones (``rewrite``'s layout); slots of
    other modules (an o_proj slot, say) are passed on as they are."""
    stacked_names = {n for a, b, _, _ in stacking.values() for n in (*a.values(), *b.values())}
    out = {name: value for name, value in slots.items() if name not in stacked_names}
    for layer, (a, b, rows, _) in stacking.items():
        A, B = stacked_pair(slots[a["q"]], slots[a["v"]], slots[b["q"]], slots[b["v"]], rows[1])
        out[f"slot.{layer}.qv_a"], out[f"slot.{layer}.{'qkv' if rows[1] else 'qv'}_b"] = A, B
    return out


def markdown(record: dict) -> str:
    cols = ["export", "form", "nodes", "ms/token", "overhead vs merged, same form %", "95 % CI", "vs merged as exported %", "max logit diff, first step", "max logit diff, 8 steps", "argmax equal"]
    rows = [[r["export"], r["form"], r["nodes"], r["ms_per_token"], "-" if r["overhead_vs_merged_same_form_pct"] is None else f"{r['overhead_vs_merged_same_form_pct']:+.2f}",
             "-" if r["overhead_ci95_pct"] is None else "[{:+.2f}, {:+.2f}]".format(*r["overhead_ci95_pct"]), f"{r['vs_merged_as_exported_pct']:+.2f}", f"{r['max_logit_diff_first_step']:.2g}", f"{r['max_logit_diff_vs_as_exported']:.2g}", r["argmax_equal"]]
            for r in record["records"]]
    head = "# Slot decode cost in other ONNX graph forms (benchmarks/onnx_slot_forms.py)\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in record["notes"].items())
    return head + "\n\n" + "\n".join(markdown_table(cols, rows, "lllrrrrrrl")) + "\n"


class Graph:
    """One rewritten program with one task's slots bound: slot_overhead.interleaved's session interface."""

    def __init__(self, path: Path, model: dict, slots: dict) -> None:
        self.slots = slots  # the values keep these arrays alive
        self.decoder = OrtDecoder(open_ort_session(str(path), 1), model)
        self.decoder.set_slots(OrtDecoder.slot_values(slots))

    def prefill(self, ids: list[int]) -> None:
        self.decoder.reset()
        self.decoder.step(ids)

    def decode(self, token: int):
        return self.decoder.step([token])


def prepare(exports: list[Path], task: str, work: Path) -> dict:
    """Every (export, form) as a model file in ``work``, with its task slots (npz) and the check
    against the export as it is."""
    work.mkdir(parents=True, exist_ok=True)
    plan: dict = {}
    for folder in exports:
        session = open_export(folder, threads=1)
        model_info = session.manifest.model
        session.set_task(task)
        slots = {k: np.asarray(v) for k, v in (session.decoded.get(task) or {}).items()}
        forms = FORMS if slots else ("as-exported", "qkv")  # a merged export has no slot to stack
        exported = onnx.load(str(folder / "model.onnx"))
        for form in forms:
            key = f"{folder.name}/{form}"
            path = folder / "model.onnx" if form == "as-exported" else work / f"{folder.name}-{form}.onnx"
            model, values = exported, slots
            if form != "as-exported":
                model, stacking = rewrite(onnx.ModelProto.FromString(exported.SerializeToString()), form, model_info["n_layers"])  # a copy: rewrite edits in place
                if not path.exists():
                    onnx.save(model, str(path))
                values = stacked_values(slots, stacking) if stacking else slots
            np.savez(work / f"{folder.name}-{form}.npz", **values)
            plan[key] = {"model": str(path), "slots": str(work / f"{folder.name}-{form}.npz"), "model_info": model_info, "nodes": len(model.graph.node)}
        # check: each form's logits against the export as it is, over the prefill and 8 tokens
        ref = None
        for form in forms:
            p = plan[f"{folder.name}/{form}"]
            g = Graph(Path(p["model"]), model_info, dict(np.load(p["slots"])))
            g.prefill(PREFILL)
            logits = np.stack([g.decode(17 + i)[-1] for i in range(8)])
            ref = logits if ref is None else ref
            p["max_logit_diff_first_step"] = float(np.abs(logits[0] - ref[0]).max())
            p["max_logit_diff_vs_as_exported"] = float(np.abs(logits - ref).max())
            p["argmax_equal"] = bool((logits.argmax(-1) == ref.argmax(-1)).all())
    return plan


def time_all(plan: dict, tokens: int, rounds: int, reverse: bool) -> dict[str, list[float]]:
    keys = list(plan)[::-1] if reverse else list(plan)
    graphs = {}
    for key in keys:
        p = plan[key]
        g = Graph(Path(p["model"]), p["model_info"], dict(np.load(p["slots"])))
        g.prefill(PREFILL)
        for i in range(4):
            g.decode(17 + i)
        graphs[key] = g
    return interleaved(graphs, tokens, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path, help="the merged export first, then switchable exports of the same recipe")
    ap.add_argument("--task", default="country-de")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_slot_forms"))
    ap.add_argument("--lock", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "onnx_slot_forms.json")
    ap.add_argument("--time-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_only:
        plan = json.loads(args.time_only.read_text())
        print(json.dumps(time_all(plan, args.tokens, args.rounds, args.reverse)))
        return
    fd = open_lock(args.lock)
    with cpu_lock(fd, fcntl.LOCK_SH):
        plan = prepare(args.exports, args.task, args.work)
    (args.work / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, __file__, *map(str, args.exports), "--time-only", str(args.work / "plan.json"), "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    times, conditions = time_in_two_processes(cmd, fd)
    merged = args.exports[0].name
    rows = []
    for key, p in plan.items():
        export, form = key.split("/")
        ref = times[f"{merged}/{REFERENCE[form]}"]  # the merged export has no slot to stack
        ratios = [a / b - 1 for a, b in zip(times[key], ref)]
        lo, hi = median_ci(ratios)
        base = times[f"{merged}/as-exported"]
        rows.append({
            "export": export, "form": form, "nodes": p["nodes"],
            "ms_per_token": round(statistics.median(times[key]), 3),
            "overhead_vs_merged_same_form_pct": None if export == merged else round(100 * statistics.median(ratios), 2),
            "overhead_ci95_pct": None if export == merged else [round(100 * lo, 2), round(100 * hi, 2)],
            "vs_merged_as_exported_pct": round(100 * (statistics.median([a / b for a, b in zip(times[key], base)]) - 1), 2),
            "max_logit_diff_first_step": p["max_logit_diff_first_step"], "max_logit_diff_vs_as_exported": p["max_logit_diff_vs_as_exported"], "argmax_equal": p["argmax_equal"],
        })
    record = {
        "notes": {
            "what": "decode ms/token of each export in each graph form, side by side (module docstring); overhead against the merged program of the same form (the merged export as exported for stacked, qkv for qkv-stacked); nodes: in the model file, before ONNX Runtime's graph optimisations",
            "exports": [str(e) for e in args.exports], "task": args.task, "tokens": args.tokens, "rounds_per_process": args.rounds,
            "timing": conditions, "machine": f"{platform.machine()}, 1 ONNX Runtime thread: a host timing, not phone speed", "machine_probe": machine_probe(),
            "command": "python benchmarks/onnx_slot_forms.py " + " ".join(sys.argv[1:]),
        },
        "records": rows,
    }
    md = markdown(record)
    write_record(args.out, record, md)
    print(md)


if __name__ == "__main__":
    main()
