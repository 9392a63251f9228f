"""APK bytes of the Android demo with the demo bank's ONNX export inside, per method.

    python benchmarks/android_apk.py [--quant int4] [--threads 1] [--out benchmarks/results/android_apk.json]
    python benchmarks/android_apk.py --tiny        # a tiny random model instead (seconds; says so)

Demo bank: the committed shared-seed adapters of the suite's 12 tasks, merged as ``hydraopt demo``
does (HydraOpt at 1/T of the fp16 file bytes, and one adapter per task, method ``none``), each
exported with ``hydraopt export --format onnx --quant QUANT`` (cached like the demo's exports).
Records: ``apk_bytes`` (APK with the HydraOpt export in its assets, as build.sh makes by default),
``apk_bytes_without_export``, ``export_quant``, per method ``resident_bytes`` (program + the bank's shared file)
and ``task_bytes`` (each task file and their total), and ``build_seconds`` (build.sh's own clock;
tools already cached). ``load_note`` says what else ran on the machine during the build.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT

BUILD_SH = ROOT / "android_demo" / "build.sh"


def demo_exports(quant: str, threads: int) -> dict[str, Path]:
    import torch
    from rich.console import Console

    from hydraopt_mobile.adapters import build_adapter_set, load_adapter
    from hydraopt_mobile.app.demo_adapters import ensure_adapters
    from hydraopt_mobile.app.export_cache import cached_export
    from hydraopt_mobile.suite.tasks import TASK_NAMES
    from hydraopt_mobile.suite.train_config import TrainConfig
    from hydraopt_mobile.merge.budget import Budget
    from hydraopt_mobile.merge.registry import MergeConfig, merge
    from hydraopt_mobile.suite.model import base_model_dir

    torch.set_num_threads(threads)
    console = Console()
    folders = ensure_adapters(TrainConfig(), list(TASK_NAMES), console)
    adapters = build_adapter_set([load_adapter(p, t) for t, p in folders.items()])
    budget = Budget(fraction=round(1 / len(adapters.tasks), 4))
    banks = {"hydraopt": merge(adapters, MergeConfig("hydraopt", budget=budget)), "one-adapter-per-task": merge(adapters, MergeConfig("none"))}
    model_dir = base_model_dir()
    return {label: cached_export(bank, model_dir, "onnx", quant, console) for label, bank in banks.items()}


def tiny_exports(quant: str, root: Path) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_bank, make_tiny_model

    from exporters.export import export_bank
    from hydraopt_mobile.bank import MergedBank
    from hydraopt_mobile.suite.model import MODEL_ID, cache_root

    model = make_tiny_model(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = cache_root() / "models" / MODEL_ID / name
        if src.is_file():
            (model / name).write_bytes(src.read_bytes())
    bank = make_bank()
    per_task = MergedBank(bank.tasks, {n: m for n, m in bank.modules.items() if n.endswith("o_proj")}, "none")
    return {label: export_bank(b, model, "onnx", quant, root / label, max_cache_len=64) for label, b in (("hydraopt", bank), ("one-adapter-per-task", per_task))}


def build(args: list[str]) -> dict:
    r = subprocess.run(["bash", str(BUILD_SH), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"build.sh failed:\n{r.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "build.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quant", default="int4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (for a quick check)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "android_apk.json")
    a = p.parse_args()
    from exporters.manifest import Manifest

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        exports = tiny_exports(a.quant, Path(tmp)) if a.tiny else demo_exports(a.quant, a.threads)
        export_seconds = time.perf_counter() - t0
        subprocess.run(["bash", str(BUILD_SH), "tools"], check=True, capture_output=True)  # tools cached before timing
        load_before = os.getloadavg()
        bare = build(["--no-export", "--out", f"{tmp}/bare"])
        full = build(["--export", str(exports["hydraopt"]), "--out", f"{tmp}/full"])
        load_after = os.getloadavg()
        methods = {}
        for label, folder in exports.items():
            m = Manifest.read(folder)
            methods[label] = {
                "method": m.method,
                "export_id": m.export_id,
                "resident_bytes": m.resident_bytes(),
                "task_bytes": {t: m.task_file(t).bytes for t in m.tasks},
                "task_bytes_total": m.bytes_of("task"),
                "device_bytes": m.resident_bytes() + m.bytes_of("task"),
                "export_folder_bytes": sum(f.bytes for f in m.files),
            }
    record = {
        "model": "tiny random Llama (2 layers, hidden 64; not SmolLM2)" if a.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), demo bank: committed shared-seed adapters, 12 tasks",
        "export_quant": a.quant,
        "apk_bytes": full["apk_bytes"],
        "apk_bytes_without_export": bare["apk_bytes"],
        "apk_export": "hydraopt",
        "methods": methods,
        "build_seconds": full["build_seconds"],
        "build_seconds_without_export": bare["build_seconds"],
        "export_seconds": round(export_seconds, 1),  # merge + export; near 0 when the exports were cached
        "ort_version": full["ort_version"],
        "abis": full["abis"],
        "threads": a.threads,
        "load_note": f"1-minute load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the builds on {os.cpu_count()} cores"
                     + (" (other jobs running: contended timings)" if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else ""),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "methods"}, indent=1))
    for label, m in methods.items():
        print(f"{label}: resident {m['resident_bytes']:,} B, task files {m['task_bytes_total']:,} B in all")


if __name__ == "__main__":
    main()
