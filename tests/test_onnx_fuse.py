"""The ONNX program's fused form (exporters/onnx_fuse.py) on real exports of the tiny model: q, k and v
as one MatMul per attention whose 4-bit blocks are the three projections' own, their slots one
stacked pair, each task's slots placed into it by BankSlots and refused when a placement is not a
block of its input; outputs against PyTorch with the task merged in."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporters.runtime import open_export
from exporters.targets.device_runner import BankSlots, Export, Refused
from tiny_models import TASKS, TinyExports, task_errors

ATTN = [f"model.layers.{i}.self_attn" for i in range(2)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyExports:
    return TinyExports(tmp_path_factory.mktemp("fuse"))


def _quantised_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's MatMulNBits 4-bit blocks and scales (int4's setting) of one (d_in, N) weight."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    d_in, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, d_in])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(weight, "w")])
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    return inits[node.input[1]], inits[node.input[2]]


def test_qkv_is_one_matmul_whose_4bit_blocks_are_the_projections_own(tiny):
    fp32 = onnx.load(str(tiny["fp32"] / "model.onnx"))
    int4 = onnx.load(str(tiny["int4"] / "model.onnx"))
    for model, op in ((fp32, "MatMul"), (int4, "MatMulNBits")):
        assert not [i.name for i in model.graph.initializer if re.search(r"\.[qkv]_proj\.", i.name)]
        assert sorted(n.op_type for n in model.graph.node if len(n.input) > 1 and ".qkv_proj.weight" in n.input[1]) == [op] * len(ATTN)
    fused = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}[f"model.{ATTN[0]}.qkv_proj.weight.T"]
    assert fused.shape == (64, 64 + 32 + 32)  # q, k, v outputs of the tiny model
    whole = _quantised_blocks(fused)
    parts = [_quantised_blocks(np.ascontiguousarray(fused[:, a:b])) for a, b in ((0, 64), (64, 96), (96, 128))]
    for got, want in zip(whole, zip(*parts)):
        np.testing.assert_array_equal(got, np.concatenate(want))
    inits = {i.name: numpy_helper.to_array(i) for i in int4.graph.initializer}
    node = next(n for n in int4.graph.node if n.op_type == "MatMulNBits" and ATTN[0] + ".qkv_proj" in n.input[1])
    np.testing.assert_array_equal(inits[node.input[1]], whole[0])  # the export quantised the fused weight the same way


def test_slots_of_an_attention_are_one_pair_of_inputs_and_one_add(tiny):
    model = onnx.load(str(tiny["int4"] / "model.onnx"))
    inputs = [i.name for i in model.graph.input if "lora" in i.name]
    assert sorted(inputs) == sorted(f"{a}.{m}.{s}" for a in ATTN for m in ("o_proj", "qkv_proj") for s in ("lora_a", "lora_b"))
    readers = Counter(n.op_type for n in model.graph.node for i in n.input if i.endswith("qkv_proj.lora_a") or i.endswith("qkv_proj.lora_b"))
    assert readers == {"Transpose": 2 * len(ATTN)}
    assert sum(n.op_type == "Split" and n.name.endswith("qkv_proj.split") for n in model.graph.node) == len(ATTN)


@pytest.mark.parametrize("key", ["fp32", "int4"])
def test_every_task_matches_its_merged_reference_through_the_stacked_slots(tiny, refs, key):
    """Each task's outputs are its own adapter's (closer to its reference than to any other task's)."""
    session = open_export(tiny[key])
    for task in TASKS:
        _, _, own, others = task_errors(session, refs, task)
        assert own < (1e-4 if key == "fp32" else 0.3) and own < others / 2, (task, own, others)


def test_placement_writes_each_module_slot_into_its_block(tiny):
    export = Export(str(tiny["fp32"]))
    bank = BankSlots(export.raw)
    bank.load_shared(export.verified(export.find("shared"), "the shared file"))
    plain = BankSlots({**export.raw, "slots": [[s, list(shape)] for s, shape in bank.slots.items()], "placement": []})  # module slots as inputs
    plain.load_shared(export.verified(export.find("shared"), "the shared file"))
    for task in TASKS:
        stacked = bank.task_slots(task, export.verified_task_file(task))
        modules = plain.task_slots(task, export.verified_task_file(task))
        a, b = stacked[f"{ATTN[1]}.qkv_proj.lora_a"], stacked[f"{ATTN[1]}.qkv_proj.lora_b"]
        np.testing.assert_array_equal(a, np.concatenate([modules[f"{ATTN[1]}.q_proj.lora_a"], modules[f"{ATTN[1]}.v_proj.lora_a"]]))
        np.testing.assert_array_equal(b[:64, :4], modules[f"{ATTN[1]}.q_proj.lora_b"])
        np.testing.assert_array_equal(b[96:, 4:], modules[f"{ATTN[1]}.v_proj.lora_b"])
        assert not b[:64, 4:].any() and not b[64:96].any() and not b[96:, :4].any()  # k's rows and the off-diagonal blocks
        bank.release(stacked)  # the next task's load reuses the stacked memory: its zeros must stay zero


def test_a_kept_task_keeps_its_slots_while_others_load(tiny):
    """Loads of other tasks never write into the memory of a task still held (stacked inputs, and the
    unstacked o_proj slots, which are views of the decoded module slots)."""
    export = Export(str(tiny["fp32"]))
    shared = export.verified(export.find("shared"), "the shared file")
    bank, fresh = BankSlots(export.raw), BankSlots(export.raw)
    bank.load_shared(shared)
    fresh.load_shared(shared)
    held = {t: bank.task_slots(t, export.verified_task_file(t)) for t in TASKS}
    bank.release(held.pop("beta"))  # its memory goes to the next load
    held["beta"] = bank.task_slots("beta", export.verified_task_file("beta"))
    for task, slots in held.items():
        want = fresh.task_slots(task, export.verified_task_file(task))
        assert list(slots) == [name for name, _ in export.raw["slots"]]
        for name, value in want.items():
            np.testing.assert_array_equal(slots[name], value, err_msg=f"{task} {name}")


def test_a_placement_outside_its_input_is_refused_naming_the_slot(tiny, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny["fp32"], folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["placement"][1][3] = 100  # q_proj's B rows start past the stacked B's 128 rows
    with pytest.raises(Refused, match=r"placement of 'model\.layers\.0\.self_attn\.q_proj\.lora_b'"):
        BankSlots(raw)
    raw["placement"][1][3] = 0
    raw["placement"].append(raw["placement"][0])
    with pytest.raises(Refused, match="placed twice"):
        BankSlots(raw)
