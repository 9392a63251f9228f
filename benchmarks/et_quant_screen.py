"""Cheap screen of the ExecuTorch ``--quant`` recipes in eager PyTorch: the measurement behind
``8da4w-mixed`` (exporters/et_recipes.py: RECIPES).

    python benchmarks/et_quant_screen.py [--per-task 2] [--recipes fp32,8da8w,8da4w,...]

A rerun with other ``--recipes`` adds them to the record (rows of the same examples are kept).

Each recipe is applied by the exporter's own ``quantize`` (torchao ``quantize_``, the same configs
that are then lowered to XNNPACK) to a fresh copy of the real base model, which is run
teacher-forced on train-split examples of every suite task (prompt + target; never test), batch
as in benchmarks/quant_sensitivity.py. Per recipe: mean KL divergence of the next-token
distributions at the target positions from fp32's, the share of target tokens that are still the
argmax (``top1``), and an estimate of the program's bytes from parameter counts (4-bit: half a byte
+ a bf16 scale per 32 weights, as the XNNPACK delegate stores them; 8-bit: a byte + an fp32 scale per
output channel; the embedding and everything else fp32), to be checked on the lowered file. No
lowering here: an XNNPACK lowering of the real model takes 20-40 minutes on 2 cores.
Writes benchmarks/results/et_quant_screen.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import RESULTS_DIR  # first: it puts this checkout on sys.path

from benchmarks.quant_sensitivity import model_and_batch, target_log_probs
from exporters.et_recipes import GROUP_SIZE, RECIPES
from exporters.executorch_backend import quantize
from hydraopt_mobile.app.records import markdown_table, write_record

RESULTS = RESULTS_DIR / "et_quant_screen.json"


def estimated_bytes(model: torch.nn.Module, quant: str) -> int:
    """Program bytes of ``model`` (fp32, untouched) under ``quant`` from parameter counts (module
    docstring); the tied embedding counts once for the embedding and once for the head, as the
    ``.pte`` stores it (FIELD_NOTES)."""
    recipe = RECIPES[quant]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    in_linears = {id(m.weight) for n, m in linears.items() if n != "lm_head"}
    total = sum(4 * p.numel() for p in model.parameters() if id(p) not in in_linears)  # embedding, norms
    for name, m in linears.items():
        bits = recipe.bits_of(name)
        if bits == 4 and m.in_features % GROUP_SIZE:
            bits = 32
        n = m.weight.numel()
        total += {32: 4 * n, 8: n + 4 * m.out_features, 4: n // 2 + 2 * n // GROUP_SIZE}[bits]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=2, help="train examples per task")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated ExecuTorch --quant names")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    base, batch, reference = model_and_batch(args.per_task)
    ids, _, tmask = batch
    targets = ids[:, 1:][tmask[:, :-1]]  # the token each target position predicts
    # rows of other recipes already in the record on the same examples are kept: a rerun adds recipes
    old = json.loads(args.results.read_text()) if args.results.is_file() else {"notes": {}, "recipes": []}
    examples = f"{args.per_task} train-split examples per suite task ({ids.shape[0]} sequences, {int(tmask.sum())} target tokens), teacher-forced"
    keep = old["notes"].get("examples") == examples
    rows = [r for r in old["recipes"] if keep and r["quant"] not in args.recipes.split(",")]
    for quant in args.recipes.split(","):
        t0 = time.time()
        model = copy.deepcopy(base)
        quantize(model, quant)
        got = target_log_probs(model, batch)
        rows.append({
            "quant": quant, "bits": RECIPES[quant].bits, "int8_modules": list(RECIPES[quant].int8_modules),
            "kl": float((reference.exp() * (reference - got)).sum(-1).mean()),
            "top1_vs_fp32": float((got.argmax(-1) == reference.argmax(-1)).float().mean()),
            "target_top1": float((got.argmax(-1) == targets).float().mean()),
            "target_nll": float(-got.gather(1, targets[:, None]).mean()),
            "estimated_bytes": estimated_bytes(base, quant), "seconds": round(time.time() - t0, 1),
        })
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: list(RECIPES).index(r["quant"]))
    fp32 = next((r["estimated_bytes"] for r in rows if r["quant"] == "fp32"), estimated_bytes(base, "fp32"))
    for r in rows:
        r["estimated_bytes_ratio"] = r["estimated_bytes"] / fp32
    notes = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), base weights, no adapter",
        "examples": examples,
        "quantisation": "exporters/executorch_backend.py quantize (torchao quantize_, eager; int8 dynamic per-token activations simulated)",
        "kl": "mean KL(fp32 || recipe) of next-token distributions at target positions",
        "top1_vs_fp32": "share of target positions whose argmax equals fp32's",
        "target_top1 / target_nll": "argmax accuracy and mean NLL of the reference answer's tokens",
        "estimated_bytes": "parameter counts x bits (module docstring); ratio against fp32 with the embedding stored twice",
        "threads": 1,
    }
    md = ["# ExecuTorch --quant recipes, eager screen (SmolLM2-135M)", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
    md += markdown_table(
        ["quant", "8-bit modules", "KL", "top-1 = fp32", "target top-1", "target NLL", "est. MB", "est. bytes / fp32"],
        [[r["quant"], ", ".join(r["int8_modules"]) or "-", r["kl"], r["top1_vs_fp32"], r["target_top1"], r["target_nll"],
          f"{r['estimated_bytes'] / 1e6:.1f}", r["estimated_bytes_ratio"]] for r in rows],
        "llrrrrrr",
    )
    write_record(args.results, {"notes": notes, "recipes": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
