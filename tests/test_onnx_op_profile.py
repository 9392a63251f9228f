"""``benchmarks/onnx_op_profile.py`` profiles the exporters' own decoder step: on real int4 exports
of the tiny model, a switchable export's profile has its slot nodes (one FusedMatMul pair and one Add
per stacked q/k/v pair and per o_proj pair) beyond the merged export's, in the decode steps only."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import onnx_op_profile  # noqa: E402

from exporters.export import export_bank  # noqa: E402

TOKENS = 4


def test_profile_counts_the_slot_nodes_of_each_decode_step(tmp_path, tiny_dir, bank):
    merged = export_bank(bank, tiny_dir, "onnx", "int4", tmp_path / "merged", merged_task="alpha", max_cache_len=64)
    switchable = export_bank(bank, tiny_dir, "onnx", "int4", tmp_path / "switchable", max_cache_len=64)
    ref, got = (onnx_op_profile.profile_once(f, TOKENS) for f in (merged, switchable))
    assert ref["op_nodes_per_token"].get("FusedMatMul", 0) == 0
    # per layer: the stacked q/k/v pair and the o_proj pair, two FusedMatMul and one Add each
    assert got["op_nodes_per_token"]["FusedMatMul"] == 2 * 2 * 2
    assert got["nodes_per_token"] - ref["nodes_per_token"] == 2 * 2 * 3
    assert got["kernel_ms_per_token"] > 0 and got["wall_ms_per_token"] > 0
