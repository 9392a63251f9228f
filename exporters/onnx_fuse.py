"""ONNX programs with each attention's q, k and v projections as one MatMul and their LoRA slots as
one stacked pair: the form ONNX Runtime decodes fastest (benchmarks/results/onnx_slot_forms.md).

ONNX Runtime's cost of a slot is per node, not per multiply-add: as ``torch.onnx.export`` writes
them, the q and v slots of a layer are ten nodes (per module a Transpose of each factor, two MatMul
and an Add) beside three projections, and rank-1 HydraOpt slots cost nearly what rank-8 ones do
(+5.5 against +6.7 % decode time at 4 bits). This pass rewrites the fp32 graph, per attention:

- q, k and v become one MatMul whose weight is the three concatenated along the output (``(d_in,
  n_q + n_k + n_v)``) followed by a Split. A weight quantiser's blocks run along the input, so the
  quantised fused weight holds the same blocks and scales as the three would (``int4`` logits of the
  fused form are bit-identical: tests/test_onnx_slot_forms.py);
- the slots of those three become one stacked pair, ``A = [A_q; A_k; A_v]`` (r_q + r_k + r_v rows)
  and ``B`` block-diagonal (``B_q`` in the q rows and first r_q columns, and so on), so that
  ``B A x = [B_q A_q x; B_k A_k x; B_v A_v x]`` is added to the fused output before the Split: two
  Transpose, two MatMul and one Add per layer whatever the number of slotted modules. A module
  without a slot has no rows in ``A`` and zero rows in ``B``.

The program's inputs are the stacked slots (``<attention>.qkv_proj.lora_a`` / ``.lora_b``); which
module slot fills which block is the export manifest's ``placement`` (:func:`stacked_layout`), which
``BankSlots`` applies on each task load. Slots of other modules (o_proj, the MLP) stay one pair
each. A merged export (no slots) is fused too, so the merged reference of a timing has the same form.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from exporters.slots import SLOT_A, SLOT_B

QKV = ("q_proj", "k_proj", "v_proj")
FUSED = "qkv_proj"


def _linear(module: nn.Module) -> nn.Linear:
    """The base Linear of a projection, slotted (``LoraSlotLinear``) or not."""
    return getattr(module, "base", module)


def _is_projection(module: nn.Module, name: str) -> bool:
    child = getattr(module, name, None)
    return isinstance(child, nn.Module) and isinstance(_linear(child), nn.Linear)


def attentions(model: nn.Module) -> list[str]:
    """Every module of ``model`` that has q, k and v projections (Linears, slotted or not), by name."""
    return [name for name, mod in model.named_modules() if all(_is_projection(mod, p) for p in QKV)]


def stacked_layout(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], list[list]]:
    """(program inputs: slot -> shape, placement) of ``model``'s fused form for the module slots
    ``shapes`` (:func:`exporters.slots.slot_shapes`). Placement entries are ``[module slot, its shape,
    program slot, first row, first column]``; a module slot outside q/k/v is its own program input
    (no entry)."""
    inputs, placement, stacked = {}, [], set()
    for attention in attentions(model):
        mods = [f"{attention}.{p}" for p in QKV]
        ranks = [shapes[f"{m}.{SLOT_A}"][0] if f"{m}.{SLOT_A}" in shapes else 0 for m in mods]
        if not any(ranks):
            continue
        outs = [_linear(model.get_submodule(m)).out_features for m in mods]
        d_in = _linear(model.get_submodule(mods[0])).in_features
        a, b = f"{attention}.{FUSED}.{SLOT_A}", f"{attention}.{FUSED}.{SLOT_B}"
        inputs[a], inputs[b] = (sum(ranks), d_in), (sum(outs), sum(ranks))
        for i, (m, r, n) in enumerate(zip(mods, ranks, outs)):
            if r:
                placement.append([f"{m}.{SLOT_A}", [r, d_in], a, sum(ranks[:i]), 0])
                placement.append([f"{m}.{SLOT_B}", [n, r], b, sum(outs[:i]), sum(ranks[:i])])
                stacked.update({f"{m}.{SLOT_A}", f"{m}.{SLOT_B}"})
    # program order: the unstacked slots where the export put them, then the stacked ones (fuse_qkv adds them last)
    return {**{slot: shape for slot, shape in shapes.items() if slot not in stacked}, **inputs}, placement


class _Graph:
    """Lookups over one graph's nodes, kept as the pass edits them."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}

    def reader(self, name: str, op: str) -> onnx.NodeProto:
        found = [n for n in self.nodes if n.op_type == op and name in n.input]
        if len(found) != 1:
            raise RuntimeError(f"fusing q/k/v: expected one {op} reading {name!r}, found {len(found)}")
        return found[0]

    def projection(self, weight: str) -> onnx.NodeProto:
        """The MatMul of a projection whose weight initializer is ``weight`` (through its Transpose)."""
        return self.reader(self.reader(weight, "Transpose").output[0], "MatMul")

    def slot_chain(self, base_out: str, slot_inputs: set[str]) -> tuple[str, list[onnx.NodeProto]]:
        """The output of the Add that adds a slot's ``B (A x)`` to ``base_out`` and every node of that
        (the Add, and its MatMuls and Transposes back to the slot inputs)."""
        add = self.reader(base_out, "Add")
        producers = {o: n for n in self.nodes for o in n.output}
        chain, todo = [add], [x for x in add.input if x != base_out]
        while todo:
            node = producers.get(todo.pop())
            if node is not None and node.op_type in ("MatMul", "Transpose") and node not in chain:
                chain.append(node)
                todo += [x for x in node.input if x not in slot_inputs]
        return add.output[0], chain


def fuse_qkv(model: onnx.ModelProto, torch_model: nn.Module, shapes: dict[str, tuple[int, int]], prefix: str) -> onnx.ModelProto:
    """Rewrite ``model`` (fp32, as ``exporters/onnx_backend.py`` exports it: module slots as inputs
    with zero defaults, base weights as initializers named ``prefix + module + [.base].weight``)
    into the fused form of the module docstring, in place; returns it."""
    g = _Graph(model.graph)
    program_inputs, placement = stacked_layout(torch_model, shapes)
    module_inputs = {slot for slot, *_ in placement}
    removed: list[onnx.NodeProto] = []
    for attention in attentions(torch_model):
        mods = [f"{attention}.{p}" for p in QKV]
        weights = [prefix + m + (".base" if f"{m}.{SLOT_A}" in shapes else "") + ".weight" for m in mods]
        matmuls = [g.projection(w) for w in weights]
        x = matmuls[0].input[0]
        if any(mm.input[0] != x for mm in matmuls):
            raise RuntimeError(f"fusing q/k/v: the projections of {attention} do not read one input")
        finals = []
        for m, w, mm in zip(mods, weights, matmuls):
            removed += [mm, g.reader(w, "Transpose")]
            if f"{m}.{SLOT_A}" in module_inputs:
                final, chain = g.slot_chain(mm.output[0], module_inputs)
                removed += chain
                finals.append(final)
            else:
                finals.append(mm.output[0])
        p = f"{attention}.{FUSED}"
        arrays = [numpy_helper.to_array(g.inits[w]) for w in weights]  # (n_out, d_in) each
        fused_w = np.concatenate([w.T for w in arrays], axis=1)
        new_inits = [numpy_helper.from_array(np.ascontiguousarray(fused_w), f"{prefix}{p}.weight.T"),
                     numpy_helper.from_array(np.array([w.shape[0] for w in arrays], dtype=np.int64), f"{p}.split")]
        new_nodes = [helper.make_node("MatMul", [x, f"{prefix}{p}.weight.T"], [f"{p}.out"], name=f"{p}.matmul")]
        total = f"{p}.out"
        a, b = f"{p}.{SLOT_A}", f"{p}.{SLOT_B}"
        if a in program_inputs:
            for slot in (a, b):
                new_inits.append(numpy_helper.from_array(np.zeros(program_inputs[slot], np.float32), slot))
                model.graph.input.append(helper.make_tensor_value_info(slot, onnx.TensorProto.FLOAT, list(program_inputs[slot])))
            new_nodes += [
                helper.make_node("Transpose", [a], [f"{p}.a_t"], name=f"{p}.a_t"),
                helper.make_node("MatMul", [x, f"{p}.a_t"], [f"{p}.h"], name=f"{p}.h"),
                helper.make_node("Transpose", [b], [f"{p}.b_t"], name=f"{p}.b_t"),
                helper.make_node("MatMul", [f"{p}.h", f"{p}.b_t"], [f"{p}.delta"], name=f"{p}.delta"),
                helper.make_node("Add", [total, f"{p}.delta"], [f"{p}.sum"], name=f"{p}.sum"),
            ]
            total = f"{p}.sum"
        new_nodes.append(helper.make_node("Split", [total, f"{p}.split"], finals, axis=-1, name=f"{p}.split"))
        # in place of the first projection: x is computed before it, and whatever reads q, k or v after
        gone = {id(n) for n in removed}
        first = min(g.nodes.index(mm) for mm in matmuls)
        g.nodes = [n for n in g.nodes[:first] if id(n) not in gone] + new_nodes + [n for n in g.nodes[first:] if id(n) not in gone]
        g.inits.update({t.name: t for t in new_inits})
        model.graph.initializer.extend(new_inits)
    inputs = [i for i in model.graph.input if i.name not in module_inputs]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    used = {i for n in g.nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(g.nodes)
    produced = {o for n in g.nodes for o in n.output}
    value_info = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    return model
