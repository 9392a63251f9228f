"""``benchmarks/slot_overhead.py``'s machinery on real ONNX exports of the tiny model: the merged and
switchable exports it makes and reuses, the side-by-side timing rows, the update of a quant_recipes
record, and the CPU lock the timing scripts share (``benchmarks/common.py``: shared to export or
score, exclusive to time).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import slot_overhead  # noqa: E402

torch.set_num_threads(1)


def _other_can_take_shared(lock: Path) -> bool:
    """Whether another process gets ``lock`` shared at once (``flock -s -n``: exit 0 if it did)."""
    return subprocess.run(["flock", "-s", "-n", str(lock), "true"]).returncode == 0


def test_lock_is_exclusive_only_while_timing(tmp_path):
    lock = tmp_path / "cpu.lock"
    lock.touch()
    fd = os.open(lock, os.O_RDONLY)
    try:
        with common.cpu_lock(fd, fcntl.LOCK_SH) as waited:
            assert waited >= 0 and _other_can_take_shared(lock)  # exporting shares the machine's lock
        with common.cpu_lock(fd, fcntl.LOCK_EX):
            assert not _other_can_take_shared(lock)  # timing keeps everyone else out
        assert _other_can_take_shared(lock)  # and lets go afterwards
    finally:
        os.close(fd)
    with common.cpu_lock(None, fcntl.LOCK_EX) as waited:  # no lock file: nothing taken
        assert waited == 0.0


def test_rows_time_switchable_exports_against_the_merged_one(tmp_path, tiny_dir, bank):
    merged, switchable = tmp_path / "merged-fp32", tmp_path / "none-fp32"
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", merged, None, "beta") is not None
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", switchable, None, None) is not None
    # a rerun finds both exports and makes neither again; another recipe in the folder is made anew
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", merged, None, "beta") is None
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", switchable, None, None) is None
    # an export of another slot signature in the folder is made anew, never reused (quant_recipes.wanted_signature)
    from exporters.slots import bank_signature

    own = bank_signature(bank)
    spec = ",".join(sorted({name.split(".")[-1] for name in own})) + f":{max(own.values()) + 1}"
    padded = tmp_path / "padded-fp32"
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", padded, spec, None) is not None
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", padded, spec, None) is None
    assert slot_overhead.exported(bank, tiny_dir, "onnx", "fp32", padded, None, None) is not None

    folders = {"merged": merged, "none": switchable}
    rows = slot_overhead.rows_from_times("fp32", folders, "beta", slot_overhead.time_recipe(folders, "beta", tokens=4, rounds=3))
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "none" and row["task"] == "beta" and len(row["runs_ms_per_token"]) == 3
    assert row["slots"] and all(r >= 1 for r in row["slots"].values())  # the switchable program has slots
    assert row["ms_per_token"] > 0 and row["merged_ms_per_token"] > 0
    lo, hi = row["slot_overhead_pct_ci95"]
    assert lo <= row["slot_overhead_pct"] <= hi
    assert row["meets_target"] == (row["slot_overhead_pct"] <= slot_overhead.TARGET_PCT)
    assert row["program_bytes"] > 0 and row["merged_program_bytes"] > 0

    md = slot_overhead.markdown(rows, {"runtime": "ONNX Runtime"})
    assert "| fp32 | none |" in md and "rank" in md

    # the exports opened in a rotated order (the script's later timing processes): the merged one is still every round's reference
    times = slot_overhead.time_recipe(folders, "beta", tokens=2, rounds=2, shift=1)
    assert list(times) == ["none", "merged"] and all(len(v) == 2 and min(v) > 0 for v in times.values())
    # pooled rounds of two processes: each round's ratio to the merged reference of the same round
    pooled = slot_overhead.rows_from_times("fp32", folders, "beta", {"merged": [10.0, 20.0, 10.0, 20.0], "none": [11.0, 20.0, 12.0, 24.0]})[0]
    assert abs(pooled["slot_overhead_pct"] - 15.0) < 1e-9 and pooled["merged_ms_per_token"] == 15.0
    # each process's own median beside the pooled one, and their mean: rounds 1-2 (+10 %, +0 %) and 3-4 (+20 %, +20 %)
    split = slot_overhead.rows_from_times("fp32", folders, "beta", {"merged": [10.0, 20.0, 10.0, 20.0], "none": [11.0, 20.0, 12.0, 24.0]}, ["merged_first", "none_first"])[0]
    assert split["slot_overhead_pct_by_process"] == pytest.approx({"merged_first": 5.0, "none_first": 20.0})
    assert split["slot_overhead_pct_mean_of_processes"] == pytest.approx(12.5)
    md = slot_overhead.markdown([split], {"runtime": "ONNX Runtime"})
    assert "+5.0 / +20.0" in md and "| +12.5 |" in md and "opened first: merged / none" in md

    # --report-only: the record from the timing processes' files in --work (one per open order), no export, no timing
    for first, merged_ms, none_ms in (("merged", [10.0, 20.0], [11.0, 20.0]), ("none", [10.0, 20.0], [12.0, 24.0])):
        (tmp_path / f"times-{first}-first.json").write_text(json.dumps(
            {"times": {"fp32": {"merged": merged_ms, "none": none_ms}}, "timed": f"{first} first", "machine_probe": {}}))
    out = tmp_path / "record.json"
    argv = ["slot_overhead.py", "--recipes", "fp32", "--methods", "none", "--task", "beta", "--rounds", "2", "--work", str(tmp_path), "--out", str(out), "--report-only"]
    old_argv, sys.argv = sys.argv, argv
    try:
        slot_overhead.main()
    finally:
        sys.argv = old_argv
    record = json.loads(out.read_text())
    (row,) = record["records"]
    assert row["slot_overhead_pct_by_process"] == pytest.approx({"merged_first": 5.0, "none_first": 20.0})
    assert row["slot_overhead_pct"] == pytest.approx(15.0) and row["slot_overhead_pct_mean_of_processes"] == pytest.approx(12.5)
    assert record["notes"]["banks"].startswith("none: one adapter per task") and "report-only" in record["notes"]["commit"]
    assert record["notes"]["timed"] == "merged first | none first"


def test_interleaved_times_every_session_every_round():
    class Clock:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def prefill(self, ids):
            assert ids == slot_overhead.PREFILL

        def decode(self, token):
            self.calls.append(token)

    a, b = Clock(), Clock()
    times = slot_overhead.interleaved({"a": a, "b": b}, tokens=5, rounds=2)
    assert a.calls == b.calls == list(range(17, 22)) * 2
    assert [len(v) for v in times.values()] == [2, 2] and all(t >= 0 for v in times.values() for t in v)


def test_update_recipes_fills_the_overhead_and_says_which_program_was_timed(tmp_path):
    records = [
        {"runtime": "onnxruntime", "quant": q, "bits": 32 if q == "fp32" else 4, "method": m, "description": q, "program_bytes": b,
         "bytes_ratio": 1.0, "score": 40.0, "fp32_score": 40.0, "drop_points": None, "drop_points_ci95": None,
         "rel_drop_pct": None, "rel_drop_pct_ci95": None, "slot_overhead_pct": None}
        for q, m, b in (("fp32", "none", 100), ("int4", "none", 30), ("int4", "hydraopt", 31))
    ]
    path = tmp_path / "quant_recipes.json"
    path.write_text(json.dumps({"notes": {}, "records": records}))
    rows = [{"quant": "fp32", "method": "none", "program_bytes": 100, "slot_overhead_pct": 2.0, "slot_overhead_pct_ci95": [1.0, 3.0]},
            {"quant": "int4", "method": "none", "program_bytes": 29, "slot_overhead_pct": 6.0, "slot_overhead_pct_ci95": [5.0, 7.0]}]
    assert slot_overhead.update_recipes(path, rows, "slot_overhead_onnx.json", "onnx") == 2
    got = {(r["quant"], r["method"]): r for r in json.loads(path.read_text())["records"]}
    assert got["fp32", "none"]["slot_overhead_pct"] == 2.0 and got["fp32", "none"]["slot_overhead_timed_program_is_scored_program"]
    assert got["int4", "none"]["slot_overhead_pct"] == 6.0 and not got["int4", "none"]["slot_overhead_timed_program_is_scored_program"]
    assert got["int4", "hydraopt"]["slot_overhead_pct"] is None  # not timed: left as it was
    assert "+6.0" in path.with_suffix(".md").read_text() and path.with_suffix(".png").is_file()


def test_machine_probe_says_which_machine_a_timing_ran_on():
    """Timing records carry the CPU and two probe speeds, so runs on different machines of a pool
    can be told apart; the torch thread count is left as it was."""
    threads = torch.get_num_threads()
    probe = common.machine_probe()
    assert torch.get_num_threads() == threads
    assert set(probe) == {"cpu", "isa", "cores", "python_loop_ns_per_iter", "matmul_gflops_1_thread"}
    assert probe["isa"] in {"avx512f", "avx2", "asimd", "unknown"}
    assert probe["cores"] == os.cpu_count()
    assert 0 < probe["python_loop_ns_per_iter"] < 10_000
    assert probe["matmul_gflops_1_thread"] > 0.1
    json.dumps(probe)  # it goes into JSON records as it is
