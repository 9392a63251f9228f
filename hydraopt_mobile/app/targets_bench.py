"""``bench_target``: an ONNX or ExecuTorch export run by a target's own runtime, task by task,
against the host.

One request goes to the target's runner and the same request to the same runner on the host's
runtime (the reference: ONNX Runtime, or the exporter's ExecuTorch for a ``.pte``). The task sequence visits every task and then switches back to the
first, in one runner process, so a switch that leaks state shows up as a back-switch whose outputs
differ from the first visit's. Parity per task: tokens identical, token agreement, and the max
logit error over the rows whose inputs are identical on both sides (every row up to and including
the first token where the two sides disagree).

Scoring (record field ``scoring``): ``"generated"`` decodes greedily and scores the text with the
suite's metric; ``"teacher-forced"`` (``--teacher-forced``, for targets too slow to generate) runs
each prompt followed by its reference answer (the answer's tokens and the end-of-turn token, as in
training: ``hydraopt_mobile/suite/prompts.py``, ``training_ids``) in one pass, and an example is
exact (100) when the argmax at every answer position is the reference token, else 0. Every row then
has the same inputs on both sides, so the logit error covers all of them. The two scores are not
comparable with each other: teacher-forced exact is stricter than exact match on the first line.

Records: the host bench's fields (``hydraopt_mobile/app/bench.py``) plus ``target``, ``latency_kind``,
``emulator``, ``parity_reference`` and per-task parity; ``score`` comes from the target's outputs,
``score_host`` from the host runner's on the same examples (the PyTorch score stays with
``hydraopt bench host``: ``score_pytorch`` is None here).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.manifest import Manifest, bank_budget, verify_all
from exporters.targets.protocol import Response, make_request, run_on_host, run_request
from exporters.targets.registry import get_target
from exporters.targets.target import Target
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.suite.metrics import paired_drop

from .device_plot import Drop, plot_scores
from .progress import advancing, stderr_progress
from .records import dict_table, write_record


class TargetNotReady(RuntimeError):
    """The target's tools are not set up; the message says why and which command sets them up."""


def parity(target_tokens: list[int], host_tokens: list[int], target_rows: np.ndarray | None,
           host_rows: np.ndarray | None, teacher_forced: bool = False) -> dict:
    """Token agreement and max logit error over the rows computed from identical inputs (all of
    them when ``teacher_forced``: the inputs are the reference answer on both sides)."""
    n = min(len(target_tokens), len(host_tokens))
    first_diff = next((i for i in range(n) if target_tokens[i] != host_tokens[i]), n)
    if teacher_forced:
        first_diff = n
    agree = sum(a == b for a, b in zip(target_tokens[:first_diff], host_tokens[:first_diff]))
    err = None
    if target_rows is not None and host_rows is not None:
        k = min(first_diff + 1, len(target_rows), len(host_rows))
        err = float(np.abs(target_rows[:k] - host_rows[:k]).max())
    return {"identical": target_tokens == host_tokens, "agreement": agree / max(len(target_tokens), len(host_tokens), 1),
            "max_logit_err": err}


def ready_target(target_name: str, runtime: str = "onnxruntime") -> Target:
    """The target, ready to run ``runtime``'s exports, or :class:`TargetNotReady` with its reason
    and the command that makes it ready."""
    target = get_target(target_name)
    if target.python is None:
        raise TargetNotReady(f"target {target_name} has no device runner")
    ready = target.runtime_check(target.folder(), runtime) if target.runtime_check else target.readiness()
    if not ready.ready:
        hint = f"; run `{ready.command}`" if ready.command else ""
        raise TargetNotReady(f"target {target_name} is not ready for {runtime} exports: {ready.reason}{hint}")
    return target


def run_pair(target_name: str, export: Path, sequence: list[str], prompts: dict[str, list[list[int]]], max_new: int,
             threads: int = 1, switch_samples: int = 5, answers: dict[str, list[list[int]]] | None = None,
             progress: bool = True) -> tuple[Response, Response]:
    """The same request on the target and on the host; every output's logits come back.
    ``answers``: teacher-forced scoring of these reference answers instead of generating.
    ``progress``: a bar per side on stderr, advanced by the runner's progress lines."""
    runtime = Manifest.read(Path(export)).runtime
    target = ready_target(target_name, runtime)
    n_logits = max(len(p) for p in prompts.values())
    request = make_request(export, sequence, prompts, max_new, threads, n_logits, switch_samples, answers)
    python, env = target.python(target.folder(), runtime)
    with stderr_progress(disable=not progress) as bar:
        side = bar.add_task(f"{Path(export).name} on {target_name} ({target.latency_kind}): examples", total=None)
        on_target = run_request(python, env, request, target_name, target.latency_kind,
                                on_step=advancing(bar, side))
        bar.update(side, visible=False)
        side = bar.add_task(f"{Path(export).name} on the host (reference): examples", total=None)
        on_host = run_on_host(request, on_step=advancing(bar, side))
    return on_target, on_host


def bench_target(
    target_name: str,
    export: str | Path,
    tasks: list[str] | None = None,
    n_examples: int = 4,
    threads: int = 1,
    prompts: dict[str, list[list[int]]] | None = None,
    max_new_tokens: int | None = None,
    json_out: str | Path | None = None,
    teacher_forced: bool = False,
    answers: dict[str, list[list[int]]] | None = None,
    switch_back: bool = True,
) -> list[dict]:
    """One record per task of ``export`` (see module docstring); writes ``json_out`` (+ ``.md``).

    ``prompts`` (and, teacher-forced, ``answers``): token ids per task (tests); default: the
    suite's first ``n_examples`` test examples per task, rendered with the export's own tokenizer,
    and scored with the suite's metric (teacher-forced: exact when every answer token is the argmax).
    ``switch_back``: after the last task, switch back to the first and check its outputs are
    bit-identical (one more pass over the first task's examples).
    """
    export = Path(export)
    manifest = Manifest.read(export)
    ready_target(target_name, manifest.runtime)
    verify_all(manifest, export)
    if teacher_forced and prompts is not None and answers is None:
        raise UserError("teacher-forced scoring of given prompts needs their reference answers")
    names = [t for t in manifest.tasks if (tasks is None or t in tasks) and (prompts is None or t in prompts)]
    if not names:
        raise UserError(f"{export}: none of the tasks asked for ({', '.join(tasks or [])}) is in the export ({', '.join(manifest.tasks)})")
    specs = tokenizer = None
    if prompts is None:
        from exporters.runtime import export_tokenizer

        from .bench import task_prompts

        tokenizer = export_tokenizer(export)
        specs, prompts, max_new = task_prompts(tokenizer, names, n_examples)
        max_new_tokens = max_new_tokens or max(max_new.values())
        if teacher_forced:
            answers = reference_answers(tokenizer, specs, prompts)
    sequence = names + names[:1] if len(names) > 1 and switch_back else names
    load_before = os.getloadavg()[0]
    on_target, on_host = run_pair(target_name, export, sequence, prompts, max_new_tokens or 16, threads,
                                  answers=answers if teacher_forced else None)
    target = get_target(target_name)
    emulator = target.emulator(target.folder()) if target.emulator else None
    t, h = on_target.data, on_host.data
    budget = bank_budget(manifest, export)  # one read of the bank's manifest, not one per task
    records = []
    for index, task in enumerate(sequence[: len(names)]):
        te, he = t["tasks"][index], h["tasks"][index]
        checks = [parity(a["tokens"], b["tokens"], on_target.rows(index, i), on_host.rows(index, i), teacher_forced)
                  for i, (a, b) in enumerate(zip(te["outputs"], he["outputs"]))]
        errs = [c["max_logit_err"] for c in checks if c["max_logit_err"] is not None]
        decode = [d for o in te["outputs"] for d in o["decode_ms"]]
        record = {
            "target": target_name, "latency_kind": t["latency_kind"], "emulator": emulator,
            "runtime": f"{t['runtime']} ({t['machine']}, Python {t['python']})",
            "parity_reference": f"host {h['runtime']} ({h['machine']}), same export, same runner",
            "export": export.name, "export_id": manifest.export_id, "bank_digest": manifest.extra.get("bank_digest"),
            "quant": manifest.quant, "method": manifest.method, "budget": budget, "task": task, "n_examples": len(te["outputs"]),
            "scoring": t["scoring"],
            "bytes_resident": t["resident_bytes"], "bytes_task": te["task_bytes"],
            "bytes_total": t["resident_bytes"] + t["all_tasks_bytes"],
            "score": None, "score_host": None, "score_pytorch": None,
            "max_logit_err": max(errs) if errs else None,
            "token_agreement": statistics.mean(c["agreement"] for c in checks) if checks else None,
            "tokens_identical": all(c["identical"] for c in checks),
            "switch_ms": te["switch_ms"], "task_load_ms": te["load_ms"], "program_load_ms": t["session_ms"],
            "prefill_ms": statistics.median(o["prefill_ms"] for o in te["outputs"]) if te["outputs"] else None,
            "decode_ms_per_token": statistics.median(decode) if decode else None,
            "host_decode_ms_per_token": statistics.median(d for o in he["outputs"] for d in o["decode_ms"]) if any(o["decode_ms"] for o in he["outputs"]) else None,
            "peak_rss_mb": t["peak_rss_mb"],
            "rss_source": "VmHWM of the runner process" + (" (the emulator's process: emulator included)" if emulator else ""),
            "threads": t["threads"],
            "runner_wall_s": on_target.wall_s,
            "host_load_avg_1min": round(load_before, 2),  # other jobs on the host's cores slow an emulator down
        }
        if teacher_forced:
            record["score_each"] = teacher_forced_exact(te, answers[task])
            record["score_each_host"] = teacher_forced_exact(he, answers[task])
        elif specs is not None:
            from hydraopt_mobile.suite.metrics import per_example

            def texts(entry: dict) -> list[str]:
                return [tokenizer.decode(o["tokens"], skip_special_tokens=True).strip() for o in entry["outputs"]]

            record["score_each"] = per_example(specs[task], texts(te), "test")
            record["score_each_host"] = per_example(specs[task], texts(he), "test")
        if "score_each" in record:
            record["score"] = statistics.fmean(record["score_each"])
            record["score_host"] = statistics.fmean(record["score_each_host"])
        if index == 0 and len(sequence) > len(names):  # the switch back to the first task
            back = len(sequence) - 1
            same = all(a["tokens"] == b["tokens"] and np.array_equal(on_target.rows(0, i), on_target.rows(back, i))
                       for i, (a, b) in enumerate(zip(te["outputs"], t["tasks"][back]["outputs"])))
            record["switch_back_identical"] = same
            record["switch_back_ms"] = t["tasks"][back]["switch_ms"]
        records.append(record)
    if json_out is not None:
        write_reports(records, Path(json_out), notes(records))
    return records


def reference_answers(tokenizer, specs: dict, prompts: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Per task, each test example's reference answer as the model was trained to produce it
    (answer tokens + end-of-turn), checked to follow exactly the prompt ids that are run."""
    from hydraopt_mobile.suite.prompts import training_ids

    out: dict[str, list[list[int]]] = {}
    for task, ids in prompts.items():
        out[task] = []
        for prompt, example in zip(ids, specs[task].test):
            full, _ = training_ids(tokenizer, specs[task], example)
            if full[: len(prompt)] != list(prompt):
                raise UserError(f"task {task}: the prompt's tokens are not a prefix of prompt + answer; teacher forcing would score another input")
            out[task].append(full[len(prompt):])
    return out


def teacher_forced_exact(entry: dict, answers: list[list[int]]) -> list[float]:
    """Per example, 100 when the argmax at every answer position is the reference token, else 0."""
    return [100.0 * (o["tokens"] == list(a)) for o, a in zip(entry["outputs"], answers)]


def series_key(record: dict) -> str:
    """``method/quant``, or ``method (budget)/quant`` for a budgeted bank: what tells one export's
    records from another's in a target record (two HydraOpt budgets of one quantisation included)."""
    budget = f" ({record['budget']})" if record.get("budget") else ""
    return f"{record['method']}{budget}/{record['quant']}"


def drops(records: list[dict]) -> dict:
    """Every merge vs one-adapter-per-task (method ``none``) of the same quantisation, on the
    target's scores and on the host's, on the same examples: points with 95 % paired intervals,
    keyed by :func:`series_key`."""
    out = {}
    by: dict[str, dict[str, dict]] = {}
    for r in records:
        by.setdefault(series_key(r), {})[r["task"]] = r
    for key, tasks in by.items():
        first = next(iter(tasks.values()))
        ref = by.get(series_key({"method": "none", "quant": first["quant"]}))
        if first["method"] == "none" or ref is None or set(ref) != set(tasks):
            continue
        if any("score_each" not in r for r in [*ref.values(), *tasks.values()]):
            continue  # prompts without reference answers: nothing to compare
        target = paired_drop({t: ref[t]["score_each"] for t in ref}, {t: tasks[t]["score_each"] for t in tasks})
        host = paired_drop({t: ref[t]["score_each_host"] for t in ref}, {t: tasks[t]["score_each_host"] for t in tasks})
        out[key] = {"drop_points": target, "host_drop_points": host}
    return out


def notes(records: list[dict]) -> dict:
    """What every reader of the records must know: target, threads, how to read the latencies."""
    r = records[0]
    kind = r["latency_kind"]
    return {"target": r["target"], "emulator": r["emulator"], "host": platform.machine(), "threads": r["threads"],
            "scoring": r["scoring"],
            "latency": f"{kind}: never a phone's speed" if kind == "emulated" else kind,
            "examples_per_task": {f"{x['export']}/{x['task']}": x["n_examples"] for x in records}, "drops": drops(records)}


COLUMNS = ["export", "quant", "method", "task", "n_examples", "scoring", "bytes_resident", "bytes_task", "score", "score_host", "tokens_identical",
           "token_agreement", "max_logit_err", "task_load_ms", "switch_ms", "prefill_ms", "decode_ms_per_token", "latency_kind", "host_load_avg_1min"]


def target_markdown(records: list[dict], info: dict) -> str:
    """One row per export and task, after the notes."""
    lines = [f"# {info.get('target')}: exports on the target's runtime", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += dict_table(records, COLUMNS)
    if records and records[0].get("emulator"):
        lines += ["", f"Emulator: {records[0]['emulator']}. Latencies are emulated and say nothing about a phone's speed."]
    return "\n".join(lines) + "\n"


def write_reports(records: list[dict], path: Path, info: dict) -> None:
    """``path`` (JSON: notes + records), ``path.md`` (one row per export and task) and ``path.png`` (scores, drops)."""
    write_record(path, {"notes": info, "records": records}, target_markdown(records, info), plot_target(records, info))


def plot_target(records: list[dict], info: dict) -> Callable[[Path], None]:
    """The record's picture: per task the target's and the host's scores, and ``info["drops"]`` (keyed by :func:`series_key`)."""
    drops = [Drop(key, d["drop_points"], d["host_drop_points"]) for key, d in info.get("drops", {}).items()]
    return plot_scores(records, drops, f"{info.get('target')}: target (bars) vs host (ticks)")
