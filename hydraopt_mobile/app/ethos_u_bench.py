"""``hydraopt bench ethos-u BUNDLE``: one decoder layer of the base model with a bundle's per-task
factors as switchable program inputs, compiled for Arm Ethos-U NPUs (Vela's estimate) and run on the
TOSA reference model (the NPU's integer numerics), task by task, against fp32 PyTorch.

The layer, the compile and the TOSA runs are the ``ethos-u`` target's (``exporters/targets/ethos_u_compile.py``);
this module picks the layer's input, builds the variants from a bundle and turns the target's report
into records. ``benchmarks/device_ethos_u.py`` makes its records and tables with the same functions,
so a record of the command and one of the benchmark carry the same field names.

What a record is NOT: a whole-model figure. Cycles are Vela's estimate for one layer at a fixed
number of tokens (no Corstone FVP or board here, nothing runs the ``.pte``).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

from exporters.slots import check_base_model
from exporters.targets.ethos_u import NAME, ensure_ready
from exporters.targets.ethos_u_compile import LayerVariant, bank_layer_tasks, compile_layer, layer_input, prompt_ids, switchable_variant
from exporters.targets.ethos_u_layer import LayerConfig
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.bundle import load_bundle
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.plotting import figure

from .progress import advancing, stderr_progress
from .records import markdown_table, write_record

DEFAULT_PROMPT = ("Translate the name of this country into German and answer with the name only, please: "
                  "the Republic of Armenia, a country in the South Caucasus.")
SCOPE = "one decoder layer"


def layer_prompt(tokenizer, tasks: list[str], prompt: str | None) -> tuple[str, str]:
    """The text whose last tokens feed the layer, and where it came from: ``prompt`` (chat-formatted
    when the tokenizer has a chat template), else the first task's first test prompt when it is a
    suite task (as the suite formats it), else a fixed default prompt."""
    from hydraopt_mobile.suite.tasks import TASK_NAMES, load_suite

    if prompt is None and tasks[0] in TASK_NAMES:
        from hydraopt_mobile.suite.prompts import render_prompt

        spec = load_suite([tasks[0]])[0]
        return render_prompt(tokenizer, spec, spec.test[0]), f"{tasks[0]}'s first test prompt"
    text = prompt if prompt is not None else DEFAULT_PROMPT
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text, "--prompt" if prompt is not None else "the default prompt"


def layer_case(model: torch.nn.Module, model_dir: Path, layer: int, seq: int, tasks: list[str], prompt: str | None = None) -> dict:
    """Layer ``layer`` of ``model``: its config at ``seq`` tokens, its weights, and its input for the
    last ``seq`` tokens of :func:`layer_prompt` (``text``: those tokens decoded; ``source``: which prompt)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: no tokenizer to turn the layer's prompt into tokens ({e})") from None
    text, source = layer_prompt(tokenizer, tasks, prompt)
    ids = prompt_ids(tokenizer, text, seq)
    x = layer_input(model, ids, layer)
    weights = {k: v.detach().clone() for k, v in model.model.layers[layer].state_dict().items()}
    return {"cfg": LayerConfig.from_hf(model.config, seq), "weights": weights, "x": x, "text": tokenizer.decode(ids), "source": source}


def task_input_bytes(variant: dict, quant: str) -> int | None:
    """What a switch writes: the per-task input tensors at the program's input width (1 byte at
    A8W8, 2 at A16W8); ``None`` for a merged variant (a switch is a reload of the whole program)."""
    if variant["kind"] != "switchable":
        return None
    r, cfg = variant["ranks"], variant["config"]
    per_elem = 2 if quant == "a16w8" else 1
    q_out, v_out = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    return per_elem * (r["q_proj"] * (cfg["hidden"] + q_out) + r["v_proj"] * (cfg["hidden"] + v_out))


def records_from(report: dict, outputs: dict[str, torch.Tensor], methods: dict[str, str], extra: dict | None = None) -> list[dict]:
    """One record per variant x NPU x quantisation (``methods``: variant -> merge method; ``extra``:
    fields every record gets, after the target's)."""
    recs = []
    for v in report["variants"]:
        base = {"target": NAME, "latency_kind": "estimated", "method": methods[v["variant"]], "variant": v["variant"],
                "kind": v["kind"], "npu": v["npu"], "quant": v["quant"], **(extra or {})}
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
        seq = [r["task"] for r in runs]
        if v["kind"] == "switchable" and len(set(seq)) > 1:  # the sequence ends with the first task again, then <none>
            first, back = 0, len(seq) - 1
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


def on_npu(record: dict) -> str:
    """``all``, or how many delegates and which ops stayed on the CPU."""
    return "all" if record["all_on_npu"] else f"{record['delegates']} delegates; CPU: {', '.join(_op_name(o) for o in record['cpu_ops'])}"


def markdown(records: list[dict], meta: dict,
             title: str = "Ethos-U: one SmolLM2-135M decoder layer with switchable LoRA task tensors (Vela estimate)") -> str:
    """The records as a table per variant x NPU x quant, then one row per TOSA run, after ``meta["notes"]``."""
    cols = ["variant", "method", "npu", "quant", "on NPU", "cycles", "est. ms", "SRAM bytes", "flash bytes", "task input bytes",
            "switch", "max abs err", "|fp32| max", "rel. err (max)", "LoRA effect cos (min)", "back = first"]
    rows = []
    for r in records:
        if not r["compiled"]:
            rows.append([r["variant"], r["method"], r["npu"], r["quant"], "compile failed: " + r["error"][:90].replace("|", "/").replace("\n", " ")]
                        + [""] * (len(cols) - 5))
            continue
        rows.append([r["variant"], r["method"], r["npu"], r["quant"], on_npu(r), r["cycles"], r["estimated_ms"], _n(r["sram_bytes"]),
                     _n(r["flash_bytes"]), _n(r["task_input_bytes"]),
                     r["switch"].split(" ")[0], r.get("max_abs_err"), r.get("fp32_max_abs"), r.get("rel_err_max"), r.get("effect_cosine_min"),
                     r.get("switch_back_identical", "-")])
    lines = [f"# {title}", "",
             *[f"- {n}" for n in meta["notes"]], "", *markdown_table(cols, rows), "",
             "Per task (TOSA reference model vs fp32 PyTorch, same inputs):", ""]
    per = [[r["variant"], r["npu"], r["quant"], i, run["task"], run["max_abs_err"], run["rel_err"], run.get("effect_cosine"),
            run.get("effect_fp32_norm"), run.get("effect_int_norm")]
           for r in records if r["compiled"] for i, run in enumerate(r["runs"])]
    lines += markdown_table(["variant", "npu", "quant", "run", "task", "max abs err", "rel. err", "LoRA effect cos", "|effect| fp32", "|effect| NPU"], per)
    return "\n".join(lines + [""])


def plot(records: list[dict], seq: int) -> Callable[[Path], None]:
    """Cycles per variant (log scale) and the LoRA effect's cosine, for the all-on-NPU records."""
    def draw(path: Path) -> None:
        ok = [r for r in records if r["compiled"] and r["all_on_npu"]]
        sw = [r for r in ok if r.get("effect_cosine_min") is not None]
        with figure(path, 2, figsize=(12, 4.5)) as (fig, axes):
            for ax, rs, values in ((axes[0], ok, [r["cycles"] / 1e6 for r in ok]), (axes[1], sw, [r["effect_cosine_min"] for r in sw])):
                ax.bar(range(len(rs)), values, color=["C0" if "u55" in r["npu"] else "C1" for r in rs])
                ax.set_xticks(range(len(rs)), [f"{r['variant']}\n{r['npu'].replace('ethos-', '')} {r['quant']}" for r in rs], rotation=70, fontsize=7)
            axes[0].set_ylabel(f"Vela estimate, million cycles (one layer, {seq} tokens)")
            axes[0].set_yscale("log")
            axes[1].set_ylabel("LoRA effect cosine vs fp32 (min over tasks; switchable)")
            fig.suptitle("Ethos-U (estimated; one decoder layer; all ops on the NPU only)")

    return draw


def _choices(values: list[str] | None, allowed: tuple[str, ...], default: tuple[str, ...], option: str) -> tuple[str, ...]:
    if not values:
        return default
    if wrong := [v for v in values if v not in allowed]:
        raise UserError(f"{option} {', '.join(wrong)}: not one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def bundle_variants(bank: MergedBank, bundle: Path, layer: int, tasks: list[str], merged_reference: bool) -> list[LayerVariant]:
    """The bundle's factors of ``layer`` as switchable inputs (named after its method) and, with
    ``merged_reference``, its first task folded into the weights (the cost reference: a switch is a reload)."""
    try:
        variants = [switchable_variant(bank.method, bank, layer, tasks)]
        if merged_reference:
            variants.append(LayerVariant("merged", bank.method, "merged", bank_layer_tasks(bank, layer, tasks[:1])))
    except UserError as e:
        raise UserError(f"{bundle}: {e}") from None
    return variants


def bench_ethos_u(bundle: Path, model_dir: Path | None = None, tasks: list[str] | None = None, npus: list[str] | None = None,
                  quants: list[str] | None = None, layer: int = 0, seq: int = 16, prompt: str | None = None,
                  merged_reference: bool = False, threads: int = 1) -> tuple[list[dict], dict]:
    """Records (one per variant x NPU x quant, fields as in ``device_ethos-u.json`` plus ``bundle``,
    ``layer``, ``tokens`` and ``scope``) and the run's meta (notes included)."""
    from exporters.targets.ethos_u import NPUS, QUANTS

    t0 = time.perf_counter()
    npus_, quants_ = _choices(npus, NPUS, NPUS, "--npu"), _choices(quants, QUANTS, ("a8w8",), "--quant")
    if seq < 2:
        raise UserError(f"--tokens {seq}: the layer needs at least 2 tokens")
    bundle = Path(bundle)
    bank = load_bundle(bundle)
    tasks = list(dict.fromkeys(tasks or bank.tasks))
    if missing := [t for t in tasks if t not in bank.tasks]:
        raise UserError(f"--task {', '.join(missing)}: not in {bundle} (tasks: {', '.join(bank.tasks)})")
    ensure_ready()  # before the model is loaded: the reason and the set-up command
    if model_dir is None:
        from hydraopt_mobile.suite.model import base_model_dir

        model_dir = base_model_dir()
    torch.set_num_threads(threads)
    model = load_causal_lm(Path(model_dir))
    try:
        check_base_model(bank, model)
    except UserError as e:
        raise UserError(f"{bundle}: {e} (base model: {model_dir})") from None
    case = layer_case(model, Path(model_dir), layer, seq, tasks, prompt)
    del model
    variants = bundle_variants(bank, bundle, layer, tasks, merged_reference)
    with stderr_progress() as bar:
        job = bar.add_task(f"layer {layer} for {', '.join(npus_)}: compiles", total=None)
        report, outputs = compile_layer(case["weights"], case["x"], case["cfg"], variants, npus_, quants_, threads=threads,
                                        on_step=advancing(bar, job))
    extra = {"bundle": str(bundle), "layer": layer, "tokens": seq, "scope": SCOPE}
    records = records_from(report, outputs, {v.name: v.method for v in variants}, extra)
    meta = {
        "machine": f"{platform.machine()}, {threads} torch thread(s)", "executorch": importlib.metadata.version("executorch"),
        "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1), "bundle": str(bundle), "method": bank.method,
        "base_model": str(model_dir), "layer": layer, "config": report["config"], "tasks_run": list(variants[0].sequence),
        "layer_input": f"the input of layer {layer} (base model, no task) for the last {seq} tokens of {case['source']}: {case['text']!r}",
        "log": report["log"],
        "notes": [
            f"ONE decoder layer (layer {layer} of {model_dir}) at its real width, {seq} tokens, batch 1: NOT a whole-model figure; "
            "cycles and ms are Vela's ESTIMATE (latency_kind estimated): no Corstone FVP or board here, nothing ran the .pte.",
            "Numerics: the lowered TOSA graph run by the TOSA reference model (the NPU's integer arithmetic) against the same "
            "layer in fp32 PyTorch; the LoRA effect is output(task) - output(no task).",
            f"Task tensors of '{bank.method}' are program INPUTS (the task's q_proj and v_proj A, B from {bundle}), quantised "
            "with one encoding calibrated over every task run: a switch feeds other tensors, the program stays loaded."
            + (f" 'merged' folds {tasks[0]} into W_q, W_v (the cost reference; its switch is a program reload)." if merged_reference else ""),
        ]}
    return records, meta


def summary_lines(records: list[dict], meta: dict) -> list[str]:
    """What the command prints without ``--json``: the scope, then per record Vela's figures and per task the parity."""
    lines = [f"ethos-u: {meta['notes'][0]}"]
    for r in records:
        head = f"{r['variant']} ({r['method']}, {r['kind']}) {r['npu']} {r['quant']}"
        if not r["compiled"]:
            lines.append(f"{head}: compile failed: {r['error'][:300]}")
            continue
        if r["cycles"] is None:
            lines.append(f"{head}: {on_npu(r)}: no Vela figures")
        else:
            lines.append(f"{head}: {r['cycles']:,} cycles (estimated {r['estimated_ms']} ms at {r['clock_mhz']:g} MHz), SRAM {_n(r['sram_bytes'])} B, "
                         f"flash {_n(r['flash_bytes'])} B, on NPU: {on_npu(r)}, switch: {r['switch']}"
                         + (f", {_n(r['task_input_bytes'])} B per task" if r["task_input_bytes"] else ""))
        for run in r["runs"]:
            cos = run.get("effect_cosine")
            lines.append(f"  {run['task']}: max abs err {run['max_abs_err']:.4g} (|fp32| max {run['fp32_max_abs']:.4g}), rel. err {run['rel_err']:.4g}"
                         + ("" if cos is None else f", LoRA effect cosine {cos:.4f}"))
        if "switch_back_identical" in r:
            lines.append(f"  back to {r['runs'][0]['task']}: bit-identical {r['switch_back_identical']}; tasks differ {r['tasks_differ']}")
    return lines


def write_reports(records: list[dict], meta: dict, path: Path) -> None:
    """``path`` (JSON: meta + records), ``path.md`` and ``path.png`` (:func:`plot`)."""
    write_record(path, {"meta": meta, "records": records}, markdown(records, meta, f"ethos-u: {SCOPE} with the tasks of {meta['bundle']} (Vela estimate)"),
                 plot(records, next((r["tokens"] for r in records), 0)))  # every record carries the layer's token count
