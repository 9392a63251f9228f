"""Decode cost of the switchable slots in ExecuTorch with q/k/v fused and the q/v slots stacked: does
the ONNX lever (onnx_slot_forms.md; now the ONNX exporter's form, exporters/onnx_fuse.py) hold on the
other runtime? It does not (et_slot_forms.md): ExecuTorch programs keep one slot pair per module.

ExecuTorch programs are lowered from PyTorch, so the form is built there: each attention's q, k and
v Linears become one Linear (their weights concatenated along the output: the same 4-bit groups,
which run along the input), and the switchable program carries one slot pair per layer, ``A =
[A_q; A_v]`` and ``B`` with ``B_q`` in the q rows and first r_q columns, ``B_v`` in the v rows and last
r_v columns, zero elsewhere (``B A x = [B_q A_q x; 0; B_v A_v x]``), added to the fused output before
the split. The attention's forward is transformers' ``LlamaAttention.forward`` with the three
projections replaced by that (:func:`fused_forward`).

A third form keeps q, k and v apart and stacks only the A's of q and v, which read the same input:
one Linear ``[A_q; A_v] x`` per layer, split, then ``B_q`` and ``B_v`` as their own Linears into q and v
(``qv_a_forward``): 90 run-time-weight Linears per token instead of 120, with no zero blocks (the
stacked ``B`` above is what XNNPACK has to pack on every call). ``--forms`` picks the programs.

Programs timed side by side (token by token, order alternating, two fresh processes with opposite
open orders, rounds pooled, as slot_overhead.py does), all ``8da4w``, custom-ops attention:
the switchable export as it is (``SWITCHABLE_EXPORT``, a cached program), the same base model with
``--task``'s slots merged into its weights as exported today and in the fused form, and the fused
stacked switchable program with the task's slots (the same decoded arrays, stacked). The check:
the stacked program's logits against the switchable export's, same task, same tokens.

    python benchmarks/et_slot_forms.py SWITCHABLE_EXPORT --lock /work/runs/cpu.lock [--forms merged/as-exported,switchable/qv-a-stacked]

Writes benchmarks/results/et_slot_forms.{json,md}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

from common import RESULTS_DIR, cpu_lock, machine_probe, open_lock, time_in_two_processes  # first: it puts this checkout on sys.path

import numpy as np
import torch
from torch import nn

from benchmarks.slot_overhead import PREFILL, interleaved, median_ci
from exporters.executorch_backend import export_program, register_custom_ops
from exporters.runtime import open_export
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.suite.model import base_model_dir

QUANT = "8da4w"
MAX_CACHE_LEN = 256


def stacked_pair(a_q: np.ndarray, a_v: np.ndarray, b_q: np.ndarray, b_v: np.ndarray, k_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's stacked slot pair: ``A = [A_q; A_v]`` and ``B`` with ``B_q`` in the q rows and first
    r_q columns, ``B_v`` in the v rows (after ``k_rows`` zero rows of k) and last r_v columns, so that
    ``B A x = [B_q A_q x; 0; B_v A_v x]``."""
    r_q = a_q.shape[0]
    B = np.zeros((b_q.shape[0] + k_rows + b_v.shape[0], r_q + a_v.shape[0]), np.float32)
    B[: b_q.shape[0], :r_q] = b_q
    B[b_q.shape[0] + k_rows:, r_q:] = b_v
    return np.ascontiguousarray(np.concatenate([a_q, a_v])), B


def fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers 5.x ``LlamaAttention.forward`` with q, k, v from one Linear (``qkv_proj``) plus,
    when the attention has one, the stacked slot pair (``qkv_slot``)."""
    cache = kwargs.pop("past_key_values", cache)
    qkv = self.qkv_proj(hidden_states)
    if hasattr(self, "qkv_slot"):
        qkv = qkv + nn.functional.linear(nn.functional.linear(hidden_states, self.qkv_slot.lora_a), self.qkv_slot.lora_b)
    q, k, v = qkv.split(self.qkv_sizes, dim=-1)
    return _attend(self, q, k, v, position_embeddings, attention_mask, cache, kwargs)


def qv_a_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers 5.x ``LlamaAttention.forward`` with q and v's slots sharing one A Linear
    (``qv_slot``: ``lora_a = [A_q; A_v]``, then ``q.lora_b`` and ``v.lora_b``)."""
    cache = kwargs.pop("past_key_values", cache)
    h_q, h_v = nn.functional.linear(hidden_states, self.qv_slot.lora_a).split(self.qv_ranks, dim=-1)
    q = self.q_proj(hidden_states) + nn.functional.linear(h_q, self.qv_slot.q.lora_b)
    v = self.v_proj(hidden_states) + nn.functional.linear(h_v, self.qv_slot.v.lora_b)
    return _attend(self, q, self.k_proj(hidden_states), v, position_embeddings, attention_mask, cache, kwargs)


def _attend(self, q, k, v, position_embeddings, attention_mask, cache, kwargs):
    """The rest of transformers 5.x ``LlamaAttention.forward`` once q, k and v (..., heads x head_dim) are computed."""
    from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb, eager_attention_forward

    input_shape = q.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = q.reshape(hidden_shape).transpose(1, 2)
    key_states = k.reshape(hidden_shape).transpose(1, 2)
    value_states = v.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


class _B(nn.Module):
    def __init__(self, d_out: int, rank: int) -> None:
        super().__init__()
        self.register_buffer("lora_b", torch.zeros(d_out, rank))


class QVSlots(nn.Module):
    """``lora_a = [A_q; A_v]``, ``q.lora_b``, ``v.lora_b``: the leaf names the exporter treats as slots."""

    def __init__(self, r_q: int, r_v: int, d_in: int, d_q: int, d_v: int) -> None:
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(r_q + r_v, d_in))
        self.q, self.v = _B(d_q, r_q), _B(d_v, r_v)


def stack_qv_a(model: nn.Module, ranks: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Every attention of ``model`` in the A-stacked form (module docstring); returns the slot shapes (program order)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        d_in, d_q, d_v = attn.q_proj.in_features, attn.q_proj.out_features, attn.v_proj.out_features
        attn.qv_slot, attn.qv_ranks = QVSlots(*ranks, d_in, d_q, d_v), ranks
        p = f"model.layers.{i}.self_attn.qv_slot."
        shapes.update({p + "lora_a": (sum(ranks), d_in), p + "q.lora_b": (d_q, ranks[0]), p + "v.lora_b": (d_v, ranks[1])})
        attn.forward = types.MethodType(qv_a_forward, attn)
    return shapes


def qv_a_stacked(slots: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """The A-stacked form's slot arrays (:func:`stack_qv_a`'s order) from a task's per-module slot arrays."""
    out = {}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn."
        out[p + "qv_slot.lora_a"] = np.ascontiguousarray(np.concatenate([slots[p + "q_proj.lora_a"], slots[p + "v_proj.lora_a"]]))
        out[p + "qv_slot.q.lora_b"], out[p + "qv_slot.v.lora_b"] = slots[p + "q_proj.lora_b"], slots[p + "v_proj.lora_b"]
    return out


class SlotPair(nn.Module):
    def __init__(self, rank: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("lora_a", torch.zeros(rank, d_in))
        self.register_buffer("lora_b", torch.zeros(d_out, rank))


def merge_slots(model: nn.Module, slots: dict[str, np.ndarray]) -> None:
    """Fold a task's (decoded, padded) slots into the base weights: ``W += B A`` per module."""
    with torch.no_grad():
        for name in {n.rsplit(".", 1)[0] for n in slots}:
            model.get_submodule(name).weight += torch.from_numpy(slots[name + ".lora_b"]) @ torch.from_numpy(slots[name + ".lora_a"])


def fuse(model: nn.Module, ranks: tuple[int, int] | None) -> dict[str, tuple[int, int]]:
    """Every attention of ``model`` in the fused form (module docstring), with a stacked slot pair of
    ``ranks`` (q, v) when given; returns the slot shapes (program order)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        sizes = [p.out_features for p in parts]
        fused = nn.Linear(parts[0].in_features, sum(sizes), bias=False)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.qkv_proj, attn.qkv_sizes = fused, tuple(sizes)
        if ranks is not None:
            attn.qkv_slot = SlotPair(sum(ranks), fused.in_features, sum(sizes))
            shapes[f"model.layers.{i}.self_attn.qkv_slot.lora_a"] = (sum(ranks), fused.in_features)
            shapes[f"model.layers.{i}.self_attn.qkv_slot.lora_b"] = (sum(sizes), sum(ranks))
        attn.forward = types.MethodType(fused_forward, attn)
    return shapes


def stacked(slots: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """The stacked slot arrays of :func:`fuse` from a task's per-module slot arrays."""
    out = {}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn."
        aq, av, bq, bv = (slots[p + s] for s in ("q_proj.lora_a", "v_proj.lora_a", "q_proj.lora_b", "v_proj.lora_b"))
        # grouped-query attention: k is as wide as v
        out[p + "qkv_slot.lora_a"], out[p + "qkv_slot.lora_b"] = stacked_pair(aq, av, bq, bv, k_rows=bv.shape[0])
    return out


FORMS = ("merged/as-exported", "merged/qkv", "switchable/qkv-stacked", "switchable/qv-a-stacked")


def build(work: Path, switchable: Path, task: str, forms: tuple[str, ...] = FORMS) -> dict:
    """The programs of the comparison (``forms`` beside the switchable export; reused when present)
    and each one's slot arrays."""
    work.mkdir(parents=True, exist_ok=True)
    session = open_export(switchable, threads=1)
    session.set_task(task)
    slots = {k: np.array(v) for k, v in session.decoded[task].items()}
    n_layers = session.manifest.model["n_layers"]
    del session
    np.savez(work / "slots.npz", **slots)
    np.savez(work / "stacked.npz", **stacked(slots, n_layers))
    np.savez(work / "qv_a.npz", **qv_a_stacked(slots, n_layers))
    rank_q = slots["model.layers.0.self_attn.q_proj.lora_a"].shape[0]
    rank_v = slots["model.layers.0.self_attn.v_proj.lora_a"].shape[0]
    plan = {"switchable/as-exported": {"program": str(switchable / "model.pte"), "slots": str(work / "slots.npz")}}
    for key, form, with_slots in (("merged/as-exported", None, False), ("merged/qkv", "qkv", False), ("switchable/qkv-stacked", "qkv", True),
                                  ("switchable/qv-a-stacked", "qv-a", True)):
        if key not in forms:
            continue
        folder = work / key.replace("/", "-")
        folder.mkdir(exist_ok=True)
        plan[key] = {"program": str(folder / "model.pte"), "slots": str(work / ("stacked.npz" if form == "qkv" else "qv_a.npz")) if with_slots else None}
        if (folder / "model.pte").exists():
            continue
        model = load_causal_lm(base_model_dir())
        if not with_slots:
            merge_slots(model, slots)
        shapes = fuse(model, (rank_q, rank_v) if with_slots else None) if form == "qkv" else (stack_qv_a(model, (rank_q, rank_v)) if form == "qv-a" else {})
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        export_program(model, shapes, folder, QUANT, MAX_CACHE_LEN, phases)
        plan[key]["export_seconds"] = round(time.perf_counter() - t0, 1)
    return plan


class Program:
    """One ExecuTorch program with a task's slots set: slot_overhead.interleaved's session interface."""

    def __init__(self, path: str, slots: str | None) -> None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        register_custom_ops()
        _unsafe_reset_threadpool(1)
        self.program = Runtime.get().load_program(path)
        self.forward = self.program.load_method("forward")
        if slots is not None:
            values = dict(np.load(slots))
            self.program.load_method("set_slots").execute([torch.from_numpy(v) for v in values.values()])
        self.pos = 0

    def step(self, ids: list[int]) -> np.ndarray:
        out = self.forward.execute([torch.tensor([ids]), torch.arange(self.pos, self.pos + len(ids))])[0]
        self.pos += len(ids)
        return out[0].numpy()

    def prefill(self, ids: list[int]) -> None:
        self.pos = 0
        self.step(ids)

    def decode(self, token: int) -> np.ndarray:
        return self.step([token])


def time_all(plan: dict, tokens: int, rounds: int, reverse: bool) -> dict[str, list[float]]:
    programs = {}
    for key in (list(plan)[::-1] if reverse else list(plan)):
        p = Program(plan[key]["program"], plan[key]["slots"])
        p.prefill(PREFILL)
        for i in range(4):
            p.decode(17 + i)
        programs[key] = p
    return interleaved(programs, tokens, rounds)


def check(plan: dict) -> dict:
    """Logits of the stacked program against the switchable export's (same task, the same 8 tokens
    after the prefill), and the fused merged program's against the merged one's."""
    out = {}
    for a, b in (("switchable/as-exported", "switchable/qkv-stacked"), ("merged/as-exported", "merged/qkv"), ("switchable/as-exported", "switchable/qv-a-stacked")):
        if a not in plan or b not in plan:
            continue
        logits = []
        for key in (a, b):
            p = Program(plan[key]["program"], plan[key]["slots"])
            p.prefill(PREFILL)
            logits.append(np.stack([p.decode(17 + i)[-1] for i in range(8)]))
        out[b] = {"max_logit_diff_first_step": float(np.abs(logits[0][0] - logits[1][0]).max()),
                  "max_logit_diff_8_steps": float(np.abs(logits[0] - logits[1]).max()),
                  "argmax_equal": bool((logits[0].argmax(-1) == logits[1].argmax(-1)).all())}
    return out


REFERENCE = {"switchable/as-exported": "merged/as-exported", "switchable/qkv-stacked": "merged/qkv", "switchable/qv-a-stacked": "merged/as-exported"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("switchable", type=Path, help="an ExecuTorch 8da4w export with q_proj and v_proj slots (hydraopt export --format executorch --quant 8da4w)")
    ap.add_argument("--task", default="country-de")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/et_slot_forms"))
    ap.add_argument("--lock", type=Path)
    ap.add_argument("--forms", default=",".join(FORMS), help=f"programs to build beside the switchable export (comma-separated; all: {','.join(FORMS)}); merged/as-exported is every switchable one's reference unless merged/qkv is")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "et_slot_forms.json")
    ap.add_argument("--time-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_only:
        print(json.dumps(time_all(json.loads(args.time_only.read_text()), args.tokens, args.rounds, args.reverse)))
        return
    fd = open_lock(args.lock)
    with cpu_lock(fd, fcntl.LOCK_SH):
        forms = tuple(f for f in args.forms.split(",") if f)
        unknown = [f for f in forms if f not in FORMS]
        if unknown:
            raise SystemExit(f"--forms: unknown {unknown}; choose from {', '.join(FORMS)}")
        plan = build(args.work, args.switchable, args.task, forms)
        checks = check(plan)
    (args.work / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, __file__, str(args.switchable), "--time-only", str(args.work / "plan.json"), "--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    times, conditions = time_in_two_processes(cmd, fd)
    rows = []
    for key in plan:
        ref = REFERENCE.get(key) if REFERENCE.get(key) in plan else None
        ratios = [a / b - 1 for a, b in zip(times[key], times[ref])] if ref else None
        ci = median_ci(ratios) if ratios else None
        rows.append({
            "program": key, "ms_per_token": round(statistics.median(times[key]), 3),
            "reference": ref, "overhead_pct": round(100 * statistics.median(ratios), 2) if ratios else None,
            "overhead_ci95_pct": [round(100 * ci[0], 2), round(100 * ci[1], 2)] if ci else None,
            "vs_merged_as_exported_pct": round(100 * (statistics.median([a / b for a, b in zip(times[key], times["merged/as-exported"])]) - 1), 2) if "merged/as-exported" in times else None,
            "export_seconds": plan[key].get("export_seconds"), **checks.get(key, {}),
        })
    record = {
        "notes": {
            "what": "ExecuTorch 8da4w decode ms/token, switchable programs against the merged program of the same form, side by side (module docstring)",
            "switchable_export": str(args.switchable), "task": args.task, "tokens": args.tokens, "rounds_per_process": args.rounds,
            "timing": conditions, "machine": f"{platform.machine()}, 1 ExecuTorch thread: a host timing, not phone speed", "machine_probe": machine_probe(),
            "export_seconds_are": "wall-clock of each new program's lowering in this script (none when reused from --work): not a timing claim",
            "command": "python benchmarks/et_slot_forms.py " + " ".join(sys.argv[1:]),
        },
        "records": rows,
    }
    cols = ["program", "ms/token", "reference", "overhead %", "95 % CI", "vs merged as exported %", "max logit diff, first step", "max logit diff, 8 steps", "argmax equal"]
    table = [[r["program"], r["ms_per_token"], r["reference"] or "-", "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.2f}",
              "-" if r["overhead_ci95_pct"] is None else "[{:+.2f}, {:+.2f}]".format(*r["overhead_ci95_pct"]), "-" if r["vs_merged_as_exported_pct"] is None else f"{r['vs_merged_as_exported_pct']:+.2f}",
              r.get("max_logit_diff_first_step", "-"), r.get("max_logit_diff_8_steps", "-"), r.get("argmax_equal", "-")] for r in rows]
    md = "# ExecuTorch slot decode cost with q/k/v fused and stacked slots (benchmarks/et_slot_forms.py)\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in record["notes"].items()) + "\n\n" + "\n".join(markdown_table(cols, table, "lrlrrrrrl")) + "\n"
    write_record(args.out, record, md)
    print(md)


if __name__ == "__main__":
    main()
