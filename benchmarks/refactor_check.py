"""Fingerprints of what a pure refactor must not change: run before and after, compare the JSON.

- planted merges: every registry method on synthetic adapters with planted structure (hydraopt and
  per-task at three budgets), as the SHA-256 of each bank's tensor files;
- frontier banks: every point of the committed frontier on the embedded shared-seed adapters
  (the suite's scores are a function of the bank bytes: the answer cache is keyed by them);
- one ONNX export of a tiny Llama with a two-task bank: greedy tokens and logits on the runtime.

The analysis heatmaps are not included (the layout issue changes their definition on purpose).

    python benchmarks/refactor_check.py --out benchmarks/results/refactor_check.json
    python benchmarks/refactor_check.py --compare benchmarks/results/refactor_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/tiny_models.py: the tiny real Llama the tests use

from hydraopt_mobile.adapters import AdapterSet, build_adapter_set, load_adapter  # noqa: E402
from hydraopt_mobile.bank import MergedBank  # noqa: E402
from hydraopt_mobile.bundle import write_bundle  # noqa: E402
from hydraopt_mobile.app.frontier import banks_for, default_points  # noqa: E402
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget  # noqa: E402
from hydraopt_mobile.merge.registry import METHODS, MergeConfig, merge, merge_budgets  # noqa: E402
from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter  # noqa: E402

ADAPTERS = ROOT / "hydraopt_mobile" / "suite" / "adapters" / "shared-seed"


_BUNDLE_NUMBERS = itertools.count()


def bank_files_sha(bank, tmp: Path) -> str:
    """SHA-256 over the bank's tensor files as written (names and bytes; the manifest excluded)."""
    out = tmp / f"bundle-{next(_BUNDLE_NUMBERS)}"  # not id(bank): ids of collected banks are reused
    write_bundle(bank, out)
    h = hashlib.sha256()
    for f in sorted(out.rglob("*.safetensors")):
        h.update(str(f.relative_to(out)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def planted_banks(tmp: Path) -> Iterator[tuple[str, MergedBank | InfeasibleBudget, AdapterSet]]:
    """Every registry method on planted adapters (budgeted ones at three budgets): (label, bank, adapters)."""
    shapes = llama_shapes(2, 256, 64)
    folders = []
    for t, factors in enumerate(planted_factors(shapes, n_tasks=4, rank=8, noise=0.3, seed=0)):
        folders.append(write_peft_adapter(tmp / f"planted/task{t}", factors, rank=8, alpha=16))
    adapters = build_adapter_set([load_adapter(p) for p in folders])
    for name, method in METHODS.items():
        if method.budgeted:
            budgets = [Budget(fraction=f) for f in (0.15, 0.3, 0.52)]
            for b, bank in zip(budgets, merge_budgets(adapters, MergeConfig(name), budgets, strict=False)):
                yield f"{name}@{b.label()}", bank, adapters
        else:
            yield name, merge(adapters, MergeConfig(name)), adapters


def planted(tmp: Path) -> dict[str, str]:
    return {label: "infeasible" if isinstance(bank, InfeasibleBudget) else bank_files_sha(bank, tmp) for label, bank, _ in planted_banks(tmp)}


def frontier(tmp: Path) -> dict[str, str]:
    adapters = build_adapter_set([load_adapter(p) for p in sorted(ADAPTERS.iterdir()) if (p / "adapter_config.json").exists()])
    points = [p for p in default_points(len(adapters.tasks)) if not p.calibration]  # data-free banks only
    get = banks_for(adapters, points)
    out: dict[str, str] = {}
    for p in points:
        bank = get(p)
        key = "/".join(str(x) for x in p.key("shared-seed"))
        out[key] = "infeasible" if isinstance(bank, InfeasibleBudget) else bank_files_sha(bank, tmp)
    return out


def tiny_onnx(tmp: Path) -> dict:
    from exporters.export import export_bank
    from exporters.runtime import greedy, open_export
    from tests.tiny_models import tiny_llama, tiny_peft_adapter

    model_dir = tmp / "tiny-model"
    tiny_llama(0, layers=2).save_pretrained(str(model_dir))
    folders = [tiny_peft_adapter(tmp / f"tiny/task{t}", seed=t + 1, layers=2) for t in range(2)]
    adapters = build_adapter_set([load_adapter(p) for p in folders])
    bank = merge_budgets(adapters, MergeConfig("hydraopt"), [Budget(fraction=0.52)])[0]
    export = export_bank(bank, model_dir, "onnx", "fp32", tmp / "tiny-export")
    session = open_export(export)
    out: dict = {"bank": bank_files_sha(bank, tmp)}
    for task in session.tasks:
        session.set_task(task)
        gen = greedy(session, [1, 5, 9, 13], max_new_tokens=6, keep_logits=True)
        logits = gen.token_logits()
        out[task] = {"tokens": gen.tokens, "logits_rounded_sha": hashlib.sha256(np.round(logits, 4).tobytes()).hexdigest(),
                     "logits_abs_sum": float(np.abs(logits).sum())}
    return out


SECTIONS = {"planted": planted, "frontier_banks": frontier, "tiny_onnx": tiny_onnx}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, help="a previous run's JSON: exit 1 if anything differs")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS), help="only these (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {name: SECTIONS[name](tmp) for name in args.sections}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        before = {s: v for s, v in before.items() if s in result}
        diffs = [f"{section}/{k}" for section in before for k in before[section] if before[section][k] != result.get(section, {}).get(k)]
        added = [f"{s}/{k}" for s in result for k in result[s] if k not in before.get(s, {})]
        if added:  # a method or point added since the baseline: nothing to compare it with
            print("new (not in the baseline):\n  " + "\n  ".join(added))
        if diffs:
            print("CHANGED:\n  " + "\n  ".join(diffs))
            raise SystemExit(1)
        print(f"unchanged: {sum(len(v) for v in before.values())} fingerprints")


if __name__ == "__main__":
    main()
