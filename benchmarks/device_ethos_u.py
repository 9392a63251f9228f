"""Ethos-U55 / Ethos-U85: one SmolLM2-135M decoder layer with switchable LoRA task tensors, compiled
by ExecuTorch's Arm backend + Vela, run on the TOSA reference model.

Variants (layer 0 at its real width 576 / 1536, 9 heads / 3 kv heads, 16 tokens):
- ``hydraopt-1T``: the committed suite adapters (12 tasks) merged by HydraOpt at 1/T of the fp16
  file bytes; layer 0's per-task factors of q_proj and v_proj are runtime inputs;
- ``none``: one adapter per task (method ``none``), the task's own rank-8 factors as inputs;
- ``merged``: one task (``none``'s first task) folded into W_q and W_v: the cost reference.
Each is PT2E-quantised A8W8 and A16W8 (16-bit activations, 8-bit weights), calibrated on the layer's
input with every task's factors and with none (so one fixed encoding of the task inputs serves
every task), compiled for ethos-u55-128 and ethos-u85-256. A switchable variant is run for
``TASKS`` in order, then back to the first, then with zero factors (the base layer); parity is
against the same module in fp32 PyTorch: max abs error, and the cosine of the LoRA effect
``output(task) - output(no task)``.

Latency is Vela's estimate for one layer (``latency_kind "estimated"``): no Corstone FVP is
obtainable here, nothing runs the .pte. No whole-model claim.

    python benchmarks/device_ethos_u.py          # ~30-60 min on 2 shared cores

Writes benchmarks/results/device_ethos-u.{json,md,png}. The layer's input, the records and the tables
come from ``hydraopt_mobile/app/ethos_u_bench.py``, which ``hydraopt bench ethos-u BUNDLE`` also uses
(``benchmarks/ethos_u_cli_check.py`` shows the command giving this benchmark's record).
"""

from __future__ import annotations

import argparse
import json
import importlib.metadata
import platform
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

import exporters.targets.registry  # noqa: F401  (first: it imports every target module)
from exporters.targets.ethos_u import NPUS, QUANTS
from exporters.targets.ethos_u_compile import LayerVariant, compile_layer, switchable_variant
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.ethos_u_bench import layer_case, markdown, plot, records_from
from hydraopt_mobile.app.records import write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.model import base_model_dir

RESULTS = RESULTS_DIR / "device_ethos-u.json"
ADAPTERS = SUITE_ADAPTERS / "shared-seed"
TASKS = ("country-de", "topic-en", "currency-es")
LAYER, SEQ = 0, 16


def build_case() -> dict:
    """Layer 0 of the packaged model, its input, and the three variants' task factors (HydraOpt at
    1/T and method none merged from the committed suite adapters)."""
    model_dir = base_model_dir()
    model = load_causal_lm(model_dir)
    case = layer_case(model, model_dir, LAYER, SEQ, list(TASKS))
    del model
    adapters = load_adapter_folders(ADAPTERS)
    hydra = merge(adapters, MergeConfig(method="hydraopt", budget=Budget(fraction=1 / len(adapters.task_names))))
    none = merge(adapters, MergeConfig(method="none"))
    hydra_variant, none_variant = switchable_variant("hydraopt-1T", hydra, LAYER, list(TASKS)), switchable_variant("none", none, LAYER, list(TASKS))
    layouts = {s: list(hydra.modules[f"model.layers.{LAYER}.self_attn.{s}"].layout) for s in ("q_proj", "v_proj")}
    variants = [hydra_variant, none_variant, LayerVariant("merged", "none", "merged", {TASKS[0]: none_variant.tasks[TASKS[0]]})]
    return {**case, "variants": variants, "hydra": hydra, "seq": hydra_variant.sequence, "layouts": layouts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the job (TOSA, Vela output, .pte files) here")
    ap.add_argument("--npus", default=",".join(NPUS))
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--reuse", action="store_true", help="make the records from the finished job in --workdir (no compiling)")
    args = ap.parse_args()
    if args.reuse and (args.workdir is None or not (args.workdir / "report.json").is_file()):
        ap.error("--reuse needs --workdir with a finished job (report.json)")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    case = build_case()
    cfg, x, weights, variants, hydra, text, seq, layouts = (case[k] for k in ("cfg", "x", "weights", "variants", "hydra", "text", "seq", "layouts"))
    if args.reuse:  # the job in --workdir ran to its end (report.json written): only the records are made again
        from safetensors.torch import load_file

        report = json.loads((args.workdir / "report.json").read_text())
        report["log"] = [f"reused the finished job in {args.workdir}"]
        outputs = load_file(args.workdir / "outputs.safetensors")
    else:
        report, outputs = compile_layer(weights, x, cfg, variants, tuple(args.npus.split(",")), tuple(args.quants.split(",")),
                                        workdir=args.workdir, timeout_s=6 * 3600)
    meta = {
        "machine": f"{platform.machine()}, 1 torch thread", "executorch": importlib.metadata.version("executorch"),
        "torch": torch.__version__, "wall_s": None if args.reuse else round(time.perf_counter() - t0, 1), "reused_job": args.reuse, "layer": LAYER, "config": report["config"],
        "layer_input": f"token embeddings of the last {SEQ} tokens of {TASKS[0]}'s first test prompt: {text!r}",
        "tasks_run": list(seq), "hydraopt_storage_fraction": round(hydra.storage_fraction(), 4),
        "hydraopt_layer0_layouts_kA_kB": layouts, "log": report["log"],
        "notes": [
            "ONE decoder layer (layer 0 of SmolLM2-135M-Instruct, Q4_1 GGUF dequantised) at its real width, 16 tokens, batch 1: "
            "NOT a whole-model figure; cycles and ms are Vela's ESTIMATE (latency_kind estimated): no Corstone FVP or board here, "
            "nothing ran the .pte.",
            "Numerics: the lowered TOSA graph run by the TOSA reference model (the NPU's integer arithmetic); the CPU-side "
            "quantise/dequantise of the program's inputs and output are applied with the program's own scales.",
            "Task tensors of switchable variants are program INPUTS (q_proj and v_proj A, B of the task), quantised per tensor "
            "with one encoding calibrated over every task: a switch feeds other tensors, the program stays loaded. 'merged' folds "
            f"{TASKS[0]} into W_q, W_v (the cost reference; switching it means loading another program).",
            f"HydraOpt at 1/T ({hydra.storage_fraction():.4f} of the fp16 file bytes): layer 0 q_proj/v_proj layouts (k_A, k_B) "
            f"{layouts}; its per-task factors have rank {report['variants'][0].get('ranks', '?')} vs rank 8 for one-adapter-per-task.",
            "SRAM/flash: Vela's 'memory used' per area (system config and memory mode are ExecuTorch's defaults for the NPU: "
            "U55 Shared_Sram with weights in off-chip flash; U85 Sram_Only, where Vela moves the constants to on-chip flash "
            "with SRAM's characteristics). A switch of a switchable variant writes 'task input bytes' (the task's A, B at the "
            "program's input width); a merged variant's switch is a reload of its whole program (pte_bytes).",
            "U55 A16W8: Vela refuses the switchable program (TOSA reader: an output tensor without writer) and leaves the int16 x "
            "int16 attention matmuls (aten.bmm) of the merged one on the CPU: no U55 figure at A16W8. U55 A8W8 runs the "
            "runtime-input LoRA matmuls on the NPU, so no per-task constant program was needed there.",
        ]}
    records = records_from(report, outputs, {v.name: v.method for v in variants})
    write_record(args.out, {"meta": meta, "records": records}, markdown(records, meta), plot(records, SEQ))
    print(markdown(records, meta))


if __name__ == "__main__":
    main()
