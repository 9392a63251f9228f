"""The benchmark's report files: JSON records round-trip, one Markdown row per export, a PNG."""

from __future__ import annotations

import json

from hydraopt_mobile.app.bench import write_reports
from hydraopt_mobile.app.bench_report import summarise


def _record(export: str, task: str, score: float, runtime: str = "onnxruntime") -> dict:
    return {
        "export": export, "runtime": runtime, "quant": "fp32", "method": "hydraopt", "task": task, "n_examples": 5,
        "bytes_resident": 1000, "bytes_task": 10, "bytes_total": 1020, "score": score, "score_pytorch": score + 1,
        "max_logit_err": 1e-5, "token_agreement": 1.0, "switch_ms": 0.01, "task_load_ms": 0.1, "program_load_ms": 50.0,
        "prefill_ms": 5.0, "decode_ms_per_token": 2.0, "peak_rss_mb": 300.0, "rss_baseline_mb": 250.0, "threads": 1,
    }


def test_reports_hold_every_record_and_one_summary_row_per_export(tmp_path):
    records = [_record("a", "t1", 50.0), _record("a", "t2", 70.0), _record("b", "t1", 40.0, "executorch")]
    path = tmp_path / "res" / "export_host.json"
    write_reports(records, path, {"threads": 1})
    saved = json.loads(path.read_text())
    assert saved["records"] == records and saved["notes"] == {"threads": 1}
    summary = summarise(records)
    assert [r["export"] for r in summary] == ["a", "b"]
    assert summary[0]["score"] == 60.0 and summary[0]["tasks"] == 2 and summary[0]["task_load_ms"] == 0.1
    md = path.with_suffix(".md").read_text()
    assert md.count("| a | onnxruntime |") == 1 and md.count("| b | executorch |") == 1
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_summary_carries_the_export_time_when_the_records_have_it(tmp_path):
    records = [_record("a", "t1", 50.0), _record("a", "t2", 70.0)]
    records[1]["task_load_ms"] = 0.3
    for r in records:
        r.update(export_seconds=2.5, program_source="cache (hard link)")
    path = tmp_path / "export_host.json"
    write_reports(records, path, {})
    (row,) = summarise(records)
    assert row["task_load_ms"] == 0.2 and row["export_seconds"] == 2.5  # median over tasks; the export's own time
    header = next(line for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("| export | runtime"))
    assert header.split(" | ")[-2:] == ["export_seconds", "program_source |"]
