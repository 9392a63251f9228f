"""``benchmarks/onnx_slot_forms.py``'s graph rewrites on real 4-bit ONNX exports of the tiny model:
every form computes what the export does (same slots, same tokens; the tiny bank's o_proj slots stay
as they are), with fewer nodes, and the stacked slot arrays carry each task's own factors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import onnx_slot_forms  # noqa: E402

from exporters.export import export_bank  # noqa: E402


def test_forms_compute_what_the_export_does(tmp_path, tiny_dir, bank):
    switchable = export_bank(bank, tiny_dir, "onnx", "int4", tmp_path / "none-int4", max_cache_len=64)
    merged = export_bank(bank, tiny_dir, "onnx", "int4", tmp_path / "merged-int4", max_cache_len=64, merged_task="beta")
    plan = onnx_slot_forms.prepare([merged, switchable], "beta", tmp_path / "forms")
    assert set(plan) == {"merged-int4/as-exported", "merged-int4/qkv"} | {f"none-int4/{f}" for f in onnx_slot_forms.FORMS}
    for key, p in plan.items():
        if key.endswith("/qkv"):  # fusing the projections keeps every 4-bit block and scale: bit for bit
            assert p["max_logit_diff_vs_as_exported"] == 0.0, key
        else:  # a stacked slot sums in another order: a last bit at first, which the 4-bit matmuls'
            # 8-bit input rounding may grow over the following steps
            assert p["max_logit_diff_first_step"] < 1e-4, key
    nodes = {key: p["nodes"] for key, p in plan.items()}
    assert nodes["merged-int4/qkv"] < nodes["merged-int4/as-exported"]
    assert nodes["none-int4/qkv-stacked"] < nodes["none-int4/qkv"] < nodes["none-int4/as-exported"]
    assert nodes["none-int4/stacked"] < nodes["none-int4/as-exported"]
    fused = onnx.load(plan["none-int4/qkv-stacked"]["model"])
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMulNBits") == len([n for n in onnx.load(switchable / "model.onnx").graph.node if n.op_type == "MatMulNBits"]) - 2 * 2  # q, k, v -> 1 per layer


def test_stacked_values_place_each_factor_in_its_block():
    rng = np.random.default_rng(0)
    slots = {"o.lora_a": np.ones((1, 8), np.float32), "q.lora_a": rng.standard_normal((2, 8), dtype=np.float32), "q.lora_b": rng.standard_normal((6, 2), dtype=np.float32),
             "v.lora_a": rng.standard_normal((3, 8), dtype=np.float32), "v.lora_b": rng.standard_normal((4, 3), dtype=np.float32)}
    layout = {0: ({"q": "q.lora_a", "v": "v.lora_a"}, {"q": "q.lora_b", "v": "v.lora_b"}, [6, 4, 4], [2, 3])}
    out = onnx_slot_forms.stacked_values(slots, layout)
    assert set(out) == {"slot.0.qv_a", "slot.0.qkv_b", "o.lora_a"} and out["o.lora_a"] is slots["o.lora_a"]  # unstacked slots pass
    A, B = out["slot.0.qv_a"], out["slot.0.qkv_b"]
    x = rng.standard_normal(8, dtype=np.float32)
    delta = B @ (A @ x)
    np.testing.assert_allclose(delta[:6], slots["q.lora_b"] @ (slots["q.lora_a"] @ x), rtol=1e-5)
    np.testing.assert_array_equal(delta[6:10], 0)  # k has no slot
    np.testing.assert_allclose(delta[10:], slots["v.lora_b"] @ (slots["v.lora_a"] @ x), rtol=1e-5)
