"""Decode cost of the ONNX exporter's q/k/v slot layout against the layouts it replaced: what each
of its two choices is worth.

The exporter (``exporters/onnx_fuse.py``, ONNX Runtime format 3) stacks the A's of one attention's
q, k and v in one input and gives each B an input of its own, all stored as the MatMul reads them
(``(d_in, R)``, ``(r, n)``), each B's delta added to its module's output of the fused Split. This
script rewrites a switchable export's ``model.onnx`` (graph surgery with onnx; the export itself is
left as it is) into:

- ``peft-orientation``: the same graph with every q/k/v slot input in PEFT's orientation
  (``(R, d_in)``, ``(n, r)``) behind a Transpose, which ONNX Runtime folds into the MatMul
  (``FusedMatMul`` with a transposed B);
- ``block-b``: the exporter's previous form (format 2): the A's stacked in PEFT's orientation, one
  ``B`` block-diagonal over the fused output (``(n_q + n_k + n_v, R)``, zero off the blocks), both
  behind a Transpose, the delta added to the fused output before the Split.

The active task's slots are the export's own (``BankSlots``), rearranged for each layout; every
layout's logits are checked against the export's (same 8 tokens after a 16-token prefill). Then all
are timed side by side with the merged export as slot_overhead.py does (token by token, order
alternating), in one fresh process per open order of a rotation (each program opened first once: a
process's ratios depend on the order its sessions were opened in by several points, more than the
layouts differ); the overhead of each is the median over the pooled rounds of its ms/token over the
merged export's in the same round, beside the mean of the processes' own medians.

    python benchmarks/onnx_slot_layouts.py MERGED_EXPORT SWITCHABLE_EXPORT --task country-de \\
        --work W --rounds 12 --lock /work/runs/cpu.lock

The exports: slot_overhead.py's ``--work`` folders for one recipe (``merged-int4``, ``none-int4``).
Writes benchmarks/results/onnx_slot_layouts.{json,md}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, cpu_lock, machine_probe, open_lock  # first: it puts this checkout on sys.path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.slot_overhead import PREFILL, median_ci
from exporters.onnx_fuse import FUSED
from exporters.runtime import open_export
from exporters.targets.device_runner import OrtDecoder, open_ort_session
from hydraopt_mobile.app.records import markdown_table, write_record

LAYOUTS = ("as-exported", "peft-orientation", "block-b")


def _fused_slots(model: onnx.ModelProto) -> dict[str, list[str]]:
    """attention prefix (``<attention>.qkv_proj``) -> its slot inputs: the stacked A first, then the B's."""
    out: dict[str, list[str]] = {}
    for i in model.graph.input:
        if f".{FUSED}." in i.name and i.name.endswith((".lora_a", ".lora_b")):
            p = i.name[:i.name.index(f".{FUSED}.") + len(FUSED) + 2]  # "<attention>.qkv_proj."
            out.setdefault(p, []).append(i.name)
    return {p: sorted(names, key=lambda n: not n.endswith(".lora_a")) for p, names in out.items()}


def _set_input(model: onnx.ModelProto, name: str, shape: list[int]) -> None:
    """Give slot input ``name`` (and its zero default) ``shape``, adding it where it is missing."""
    for i in list(model.graph.input):
        if i.name == name:
            model.graph.input.remove(i)
    for t in list(model.graph.initializer):
        if t.name == name:
            model.graph.initializer.remove(t)
    model.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))


def _shape(model: onnx.ModelProto, name: str) -> list[int]:
    return next([d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input if i.name == name)


def rewrite(model: onnx.ModelProto, layout: str) -> onnx.ModelProto:
    """``model`` (an export's fused program, format 3) in ``layout``, in place; returns it."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    for p, slots in _fused_slots(model).items():
        if layout == "peft-orientation":
            for s in slots:
                readers = [n for n in nodes if s in n.input]
                _set_input(model, s, _shape(model, s)[::-1])
                for n in readers:
                    n.input[list(n.input).index(s)] = f"{s}.t"
                nodes.insert(nodes.index(readers[0]), helper.make_node("Transpose", [s], [f"{s}.t"], name=f"{s}.t"))
        elif layout == "block-b":
            a, bs = slots[0], slots[1:]
            split = next(n for n in nodes if n.name == f"{p}split")
            sizes = numpy_helper.to_array(inits[split.input[1]]).tolist()
            ranks = [_shape(model, b)[0] for b in bs]
            d_in = _shape(model, a)[0]
            # the per-module part: the Split of A x, each B's MatMul and its Add after the fused Split
            adds = [n for n in nodes if n.op_type == "Add" and n.name.startswith(p) and n.name.endswith(".sum")]
            finals = {n.input[0]: n.output[0] for n in adds}  # a module's Split output -> what reads it as q, k or v
            gone = {id(n) for n in nodes if n.name.startswith(p) and (n.name.endswith((".delta", ".sum", "h_split")))}
            h = next(n for n in nodes if n.name == f"{p}h")
            _set_input(model, a, [sum(ranks), d_in])
            for b in bs:
                _set_input(model, b, [1, 1])  # unused now (kept so the slot feeds stay the same names)
            b = f"{p}lora_b_block"
            _set_input(model, b, [sum(sizes), sum(ranks)])
            h.input[1] = f"{a}.t"
            new = [helper.make_node("Transpose", [a], [f"{a}.t"]), h,
                   helper.make_node("Transpose", [b], [f"{b}.t"]),
                   helper.make_node("MatMul", [f"{p}h", f"{b}.t"], [f"{p}delta"]),
                   helper.make_node("Add", [f"{p}out", f"{p}delta"], [f"{p}sum"])]
            split.input[0] = f"{p}sum"
            for k, o in enumerate(split.output):
                split.output[k] = finals.get(o, o)
            at = nodes.index(h)
            nodes = [n for n in nodes[:at] if id(n) not in gone] + new + [n for n in nodes[at + 1:] if id(n) not in gone]
        elif layout != "as-exported":
            raise ValueError(f"unknown layout {layout!r}")
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def layout_values(values: dict[str, np.ndarray], model: onnx.ModelProto, layout: str) -> dict[str, np.ndarray]:
    """The export's slot values (program inputs, format 3) rearranged for ``layout``."""
    out = dict(values)
    for p, slots in _fused_slots(model).items():
        if layout == "peft-orientation":
            out.update({s: np.ascontiguousarray(values[s].T) for s in slots})
        elif layout == "block-b":
            a, bs = slots[0], slots[1:]
            split = next(n for n in model.graph.node if n.name == f"{p}split")
            sizes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == split.input[1])).tolist()
            parts = {name.rsplit(".", 2)[-2]: name for name in bs}
            block = np.zeros((sum(sizes), sum(values[b].shape[0] for b in bs)), np.float32)
            row, col = 0, 0
            for part, size in zip("qkv", sizes):
                if part in parts:
                    bt = values[parts[part]]
                    block[row:row + size, col:col + bt.shape[0]] = bt.T
                    col += bt.shape[0]
                row += size
            out[a] = np.ascontiguousarray(values[a].T)
            out.update({b: np.zeros((1, 1), np.float32) for b in bs})
            out[f"{p}lora_b_block"] = block
    return out


def prepare(merged: Path, switchable: Path, work: Path) -> dict[str, str]:
    """Each layout's program under ``work`` -> path (the export's own for as-exported)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"as-exported": str(switchable / "model.onnx")}
    for layout in LAYOUTS[1:]:
        path = work / f"{layout}.onnx"
        onnx.save(rewrite(onnx.load(paths["as-exported"]), layout), str(path))
        paths[layout] = str(path)
    return paths


def decoders(merged: Path, switchable: Path, paths: dict[str, str], task: str, order: list[str]) -> dict[str, OrtDecoder]:
    """One ONNX Runtime decoder (1 thread) per name of ``order`` ("merged" or a layout) with ``task``'s
    slots bound, opened in that order."""
    session = open_export(switchable, threads=1)
    session.load_task(task)
    values = dict(session.decoded[task])
    proto = onnx.load(paths["as-exported"], load_external_data=False)
    model = session.manifest.model
    out = {}
    for name in order:
        path = str(merged / "model.onnx") if name == "merged" else paths[name]
        dec = OrtDecoder(open_ort_session(path, 1), model)
        if name != "merged":
            dec.set_slots(OrtDecoder.slot_values(layout_values(values, proto, name)))
        out[name] = dec
    return out


def check(decs: dict[str, OrtDecoder], steps: int = 8) -> dict[str, dict]:
    """Per layout: max logit difference from the export's own at the first step and over ``steps``."""
    logits = {}
    for name, dec in decs.items():
        if name == "merged":
            continue
        dec.reset()
        seq = [dec.step(PREFILL)[-1]]
        seq += [dec.step([17 + i])[-1] for i in range(steps - 1)]
        logits[name] = np.stack(seq)
    ref = logits["as-exported"]
    return {name: {"max_logit_diff_first": float(np.abs(x[0] - ref[0]).max()), "max_logit_diff_steps": float(np.abs(x - ref).max())}
            for name, x in logits.items()}


def time_layouts(decs: dict[str, OrtDecoder], tokens: int, rounds: int) -> dict[str, list[float]]:
    """ms/token of each decoder per round, taking turns token by token (order alternating)."""
    names = list(decs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for d in decs.values():
            d.reset()
            d.step(PREFILL)
        spent = dict.fromkeys(names, 0.0)
        for i in range(tokens):
            for n in (names if (r + i) % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                decs[n].step([17 + i])
                spent[n] += time.perf_counter() - t0
        for n in names:
            out[n].append(spent[n] * 1e3 / tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("merged", type=Path, help="the export with the task merged in (same recipe)")
    ap.add_argument("switchable", type=Path, help="a switchable export of the same recipe (format 3)")
    ap.add_argument("--task", default="country-de")
    ap.add_argument("--work", type=Path, required=True, help="where the rewritten programs go")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=12, help="rounds per process")
    ap.add_argument("--lock", type=Path, help="the machine's CPU lock file (timing holds it exclusively)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "onnx_slot_layouts.json")
    ap.add_argument("--time-only", action="store_true", help=argparse.SUPPRESS)  # a timing process (time_in_two_processes)
    ap.add_argument("--shift", type=int, default=0, help=argparse.SUPPRESS)  # a timing process's open order: the list rotated by this
    args = ap.parse_args()
    paths = {layout: str(args.work / f"{layout}.onnx") for layout in LAYOUTS[1:]} | {"as-exported": str(args.switchable / "model.onnx")}
    order = ["merged", *LAYOUTS]
    if args.time_only:
        decs = decoders(args.merged, args.switchable, paths, args.task, order[args.shift:] + order[:args.shift])
        for d in decs.values():  # warm-up
            d.reset()
            d.step(PREFILL)
            for i in range(4):
                d.step([17 + i])
        print(json.dumps(time_layouts({n: decs[n] for n in order}, args.tokens, args.rounds)))
        return
    paths = prepare(args.merged, args.switchable, args.work)
    checks = check(decoders(args.merged, args.switchable, paths, args.task, order))
    cmd = [sys.executable, __file__, str(args.merged), str(args.switchable), "--task", args.task, "--work", str(args.work),
           "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--time-only"]
    times, conditions, fd = {}, [], open_lock(args.lock)
    for shift in range(len(order)):  # every session opened in every position once: the open order biases a process's ratios
        with cpu_lock(fd, fcntl.LOCK_EX) as waited:
            started = time.time()
            out = subprocess.run(cmd + ["--shift", str(shift)], check=True, capture_output=True, text=True).stdout
            conditions.append({"opened": order[shift:] + order[:shift], "lock_wait_s": waited, "seconds": round(time.time() - started, 1)})
        for key, rounds in json.loads(out.strip().splitlines()[-1]).items():
            times.setdefault(key, []).extend(rounds)
    rows = []
    for layout in LAYOUTS:
        ratios = [s / m for s, m in zip(times[layout], times["merged"])]
        lo, hi = median_ci(ratios)
        per = [100 * (statistics.median(ratios[k * args.rounds:(k + 1) * args.rounds]) - 1) for k in range(len(order))]
        rows.append({"layout": layout, "ms_per_token": round(statistics.median(times[layout]), 2),
                     "merged_ms_per_token": round(statistics.median(times["merged"]), 2),
                     "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2), "ci95_pct": [round(100 * (lo - 1), 2), round(100 * (hi - 1), 2)],
                     "overhead_pct_by_process": [round(x, 2) for x in per], "overhead_pct_mean_of_processes": round(statistics.mean(per), 2),
                     **checks[layout]})
    record = {"what": "decode ms/token of the exporter's q/k/v slot layout and the two it replaced (module docstring), side by side with the merged export",
              "merged": str(args.merged), "switchable": str(args.switchable), "task": args.task, "tokens": args.tokens,
              "rounds_per_process": args.rounds, "timing": conditions,
              "machine": f"{platform.machine()}, 1 ONNX Runtime thread: a host timing, not phone speed", "machine_probe": machine_probe(),
              "command": "python benchmarks/onnx_slot_layouts.py " + " ".join(sys.argv[1:]), "rows": rows, "rounds_ms": times}
    md = ["# ONNX q/k/v slot layouts (benchmarks/onnx_slot_layouts.py)", ""]
    md += [f"- **{k}**: {record[k]}" for k in ("what", "merged", "switchable", "task", "tokens", "rounds_per_process", "timing", "machine", "machine_probe", "command")]
    md += ["", *markdown_table(["layout", "merged ms/token", "ms/token", "overhead % [95 % CI]", "mean of process medians %", "per process % (timing order)", "max logit diff, first step", "max logit diff, 8 steps"],
                              [[r["layout"], r["merged_ms_per_token"], r["ms_per_token"], f"{r['overhead_pct']:+.2f} [{r['ci95_pct'][0]:+.2f}, {r['ci95_pct'][1]:+.2f}]", f"{r['overhead_pct_mean_of_processes']:+.2f}",
                                " / ".join(f"{x:+.2f}" for x in r["overhead_pct_by_process"]), f"{r['max_logit_diff_first']:.2g}", f"{r['max_logit_diff_steps']:.2g}"] for r in rows], "lrrrrrrr")]
    write_record(args.out, record, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
