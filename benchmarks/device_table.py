"""One table of every device target's results, rows = target x method (x quant), for the README.

    python benchmarks/device_table.py            # writes benchmarks/results/device_table.md and the README's table

It also draws the arm64-cpu records' pictures (``device_arm64-cpu*.png``: per-task scores on the target and
the host, drops with their intervals) from their JSON, so a record written before its benchmark drew one has it.

Reads the records that the target benchmarks wrote (never edits them):
``device_arm64-cpu.json`` and ``device_arm64-cpu-executorch.json`` (benchmarks/device_arm64.py, ONNX and
ExecuTorch exports), ``device_qnn-htp.json``
(benchmarks/device_qnn_htp.py), ``device_ethos-u.json`` (benchmarks/device_ethos_u.py). Each row
says what it covers (whole model or one layer; how many tasks and examples) and how its latency is to
be read (emulated, estimated): none of them is a phone's speed. The README's copy sits between the
markers ``<!-- device-table:begin -->`` and ``<!-- device-table:end -->``.
"""

from __future__ import annotations

import json
import statistics

from common import RESULTS_DIR as RESULTS, ROOT, readme_block  # first: it puts this checkout on sys.path

from hydraopt_mobile.app.records import markdown_table
from hydraopt_mobile.app.targets_bench import plot_target, series_key
from hydraopt_mobile.atomic import atomic_file
BEGIN, END = "<!-- device-table:begin -->", "<!-- device-table:end -->"
HEADER = ["target", "method", "quant", "scope", "bytes resident", "bytes per task", "total vs one-per-task", "score (examples)",
          "drop vs one-per-task [95 % CI]", "host drop [95 % CI]", "parity vs host", "switch", "task load", "latency"]


def _load(name: str) -> dict | None:
    path = RESULTS / f"device_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _drop(d: dict | None) -> str:
    if not d:
        return "-"
    low, high = d["drop_points_ci95"]
    return f"{d['drop_points']:+.2f} [{low:+.2f}, {high:+.2f}]"


def arm64_rows(data: dict) -> list[list]:
    """One row per export (method, budget, quant): bytes and scores over the tasks measured, drops from the record's notes."""
    groups: dict[str, list[dict]] = {}
    for r in data["records"]:
        groups.setdefault(series_key(r), []).append(r)
    drops = data["notes"].get("drops", {})
    rows = []
    for key, recs in sorted(groups.items()):
        method, quant = key.rsplit("/", 1)
        none = groups.get(series_key({"method": "none", "quant": quant}))
        total = recs[0]["bytes_total"]
        ratio = f"{total / none[0]['bytes_total']:.3f}" if none else "-"
        n = sum(r["n_examples"] for r in recs)
        scores = [s for r in recs for s in r.get("score_each", [])]
        score = f"{statistics.mean(scores):.1f} ({n}, {data['notes'].get('scoring', 'generated')})" if scores else "-"
        errs = [r["max_logit_err"] for r in recs if r["max_logit_err"] is not None]
        identical = all(r["tokens_identical"] for r in recs)
        parity = f"tokens {'identical' if identical else 'differ'}, max logit err {max(errs):.1e}" if errs else "-"
        d = drops.get(key, {})
        rows.append(["arm64-cpu", method, quant, f"whole model, {len(recs)} tasks", f"{recs[0]['bytes_resident']:,}",
                     f"{round(statistics.mean(r['bytes_task'] for r in recs)):,}", ratio, score,
                     _drop(d.get("drop_points")), _drop(d.get("host_drop_points")), parity,
                     f"{statistics.median(r['switch_ms'] for r in recs):.4f} ms",
                     f"{statistics.median(r['task_load_ms'] for r in recs):.0f} ms", recs[0]["latency_kind"]])
    return rows


def qnn_rows(data: dict) -> list[list]:
    """One row per (export, quant): teacher-forced scores on HTP, drops vs one-per-task on HTP and on the host's fp32 export."""
    per_task: dict[tuple[str, str], list[dict]] = {}
    for p in data.get("per_task", []):
        per_task.setdefault((p["export"], p["quant"]), []).append(p)
    contexts = {(c["export"], c["quant"], c["htp_arch"]): c["bytes"] for c in data.get("contexts", [])}
    none = next((r for r in data["records"] if r["method"] == "none"), None)
    rows = []
    for r in data["records"]:
        tasks = per_task.get((r["export"], r["quant"]), [])
        archs = sorted(a for (e, q, a) in contexts if (e, q) == (r["export"], r["quant"]))
        resident = ", ".join(f"v{a}: {contexts[(r['export'], r['quant'], a)]:,}" for a in archs) or f"{r['bytes_qdq']:,} (QDQ ONNX)"
        n_tasks = len(data["notes"]["tasks"])  # the bank's tasks, whether or not each got an example on HTP
        total = lambda x: x["bytes_qdq"] + n_tasks * x["bytes_task_mean"]  # noqa: E731
        ratio = f"{total(r) / total(none):.3f} (QDQ)" if none else "-"
        parity = (f"max logit err {r['max_logit_err']:.1f}, top-1 {r['token_agreement']:.2f}; host fp32 score {r['score_host']:.1f}")
        method = f"{r['method']} ({r['budget']})" if r.get("budget") else r["method"]
        rows.append(["qnn-htp", method, r["quant"], f"whole model, {r['tasks']} of {n_tasks} tasks; prompt cache fp32 on CPU EP, answer rows on HTP",
                     resident, f"{round(r['bytes_task_mean']):,}", ratio, f"{r['score']:.1f} ({r['n_examples']}, teacher-forced)",
                     _drop(r.get("drop_points")), _drop(r.get("host_drop_points")), parity, "feed slots (no reload)",
                     f"{statistics.median(p['task_load_ms'] for p in tasks):.1f} ms (host decode)" if tasks else "-", r["latency_kind"]])
    return rows


def ethos_rows(data: dict) -> list[list]:
    """One row per compiled (variant, NPU, quant): Vela's estimate for one decoder layer."""
    rows = []
    for r in data["records"]:
        if not r.get("compiled"):
            continue
        switch = f"{r['task_input_bytes']:,} B fed" if r["kind"] == "switchable" else "reload"
        parity = "-" if r.get("rel_err_max") is None else f"rel err {r['rel_err_max']:.2f} vs fp32" + (
            f", LoRA effect cos >= {r['effect_cosine_min']:.2f}" if r.get("effect_cosine_min") is not None else "")
        split = f"{r.get('delegates')} delegates: no Vela figures" if r.get("estimated_ms") is None else None
        method = r["method"] if r["kind"] == "switchable" else "one task merged in (cost reference)"
        rows.append([f"ethos-u ({r['npu']})", method, r["quant"], "one decoder layer",
                     split or f"{r['flash_bytes']:,} flash", f"{r['task_input_bytes']:,}" if r["kind"] == "switchable" else "-",
                     "-", "-", "-", "-", parity, switch, "-",
                     split or f"{r['latency_kind']}: {r['estimated_ms']:.2f} ms per layer call (Vela)"])
    return rows


def main() -> None:
    rows: list[list] = []
    sources = []
    for name, build in (("arm64-cpu", arm64_rows), ("arm64-cpu-executorch", arm64_rows), ("qnn-htp", qnn_rows), ("ethos-u", ethos_rows)):
        data = _load(name)
        if data is not None:
            rows += build(data)
            if build is arm64_rows:
                with atomic_file(RESULTS / f"device_{name}.png") as png:
                    plot_target(data["records"], data["notes"])(png)
            sources.append(f"`benchmarks/results/device_{name}.json`")
    table = "\n".join(markdown_table(HEADER, rows))
    text = "\n".join([
        f"Rows from {', '.join(sources)}; written by `python benchmarks/device_table.py`. Every latency is emulated (qemu, "
        "the HTP emulator) or estimated (Vela) and is never a phone's speed; arm64-cpu and qnn-htp cover few examples per task "
        "(see each record's notes; qnn-htp: the examples whose answer fits its static step), ethos-u one decoder layer.", "", table, ""])
    with atomic_file(RESULTS / "device_table.md") as f:
        f.write_text("# Device targets: one table\n\n" + text)
    readme = ROOT / "README.md"
    with atomic_file(readme) as f:
        f.write_text(readme_block(readme.read_text(), BEGIN, END, text))
    print(table)


if __name__ == "__main__":
    main()
