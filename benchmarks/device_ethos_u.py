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

Writes benchmarks/results/device_ethos-u.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import importlib.metadata
import platform
import re
import time
from pathlib import Path

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

import exporters.targets.registry  # noqa: F401  (first: it imports every target module)
from exporters.targets.ethos_u import NAME, NPUS, QUANTS, LayerVariant, bank_layer_tasks, compile_layer
from exporters.targets.ethos_u_layer import LayerConfig
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.model import base_model_dir
from hydraopt_mobile.suite.prompts import render_prompt
from hydraopt_mobile.suite.tasks import load_suite

RESULTS = RESULTS_DIR / "device_ethos-u.json"
ADAPTERS = SUITE_ADAPTERS / "shared-seed"
TASKS = ("country-de", "topic-en", "currency-es")
LAYER, SEQ = 0, 16


def layer_input(model, model_dir: Path, task: str) -> tuple[torch.Tensor, str]:
    """The layer-0 input of a real prompt: the token embeddings of the last ``SEQ`` tokens of the
    chat-formatted first test example of ``task`` (given positions 0..SEQ-1)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    spec = load_suite([task])[0]
    ids = tok(render_prompt(tok, spec, spec.test[0]), add_special_tokens=False).input_ids[-SEQ:]
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids)).float(), tok.decode(ids)


def task_input_bytes(variant: dict, quant: str) -> int | None:
    """What a switch writes: the per-task input tensors at the program's input width (1 byte at
    A8W8, 2 at A16W8); ``None`` for a merged variant (a switch is a reload of the whole program)."""
    if variant["kind"] != "switchable":
        return None
    r, cfg = variant["ranks"], variant["config"]
    per_elem = 2 if quant == "a16w8" else 1
    q_out, v_out = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    return per_elem * (r["q_proj"] * (cfg["hidden"] + q_out) + r["v_proj"] * (cfg["hidden"] + v_out))


def records_from(report: dict, outputs: dict[str, torch.Tensor], methods: dict[str, str]) -> list[dict]:
    """One record per variant x NPU x quantisation (``methods``: variant -> merge method)."""
    recs = []
    for v in report["variants"]:
        base = {"target": NAME, "latency_kind": "estimated", "method": methods[v["variant"]], "variant": v["variant"],
                "kind": v["kind"], "npu": v["npu"], "quant": v["quant"]}
        if "error" in v:
            recs.append({**base, "compiled": False, "error": v["error"]})
            continue
        if v["delegates"] != 1:  # the NPU got several pieces: Vela's files hold only the last one's figures
            v["vela"] = None
        vela = v["vela"] or dict.fromkeys(("cycles", "cycles_npu", "clock_hz", "inference_s", "sram_bytes", "flash_bytes", "dram_bytes",
                                           "weights_bytes", "weights_area", "system_config", "memory_mode"))
        rec = {**base, "compiled": True, "delegates": v["delegates"], "cpu_ops": v["cpu_ops"],
               "all_on_npu": v["delegates"] == 1 and not v["cpu_ops"], "cycles": vela["cycles"], "cycles_npu": vela["cycles_npu"],
               "clock_mhz": vela["clock_hz"] and vela["clock_hz"] / 1e6,
               "estimated_ms": vela["inference_s"] and round(vela["inference_s"] * 1e3, 4),
               "sram_bytes": vela["sram_bytes"], "flash_bytes": vela["flash_bytes"], "dram_bytes": vela["dram_bytes"],
               "npu_weights_bytes": vela["weights_bytes"], "weights_area": vela["weights_area"], "system_config": vela["system_config"],
               "memory_mode": vela["memory_mode"], "pte_bytes": v["pte_bytes"], "compile_s": v["compile_s"],
               "ranks": v["ranks"], "task_input_bytes": task_input_bytes({**v, "config": report["config"]}, v["quant"]),
               "switch": "inputs (fed per call)" if v["kind"] == "switchable" else "reload (one constant program per task)",
               "runs": v["runs"]}
        key = f"{v['variant']}/{v['npu']}/{v['quant']}"
        for i, run in enumerate(v["runs"]):  # the error relative to the output's norm: a few large residual-stream values set the max
            got, ref = outputs[f"{key}/{i}/{run['task']}"], outputs[f"{v['variant']}/fp32/{run['task']}"]
            run["rel_err"] = float((got - ref).norm() / ref.norm())
        runs = [r for r in v["runs"] if r["task"] != "<none>"]
        if runs:
            rec["max_abs_err"] = max(r["max_abs_err"] for r in runs)
            rec["fp32_max_abs"] = max(r["fp32_max_abs"] for r in runs)
            rec["rel_err_max"] = max(r["rel_err"] for r in runs)
            cos = [r["effect_cosine"] for r in runs if "effect_cosine" in r]
            rec["effect_cosine_min"] = min(cos) if cos else None
        if v["kind"] == "switchable" and v["runs"]:
            seq = [r["task"] for r in v["runs"]]
            first, back = 0, len(seq) - 2  # the sequence ends with the first task again, then <none>
            rec["switch_back_identical"] = bool(torch.equal(outputs[f"{key}/{first}/{seq[first]}"], outputs[f"{key}/{back}/{seq[back]}"]))
            rec["tasks_differ"] = bool(not torch.equal(outputs[f"{key}/0/{seq[0]}"], outputs[f"{key}/1/{seq[1]}"]))
        recs.append(rec)
    return recs


def _op_name(op: str) -> str:
    """``aten.bmm`` from ``<EdgeOpOverload: aten.bmm.default>: schema = ...``."""
    found = re.search(r"(aten|quantized_decomposed)\.\w+", op)
    return found.group(0) if found else op[:40]


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def markdown(records: list[dict], meta: dict) -> str:
    cols = ["variant", "method", "npu", "quant", "on NPU", "cycles", "est. ms", "SRAM bytes", "flash bytes", "task input bytes",
            "switch", "max abs err", "|fp32| max", "rel. err (max)", "LoRA effect cos (min)", "back = first"]
    rows = []
    for r in records:
        if not r["compiled"]:
            rows.append([r["variant"], r["method"], r["npu"], r["quant"], "compile failed: " + r["error"][:90].replace("|", "/").replace("\n", " ")]
                        + [""] * (len(cols) - 5))
            continue
        on = "all" if r["all_on_npu"] else f"{r['delegates']} delegates; CPU: {', '.join(_op_name(o) for o in r['cpu_ops'])}"
        rows.append([r["variant"], r["method"], r["npu"], r["quant"], on, r["cycles"], r["estimated_ms"], _n(r["sram_bytes"]),
                     _n(r["flash_bytes"]), _n(r["task_input_bytes"]),
                     r["switch"].split(" ")[0], r.get("max_abs_err"), r.get("fp32_max_abs"), r.get("rel_err_max"), r.get("effect_cosine_min"),
                     r.get("switch_back_identical", "-")])
    lines = ["# Ethos-U: one SmolLM2-135M decoder layer with switchable LoRA task tensors (Vela estimate)", "",
             *[f"- {n}" for n in meta["notes"]], "", *markdown_table(cols, rows), "",
             "Per task (TOSA reference model vs fp32 PyTorch, same inputs):", ""]
    per = [[r["variant"], r["npu"], r["quant"], i, run["task"], run["max_abs_err"], run["rel_err"], run.get("effect_cosine"),
            run.get("effect_fp32_norm"), run.get("effect_int_norm")]
           for r in records if r["compiled"] for i, run in enumerate(r["runs"])]
    lines += markdown_table(["variant", "npu", "quant", "run", "task", "max abs err", "rel. err", "LoRA effect cos", "|effect| fp32", "|effect| NPU"], per)
    return "\n".join(lines + [""])


def plot(records: list[dict]):
    def draw(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in records if r["compiled"] and r["all_on_npu"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [f"{r['variant']}\n{r['npu'].replace('ethos-', '')} {r['quant']}" for r in ok]
        axes[0].bar(range(len(ok)), [r["cycles"] / 1e6 for r in ok], color=["C0" if "u55" in r["npu"] else "C1" for r in ok])
        axes[0].set_ylabel("Vela estimate, million cycles (one layer, 16 tokens)")
        axes[0].set_yscale("log")
        sw = [r for r in ok if r.get("effect_cosine_min") is not None]
        axes[1].bar(range(len(sw)), [r["effect_cosine_min"] for r in sw], color=["C0" if "u55" in r["npu"] else "C1" for r in sw])
        axes[1].set_ylabel("LoRA effect cosine vs fp32 (min over tasks; switchable)")
        axes[0].set_xticks(range(len(ok)), labels, rotation=70, fontsize=7)
        axes[1].set_xticks(range(len(sw)), [f"{r['variant']}\n{r['npu'].replace('ethos-', '')} {r['quant']}" for r in sw], rotation=70, fontsize=7)
        fig.suptitle("Ethos-U (estimated; one decoder layer; all ops on the NPU only)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return draw


def build_case() -> dict:
    """Layer 0 of the packaged model, its input, and the three variants' task factors (HydraOpt at
    1/T and method none merged from the committed suite adapters)."""
    model_dir = base_model_dir()
    model = load_causal_lm(model_dir)
    cfg = LayerConfig.from_hf(model.config, SEQ)
    weights = {k: v.detach().clone() for k, v in model.model.layers[LAYER].state_dict().items()}
    x, text = layer_input(model, model_dir, TASKS[0])
    del model
    adapters = load_adapter_folders(ADAPTERS)
    hydra = merge(adapters, MergeConfig(method="hydraopt", budget=Budget(fraction=1 / len(adapters.task_names))))
    none = merge(adapters, MergeConfig(method="none"))
    seq = (*TASKS, TASKS[0])
    hydra_tasks, none_tasks = bank_layer_tasks(hydra, LAYER, list(TASKS)), bank_layer_tasks(none, LAYER, list(TASKS))
    layouts = {s: list(hydra.modules[f"model.layers.{LAYER}.self_attn.{s}"].layout) for s in ("q_proj", "v_proj")}
    variants = [LayerVariant("hydraopt-1T", "hydraopt", "switchable", hydra_tasks, seq),
                LayerVariant("none", "none", "switchable", none_tasks, seq),
                LayerVariant("merged", "none", "merged", {TASKS[0]: none_tasks[TASKS[0]]})]
    return {"cfg": cfg, "x": x, "weights": weights, "variants": variants, "hydra": hydra, "text": text, "seq": seq, "layouts": layouts}


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
    write_record(args.out, {"meta": meta, "records": records}, markdown(records, meta), plot(records))
    print(markdown(records, meta))


if __name__ == "__main__":
    main()
