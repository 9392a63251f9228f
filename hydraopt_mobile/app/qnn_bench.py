"""``hydraopt bench qnn-htp``: task scores of ONNX exports on the emulated Hexagon NPU (QNN's HTP backend),
the whole model, every node on HTP (CPU fallback disabled: the session only opens if so), optionally one
offline context binary per htp_arch.

Per export, quant and task: teacher-forced scores from HTP's own outputs. Each example (the first
``examples`` test examples of the task whose prompt and answer fit the static shapes) is split: the
prompt but its last token is prefilled by the fp32 export on the CPU execution provider (host, labelled),
left-padded into the static ``past`` cache (keys moved by RoPE, padding masked through the graph's
``attention_bias`` input); the prompt's last token and the answer run as one static ``seq`` step on HTP,
so the prediction of every answer token (and of the end-of-turn token) comes from the NPU. Exact (100)
when each is the argmax. The same examples are scored on the fp32 export (host CPU EP, unpadded cache):
``score_host``. Averaged records carry ``drop_points`` (each bank vs one-adapter-per-task, method
``none``, on HTP) and ``host_drop_points`` (the same on the host's fp32 export) with 95 % paired
bootstrap intervals, plus parity (max logit error, top-1 agreement on the answer rows), the LoRA
effect's cosine, task bytes and task load time. One HTP step takes a minute or more on the emulator at
real width, so examples run round robin over the tasks and stop at ``minutes`` (checkpointed per
example; the record says how many ran).

Why not the device-runner protocol (``device_runner.py``) that ``arm64-cpu`` speaks: HTP runs only
static shapes, so the runner's generate loop (dynamic cache, one token per step) does not apply; the
QDQ graph, its calibration and the cache prefill on the CPU are built by ``qnn_graph.py`` inside the
target's own environment, which answers with its own JSON report (``exporters/targets/qnn_htp.py``).
"""

from __future__ import annotations

import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.manifest import Manifest, bank_budget
from exporters.targets.qnn_htp import NAME, htp_check, lora_route_limit, read_report
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.suite.metrics import paired_drop

from .device_plot import Drop, plot_scores, series_label
from .progress import advancing, stderr_progress
from .records import markdown_table, write_record

TASK_COLUMNS = ["method", "budget", "quant", "task", "n_examples", "test_examples_fitting", "score", "score_host", "max_logit_err",
                "token_agreement", "lora_effect_cosine", "run_ms_emulated_median", "bytes_task", "task_load_ms"]
LORA_ROUTE_FINDING = (
    "ORT's QNN EP takes qnn.lora_config=<graph>;<binary section> only for an EPContext model and applies the section "
    "with QNN's context binary-section API; the section (LoRAv2) must be written by QAIRT's qnn-context-binary-generator "
    "(adapter weight config) for a graph compiled with updatable LoRA tensors, and the wheel ships none of QAIRT's "
    "tools (libraries only). Given a file that is not such a section, the EP logs 'Unable to load Lora Config' and "
    "runs the graph unchanged (probe: output_unchanged), so a wrong section fails silently. Task switching here "
    "uses the fed slot inputs instead.")


@dataclass(frozen=True)
class HtpRun:
    """How to run exports on the emulated HTP (defaults: ``hydraopt bench qnn-htp``'s)."""

    examples: int = 4  # test examples per task: the first that fit ``past`` and ``seq``
    past: int = 120  # static KV cache: prompts up to past + 1 tokens
    seq: int = 8  # static step: answers with their end-of-turn token up to seq tokens
    quants: tuple[str, ...] = ("a16w8",)
    archs: tuple[str, ...] = ()  # htp_arch values to compile offline context binaries for (first export only)
    context_quants: tuple[str, ...] = ("a16w8",)
    contexts_all: bool = False  # context binaries for every export, not only the first
    minutes: float = 60.0  # per export, start no new example after this many minutes
    effect_tasks: int = 1  # tasks whose first example also runs without slots (the LoRA effect; one HTP step each)
    jobs: int = 1  # exports run side by side
    reuse_qdq: bool = False  # reuse the QDQ graphs an earlier run with the same arguments left in the workdir
    reuse: bool = False  # records from the reports an earlier run left in the workdir


def examples(export: Path, tasks: list[str], past: int, seq: int, per_task: int) -> tuple[dict, dict]:
    """Teacher-forced examples for ``qnn_graph.py``'s padded mode: per task the first ``per_task`` test examples (in
    the split's order) whose prompt minus its last token fits the static cache (``<= past``) and whose answer with its
    end-of-turn token fits the step (``<= seq``): ``cached`` = the prompt but its last token (prefilled on the CPU),
    ``step`` = the prompt's last token + the answer but its last token, so step row j predicts answer token j and
    every answer token's prediction runs on HTP. Calibration: the first fitting train example of every task of the
    bank that is a suite task. Returns ``(ids for qnn_graph.py, per task {"answers": answer ids per example, "fit":
    fitting/total})``. ``tasks`` are scored on the suite's test split, so each must be a suite task."""
    from transformers import AutoTokenizer

    from hydraopt_mobile.suite.prompts import training_ids
    from hydraopt_mobile.suite.tasks import OPTIONAL_TASK_NAMES, TASK_NAMES, load_suite

    known = TASK_NAMES + OPTIONAL_TASK_NAMES
    if unknown := [t for t in tasks if t not in known]:
        raise UserError(f"{export}: task {unknown[0]!r} is not a suite task; {NAME} scores the suite's test examples "
                        f"(known: {', '.join(known)})")
    bank = Manifest.read(export).tasks
    tokenizer = AutoTokenizer.from_pretrained(export / "tokenizer")
    ids: dict = {"calibration": {}, "eval": {}}
    meta: dict = {}
    for task in load_suite([t for t in known if t in tasks or t in bank]):
        fitting = {}
        for split in ("train", "test"):
            fitting[split] = []
            for ex in task.split(split):
                full, labels = training_ids(tokenizer, task, ex)
                p = sum(1 for x in labels if x == -100)
                if p - 1 <= past and len(full) - p <= seq:
                    fitting[split].append({"cached": full[: p - 1], "step": full[p - 1: -1], "answer": full[p:]})
        if not fitting["train"]:
            raise UserError(f"task {task.name}: no train example fits --past {past} --seq {seq}")
        ids["calibration"][task.name] = [{k: x[k] for k in ("cached", "step")} for x in fitting["train"][:1]]
        if task.name in tasks:
            chosen = fitting["test"][:per_task]
            ids["eval"][task.name] = [{k: x[k] for k in ("cached", "step")} for x in chosen]
            meta[task.name] = {"answers": [x["answer"] for x in chosen], "fit": f"{len(fitting['test'])}/{len(task.split('test'))}"}
    return ids, meta


def exact(logits: np.ndarray, answer: list[int]) -> float:
    """Teacher-forced exact: 100 when the argmax of every row that predicts an answer token (row j: answer token j) is that token."""
    return 100.0 if all(int(logits[j].argmax()) == t for j, t in enumerate(answer)) else 0.0


def rope_theta(model: Path | None = None) -> float:
    """The RoPE base of the exports' base model (default: the suite's), which ``qnn_graph.py`` needs to left-pad a
    cache; it checks the value against the unpadded fp32 graph before any HTP run."""
    from transformers import AutoConfig

    from hydraopt_mobile.suite.model import base_model_dir

    rope = AutoConfig.from_pretrained(model or base_model_dir()).rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model or base_model_dir()}: the base model's RoPE is {rope['rope_type']}: qnn_graph.rope_shift knows only the default")
    return float(rope["rope_theta"])


def score_export(folder: Path, report: dict, tasks: list[str], meta: dict) -> tuple[list[dict], list[dict]]:
    """Per (quant, task, example) rows and per (quant, task) records from ``qnn_graph.py``'s report on ``folder``."""
    m = Manifest.read(folder)
    logits = report["logits"]
    common = {"target": NAME, "latency_kind": "emulated", "method": m.method, "budget": bank_budget(m, folder), "export": folder.name, "export_id": m.export_id}
    rows, records = [], []
    for q in [*report["quants"], *([report["partial"]] if "partial" in report else [])]:
        for i, task in enumerate(tasks):
            runs = sorted((r for r in q["runs"] if r["task"] == task), key=lambda r: r["window"])
            for r in runs:
                k = r["window"]
                answer = meta[task]["answers"][k]
                rows.append({**common, "quant": q["quant"], "task": task, "example": k, "answer_tokens": len(answer),
                             "score": exact(logits[f"{q['quant']}/qdq/{i}/{k}"], answer), "score_host": exact(logits[f"fp32/{task}/{k}"], answer),
                             "max_logit_err": r["max_err_vs_fp32"], "token_agreement": r["top1_agreement"],
                             "lora_effect_cosine": r.get("lora_effect_cosine"), "max_err_cpu_qdq_vs_fp32": r["max_err_cpu_qdq_vs_fp32"],
                             "max_diff_htp_vs_cpu_qdq": r["max_diff_htp_vs_cpu_qdq"], "run_ms_emulated": r["run_ms"]})
            mine = [x for x in rows if (x["quant"], x["task"]) == (q["quant"], task) and x["export"] == folder.name]
            if not mine:
                continue
            records.append({**common, "quant": q["quant"], "task": task, "n_examples": len(mine), "test_examples_fitting": meta[task]["fit"],
                            "score": float(np.mean([x["score"] for x in mine])), "score_host": float(np.mean([x["score_host"] for x in mine])),
                            "score_each": [x["score"] for x in mine], "score_each_host": [x["score_host"] for x in mine],
                            "max_logit_err": max(x["max_logit_err"] for x in mine),
                            "token_agreement": float(np.mean([x["token_agreement"] for x in mine])),
                            "lora_effect_cosine": next((x["lora_effect_cosine"] for x in mine if x["lora_effect_cosine"] is not None), None),
                            "run_ms_emulated_median": float(np.median([x["run_ms_emulated"] for x in mine])),
                            "bytes_task": m.task_bytes(task), "bytes_resident_host_export": m.resident_bytes(),
                            "task_load_ms": report["task_decode_ms"][task],
                            "task_load": "decode the task's bank file into fp32 slots (host CPU, numpy), once per load",
                            "switch": "feed another task's decoded slots to the same HTP session: no graph or context reload"})
    return rows, records


def averages(records: list[dict]) -> list[dict]:
    """Per (export, quant): task-averaged scores on HTP and on the host's fp32 export, and for each HydraOpt export
    ``drop_points`` (vs one-adapter-per-task, method ``none``, on HTP) and ``host_drop_points`` (the same on the host's
    fp32 export), with 95 % paired bootstrap intervals over the examples both exports ran (the first n of each task)."""
    by: dict = {}
    for r in records:
        by.setdefault((r["export"], r["quant"]), {})[r["task"]] = r
    out = []
    for (export, quant), tasks in by.items():
        first = next(iter(tasks.values()))
        avg = {k: first[k] for k in ("target", "latency_kind", "method", "budget", "export", "export_id")}
        avg.update({"quant": quant, "tasks": len(tasks), "n_examples": sum(r["n_examples"] for r in tasks.values()),
                    "score": float(np.mean([r["score"] for r in tasks.values()])), "score_host": float(np.mean([r["score_host"] for r in tasks.values()])),
                    "max_logit_err": max(r["max_logit_err"] for r in tasks.values()),
                    "token_agreement": float(np.mean([r["token_agreement"] for r in tasks.values()])),
                    "bytes_task_mean": float(np.mean([r["bytes_task"] for r in tasks.values()]))})
        avg["score_vs_host_rel_pct"] = 100 * (avg["score"] - avg["score_host"]) / avg["score_host"] if avg["score_host"] else None
        ref = next((v for (e, q), v in by.items() if q == quant and next(iter(v.values()))["method"] == "none"), None)
        if avg["method"] != "none" and ref is not None:
            shared = sorted(set(ref) & set(tasks))
            n = {t: min(ref[t]["n_examples"], tasks[t]["n_examples"]) for t in shared}
            pick = lambda recs, key: {t: recs[t][key][: n[t]] for t in shared}  # noqa: E731
            avg["drop_points"] = paired_drop(pick(ref, "score_each"), pick(tasks, "score_each"))
            avg["host_drop_points"] = paired_drop(pick(ref, "score_each_host"), pick(tasks, "score_each_host"))
            avg["drop_examples"] = sum(n.values())
            avg["drop_vs_host_drop_points"] = avg["drop_points"]["drop_points"] - avg["host_drop_points"]["drop_points"]
        out.append(avg)
    return out


def bench_qnn_htp(exports: list[Path], run: HtpRun, workdir: Path, tasks: list[str] | None = None,
                  given: tuple[dict, dict] | None = None, theta: float | None = None) -> dict:
    """Run ``exports`` on the emulated HTP; returns ``{"notes", "records" (per export and quant, averaged over tasks),
    "per_task", "per_example", "contexts"}``.

    ``given``: ``(ids, meta)`` as :func:`examples` returns them (default: the suite's, through the first export's
    tokenizer); ``theta``: the base model's RoPE base (default: :func:`rope_theta`). Each export works in
    ``workdir / export name``."""
    for folder in exports:
        m = Manifest.read(folder)
        if m.runtime != "onnxruntime":
            raise UserError(f"{folder}: a {m.runtime} export; {NAME} runs ONNX exports (hydraopt export --format onnx)")
    tasks = tasks or Manifest.read(exports[0]).tasks
    ids, meta = given or examples(exports[0], tasks, run.past, run.seq, run.examples)
    theta = rope_theta() if theta is None else theta
    limit = lora_route_limit()
    started = time.perf_counter()

    def check(folder: Path) -> tuple[dict | None, float | None, str | None]:
        """One export through ``qnn_graph.py``; a run that fails still leaves its per-example checkpoint, used if it has runs."""
        work = workdir / folder.name
        job = bar.add_task(f"{folder.name} on {NAME} (emulated): runs", total=None)
        if run.reuse:
            report = read_report(work)
            if (report["seq"], report["past"], sorted(report["windows"])) != (run.seq, run.past, sorted(tasks)):
                raise UserError(f"{work}: --reuse of a run with other arguments (seq, past or tasks)")
            return report, None, None
        first = Manifest.read(folder).task_file(tasks[0])
        t0 = time.perf_counter()
        try:
            report = htp_check(folder, tasks, seq=run.seq, past=run.past, workdir=work, quants=run.quants,
                               archs=run.archs if folder == exports[0] or run.contexts_all else (),
                               context_quants=run.context_quants, context_tasks=[tasks[0], tasks[-1]], ids=ids,
                               lora_probe=folder / first.path if first else None, static_check=False, reuse_qdq=run.reuse_qdq,
                               rope_theta=theta, minutes=run.minutes, effect_tasks=run.effect_tasks, timeout=6 * 3600,
                               on_step=advancing(bar, job))
            return report, time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001  (a run that dies keeps its checkpoint)
            partial = read_report(work) if (work / "report.json").is_file() and (work / "logits.npz").is_file() else None
            return partial, time.perf_counter() - t0, str(e)[-600:]

    # jobs 2 runs the exports side by side (each emulator process is mostly one thread: sampled over 30 s, the
    # Python/QNN thread took ~2/3 of its CPU time and its 8 thr_hvx_* threads the rest, HMX 1x1 convs on top)
    with stderr_progress() as bar, ThreadPoolExecutor(run.jobs) as pool:
        done = list(pool.map(check, exports))
    per_example, per_task, contexts, runs_info = [], [], [], {}
    probe = None
    for folder, (report, wall, error) in zip(exports, done):
        runs_info[folder.name] = {"wall_s": wall, "error": error, "minutes_limit": run.minutes,
                                  "stopped": [q.get("stopped") for q in report["quants"]] if report else None,
                                  "partial": bool(report and "partial" in report)}
        if report is None:
            continue
        rows, records = score_export(folder, report, tasks, meta)
        per_example += rows
        per_task += records
        m = Manifest.read(folder)
        for q in [*report["quants"], *([report["partial"]] if "partial" in report else [])]:
            runs_info[folder.name][q["quant"]] = {k: q.get(k) for k in ("nodes", "bytes_qdq", "quantize_s", "htp_session_s", "htp_arch_qdq_session",
                                                                         "repeat_run_ms", "stopped")}
            for c in q.get("contexts", []):
                contexts.append({"target": NAME, "method": m.method, "export": folder.name, "quant": q["quant"], "htp_arch": c["htp_arch"],
                                 "bytes": c["bytes_binary"], "bytes_epcontext_onnx": c["bytes_epcontext_onnx"], "compile_s": c["compile_s"],
                                 "load_s": c["load_s"], "qnn_sdk": c["sdk"], "switch_order": [r["task"] for r in c["runs"]],
                                 "max_diff_vs_qdq_session": max(r["max_diff_vs_qdq_session"] for r in c["runs"]),
                                 "run_ms_emulated": [r["run_ms"] for r in c["runs"]]})
                probe = c.get("lora_probe", probe)
    if not per_task:
        raise UserError(f"no example ran on {NAME}: " + "; ".join(f"{k}: {v['error']}" for k, v in runs_info.items()))
    records = averages(per_task)
    for r in records:
        r["bytes_qdq"] = runs_info[r["export"]][r["quant"]]["bytes_qdq"]
    sdk = contexts[0]["qnn_sdk"] if contexts else "?"
    ort_version = next((r["ort"] for r, _, _ in done if r), "?")
    model = Manifest.read(exports[0]).model
    notes = {
        "target": NAME, "latency_kind": "emulated",
        "emulator": f"HTP emulator of onnxruntime-qnn (onnxruntime {ort_version} plug-in, QAIRT {sdk}) on x86_64",
        "host": platform.machine(), "threads": "fp32 CPU reference 1 thread; HTP emulator as shipped",
        "model": f"{model.get('architecture')}, {model.get('n_layers')} layers, whole model at real width, LM head included",
        "scoring": "teacher-forced",
        "examples": (f"per task the first {run.examples} test examples (split order) whose prompt fits the static cache (prompt - 1 <= "
                     f"{run.past} tokens) and whose answer + end-of-turn token fits the step (<= {run.seq} tokens); fitting/total per "
                     f"task: { {t: meta[t]['fit'] for t in tasks} }; examples run round robin over the tasks, and an export stopped by "
                     "its minutes keeps the examples it finished (runs_info)"),
        "what_runs_where": (f"the prompt but its last token is prefilled by the fp32 export on the CPU execution provider (host, labelled: "
                            f"not on HTP); the cache is left-padded to the static {run.past} positions (keys moved to their padded "
                            "positions by RoPE, padding masked through the graph's attention_bias input; checked against the unpadded "
                            f"fp32 graph: pad_check_max_err); the prompt's last token + the answer run as ONE static step of {run.seq} "
                            "rows on HTP, so every answer token's prediction is computed on the NPU. Score: exact (100) when every answer "
                            "token (and the end-of-turn token) is the argmax of its row, else 0; score_host: the same on the fp32 export's "
                            "logits (host CPU EP, unpadded cache) for the same examples"),
        "calibration": f"one fitting train example per task of the bank ({len(ids['calibration'])}), activations of the fp32 graph; "
                       "task slots and attention_bias calibrated as inputs",
        "qdq_build": ("the causal mask's float32 minimum is -100 before calibration (at -3.4e38 the Softmax input's 16-bit step was "
                      "5.2e33 and attention uniform); each Reciprocal is Div(1, x) (the QNN EP encoded Reciprocal's constant 1 with the "
                      "input's range, [0, 0.14] in layer 0: every RMSNorm output 0.14x on HTP, invisible on the CPU EP); constant-weight "
                      "MatMuls are 1x1 Convs with per-output-channel 8-bit weights (QNN has no per-channel MatMul, and its per-tensor "
                      "16x8 MatMul departed from the CPU EP by 39 % at o_proj); the causal mask is an input (attention_bias) so that "
                      "padded cache positions can be masked. max_err_cpu_qdq_vs_fp32: the same QDQ graph on the CPU EP"),
        "pad_check_max_err": {f.name: r.get("pad_check_max_err") for f, (r, _, _) in zip(exports, done) if r},
        "runs_info": runs_info,
        "targets": "HydraOpt's drop vs one-per-task on HTP within 2 points of the host's drop (same examples); A16W8 score "
                   "within 10 % (relative) of the host fp32 export's score (score_vs_host_rel_pct)",
        "tasks": tasks, "exports": [str(p) for p in exports], "wall_s": time.perf_counter() - started,
        "qnn_lora_route": {**limit, "probe": probe, "finding": LORA_ROUTE_FINDING},
    }
    return {"notes": notes, "records": records, "per_task": per_task, "per_example": per_example, "contexts": contexts}


def markdown(result: dict, title: str) -> str:
    """The report: averaged records, context binaries, per task, QNN's own LoRA route."""
    notes, records, contexts = result["notes"], result["records"], result["contexts"]
    limit = notes["qnn_lora_route"]
    fmt = lambda d: "-" if not d else f"{d['drop_points']:+.2f} [{d['drop_points_ci95'][0]:+.2f}, {d['drop_points_ci95'][1]:+.2f}]"  # noqa: E731
    columns = ["method", "budget", "quant", "tasks", "n_examples", "score", "score_host", "score_vs_host_rel_pct", "drop_points",
               "host_drop_points", "max_logit_err", "token_agreement"]
    md = [f"# {title}", "", f"`{notes['command']}`", "", *([f"Reused: {notes['reused']}.", ""] if "reused" in notes else []),
          "Examples: " + notes["examples"] + ".", "",
          "What runs where: " + notes["what_runs_where"] + ".", "", "QDQ build: " + notes["qdq_build"] + ".", "",
          f"Run: {json.dumps(notes['runs_info'])}", "",
          *markdown_table(columns, [[fmt(r.get(c)) if c.endswith("drop_points") else r.get(c) for c in columns] for r in records]), "",
          "## Offline context binaries (ep.context_enable=1), one per htp_arch, serving every task", "",
          *markdown_table(["method", "quant", "htp_arch", "bytes", "bytes_epcontext_onnx", "compile_s", "load_s", "switch_order", "max_diff_vs_qdq_session"],
                          [[c["method"], c["quant"], c["htp_arch"], c["bytes"], c["bytes_epcontext_onnx"], c["compile_s"], c["load_s"],
                            " > ".join(c["switch_order"]), c["max_diff_vs_qdq_session"]] for c in contexts]), "",
          "## Per task", "",
          *markdown_table(TASK_COLUMNS, [[r.get(c) for c in TASK_COLUMNS] for r in result["per_task"]]), "",
          "## QNN's own LoRA route", "", limit["finding"], "",
          f"`{limit['command']}`: wheel files {', '.join(limit['wheel_files'])}; QAIRT tools found: "
          f"{', '.join(f'{k}={v}' for k, v in limit['qairt_tools_found'].items())}; probe: {json.dumps(limit['probe'])}"]
    return "\n".join(md) + "\n"


def write_reports(result: dict, out: Path, title: str) -> None:
    """``out`` (JSON: notes, records, per_task, per_example, contexts), and beside it ``.md`` and ``.png``."""
    write_record(out, result, markdown(result, title), plot_htp(result))


def plot_htp(result: dict) -> Callable[[Path], None]:
    """The record's picture: per task HTP's and the host fp32 export's scores, and each merge's drops (on its averaged record)."""
    drops = [Drop(series_label(r), r["drop_points"], r["host_drop_points"]) for r in result["records"] if "drop_points" in r]
    return plot_scores(result["per_task"], drops, f"{NAME}: HTP (bars) vs host fp32 (ticks)")
