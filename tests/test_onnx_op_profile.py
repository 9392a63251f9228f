"""``benchmarks/onnx_op_profile.py`` profiles the exporters' own decoder step: on real int4 exports
of the tiny model, a switchable export's profile has its slot nodes beyond the merged export's, in the
decode steps only: per layer the q/k/v slots' MatMuls (the stacked A, then q's and v's B, read as
stored), their Split and two Adds, and the o_proj pair (a FusedMatMul pair, its factors behind
Transposes, and an Add)."""

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
    assert got["op_nodes_per_token"]["FusedMatMul"] == 2 * 2  # o_proj's pair, in each of 2 layers
    assert got["op_nodes_per_token"]["MatMul"] - ref["op_nodes_per_token"]["MatMul"] == 2 * 3  # q/k/v's A, B_q, B_v
    assert got["nodes_per_token"] - ref["nodes_per_token"] == 2 * (6 + 3)
    assert got["kernel_ms_per_token"] > 0 and got["wall_ms_per_token"] > 0
