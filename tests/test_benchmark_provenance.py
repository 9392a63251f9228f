"""Resumable benchmarks (frontier.py, add_task.py) never add records measured on retrained
adapters to records of the earlier ones: each results file names the adapters' SHA-256."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402

from hydraopt_mobile.peft_io import write_peft_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _adapters(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    for task in ("a", "b"):
        factors = {"model.layers.0.self_attn.q_proj": (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}
        (folder / task).mkdir(parents=True)
        write_peft_files(folder / task, factors, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}, torch.float16)
    return folder


def test_adapter_digests_name_each_task_and_change_with_its_weights(tmp_path):
    one, two = common.adapter_digests(_adapters(tmp_path / "x", 0)), common.adapter_digests(_adapters(tmp_path / "y", 1))
    assert sorted(one) == ["a", "b"] and all(len(d) == 64 for d in one.values())
    assert one != two and one == common.adapter_digests(tmp_path / "x")


def test_resume_keeps_same_adapters_refuses_others_and_forgets_on_request(tmp_path):
    records = [{"init": "shared-seed", "task": "a"}, {"init": "independent-seeds", "task": "a"}]
    recorded = {"independent-seeds": {"a": "1" * 64}}
    path = tmp_path / "results.json"
    assert common.resumable_records(records, recorded, "independent-seeds", {"a": "1" * 64}, False, path) == records
    assert common.resumable_records(records, {}, "independent-seeds", {"a": "2" * 64}, False, path) == records  # from before digests
    with pytest.raises(SystemExit, match=r"results.json: its independent-seeds records were measured on other adapters \(SHA-256 differ for a\).*--forget-init independent-seeds"):
        common.resumable_records(records, recorded, "independent-seeds", {"a": "2" * 64}, False, path)
    assert common.resumable_records(records, recorded, "independent-seeds", {"a": "2" * 64}, True, path) == records[:1]


def test_frontier_merge_refuses_records_of_other_adapters_and_forget_replaces_them(tmp_path):
    def results(name: str, digest: str, score: float) -> Path:
        rec = {"method": "none", "budget": None, "format": "fp16", "at": None, "init": "independent-seeds", "avg_score": score}
        path = tmp_path / name
        path.write_text(json.dumps({"meta": {"schema": 2, "adapters_sha256": {"independent-seeds": {"a": digest}}}, "records": [rec]}))
        return path

    out, new = results("out.json", "1" * 64, 1.0), results("new.json", "2" * 64, 2.0)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--out", str(out), "--merge", str(new)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "new.json: its independent-seeds records were measured on other adapters" in refused.stderr
    assert json.loads(out.read_text())["records"][0]["avg_score"] == 1.0  # nothing lost
    merged = subprocess.run(cmd + ["--forget-init", "independent-seeds"], capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert [r["avg_score"] for r in data["records"]] == [2.0], merged.stderr
    assert data["records"][0]["calibration"] is False  # a record from before the field: measured data-free
    assert data["meta"]["adapters_sha256"] == {"independent-seeds": {"a": "2" * 64}}


def test_frontier_forget_method_drops_that_methods_records_of_the_chosen_init_only(tmp_path):
    out = tmp_path / "frontier.json"
    out.write_text((ROOT / "benchmarks" / "results" / "frontier.json").read_text())
    before = json.loads(out.read_text())["records"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--out", str(out), "--forget-method", "hydraopt", "--init", "shared-seed", "--report"]
    subprocess.run(cmd, check=True, capture_output=True)
    after = json.loads(out.read_text())["records"]
    dropped = [r for r in before if r["method"] == "hydraopt" and r["init"] == "shared-seed"]
    assert dropped and len(after) == len(before) - len(dropped)
    assert not any(r["method"] == "hydraopt" and r["init"] == "shared-seed" for r in after)
    assert sum(r["method"] == "hydraopt" and r["init"] == "independent-seeds" for r in after) == sum(r["method"] == "hydraopt" and r["init"] == "independent-seeds" for r in before) > 0
