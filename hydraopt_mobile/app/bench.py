"""``bench_host``: every export measured on its real runtime, against PyTorch on the same bank.

Runtime measurements (program load, task load, switch, prefill and decode latency, generated
tokens, peak RSS) run in a fresh child process per export, so that peak RSS is the runtime's own
and not the PyTorch reference's. The parent then scores the runtime's own greedy outputs with the
suite's metric and checks parity against the PyTorch model with the same effective adapter
(teacher-forced on the runtime's tokens: max logit error and greedy-token agreement).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.merge.method import OnStep

from exporters.backend import Session
from exporters.manifest import Manifest, verify_all
from exporters.runtime import export_tokenizer, greedy, open_export

from .progress import advancing, stderr_progress

SWITCHES = 21  # switch-time samples per task (median reported)
PARITY_EXAMPLES = 2  # examples per task whose full logits come back for the max-error check


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process image (Linux ``VmHWM``).

    Not ``ru_maxrss``: that survives ``exec``, so a spawned child would report the parent's RSS at
    fork time (the PyTorch reference model) as its own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(folder: str, prompts: dict[str, list[list[int]]], max_new: dict[str, int], threads: int, on_step: OnStep | None = None) -> dict:
    """Child process: load the export, switch between its tasks, generate greedily; timings in ms.
    ``on_step(done, total)`` after each generation."""
    torch.set_num_threads(threads)
    baseline = _vm_hwm_mb()
    t0 = time.perf_counter()
    session = open_export(folder, threads)
    out: dict = {"program_load_ms": (time.perf_counter() - t0) * 1e3, "rss_baseline_mb": baseline, "tasks": {}}
    tasks = list(prompts)
    for task in tasks:
        t0 = time.perf_counter()
        session.load_task(task)
        out["tasks"][task] = {"task_load_ms": (time.perf_counter() - t0) * 1e3}
    total, done = sum(len(p) for p in prompts.values()), 0
    for task in tasks:
        rec = out["tasks"][task]
        rec["switch_ms"] = _switch_ms(session, task, next((t for t in tasks if t != task), task))
        rec["generations"] = []
        for i, ids in enumerate(prompts[task]):
            rec["generations"].append(_generation(session, ids, max_new[task], i < PARITY_EXAMPLES))
            done += 1
            if on_step is not None:
                on_step(done, total)
    out["peak_rss_mb"] = _vm_hwm_mb()
    return out


def _switch_ms(session: Session, task: str, other: str) -> float:
    """Median time of a switch from ``other`` to ``task`` over ``SWITCHES`` samples."""
    samples = []
    for _ in range(SWITCHES):
        session.set_task(other)
        t0 = time.perf_counter()
        session.set_task(task)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _generation(session: Session, ids: list[int], max_new: int, keep_logits: bool) -> dict:
    """Greedy tokens and timings of one prompt; with ``keep_logits`` the rows that predicted each token."""
    gen = greedy(session, ids, max_new, keep_logits=keep_logits)
    logits = gen.token_logits() if gen.logits else None
    return {"tokens": gen.tokens, "prefill_ms": gen.prefill_s * 1e3, "decode_ms": [s * 1e3 for s in gen.decode_s], "logits": logits}


def peak_rss(folder: str | Path, prompts: dict[str, list[list[int]]], max_new: dict[str, int], threads: int = 1) -> dict:
    """Peak RSS (MB) of a fresh child that loads the export and generates once per task."""
    measured = _in_child(Path(folder), {t: p[:1] for t, p in prompts.items()}, max_new, threads)
    return {"peak_rss_mb": measured["peak_rss_mb"], "rss_baseline_mb": measured["rss_baseline_mb"]}


def _in_child(folder: Path, prompts: dict, max_new: dict, threads: int, on_step: OnStep | None = None) -> dict:
    """:func:`_measure` in a fresh (spawned) process; its steps come back through a pipe as they
    happen, then its result or its exception."""
    from .quiet import silenced

    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(sender, str(folder), prompts, max_new, threads, silenced()))
    child.start()
    sender.close()
    try:
        while True:
            try:
                kind, *payload = receiver.recv()
            except EOFError:
                child.join()
                raise RuntimeError(f"measuring {folder}: the runtime's process ended without a result (exit code {child.exitcode})") from None
            if kind == "step" and on_step is not None:
                on_step(*payload)
            elif kind == "error":
                raise payload[0]
            elif kind == "done":
                return payload[0]
    finally:
        receiver.close()
        child.join()


def _child(sender, folder: str, prompts: dict, max_new: dict, threads: int, quiet: bool) -> None:
    if quiet:  # as the parent: its logger levels do not cross a spawn (torchao's import warnings did)
        from .quiet import silence_third_party

        silence_third_party()
    try:
        result = _measure(folder, prompts, max_new, threads, on_step=lambda done, total: sender.send(("step", done, total)))
    except BaseException as e:  # the parent raises it (re-raised as-is when it pickles, as Pool.apply did)
        try:
            sender.send(("error", e))
        except Exception:
            sender.send(("error", RuntimeError(f"measuring {folder}: {type(e).__name__}: {e}")))
        return
    sender.send(("done", result))


@torch.no_grad()
def _parity(model, prompt: list[int], gen: dict) -> tuple[float | None, list[bool]]:
    """Teacher-forced on the runtime's tokens: max |logit error| (when logits came back) and agreement."""
    seq = prompt + gen["tokens"]
    ref = model(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1 :].float().numpy()
    agree = [int(r.argmax()) == t for r, t in zip(ref, gen["tokens"])]
    err = None if gen["logits"] is None else float(np.abs(gen["logits"] - ref[: len(gen["logits"])]).max())
    return err, agree


@dataclass
class _Reference:
    """The PyTorch side: the base model and its tokenizer, and the reference scores kept across
    exports (key: bank, task, examples), so that exports of one bank share one score per task."""

    model: torch.nn.Module
    tokenizer: object
    scores: dict

    def check(self, bank: MergedBank, factors: dict, spec, n_examples: int, prompts: list, generations: list) -> dict:
        """Parity of the runtime's ``generations`` with the model under ``factors``, and the reference score."""
        from hydraopt_mobile.adapter_weights import applied
        from hydraopt_mobile.suite.evaluate import generate
        from hydraopt_mobile.suite.metrics import score

        errs, agree = [], []
        with applied(self.model, factors):
            for ids, gen in zip(prompts, generations):
                err, ok = _parity(self.model, ids, gen)
                errs += [] if err is None else [err]
                agree += ok
            key = (id(bank), spec.name, n_examples)
            if key not in self.scores:
                self.scores[key] = score(spec, generate(self.model, self.tokenizer, spec), "test")
        return {
            "score_pytorch": self.scores[key],
            "max_logit_err": max(errs) if errs else None,
            "token_agreement": float(np.mean(agree)) if agree else None,
        }


def _record(folder: Path, manifest: Manifest, task: str, score: float, parity: dict, measured: dict, texts: list[str], threads: int) -> dict:
    """One export x task record (field order is the report's)."""
    m = measured["tasks"][task]
    decode = [d for g in m["generations"] for d in g["decode_ms"]]
    return {
        "export": folder.name,
        "export_id": manifest.export_id,
        "bank_digest": manifest.extra.get("bank_digest"),
        "runtime": manifest.runtime,
        "quant": manifest.quant,
        "method": manifest.method,
        "task": task,
        "n_examples": len(texts),
        "bytes_resident": manifest.resident_bytes(),
        "bytes_task": manifest.task_bytes(task) if manifest.slots else 0,
        "bytes_total": manifest.resident_bytes() + manifest.bytes_of("task"),
        "score": score,
        **parity,
        "switch_ms": m["switch_ms"],
        "task_load_ms": m["task_load_ms"],
        "program_load_ms": measured["program_load_ms"],
        "prefill_ms": statistics.median(g["prefill_ms"] for g in m["generations"]),
        "decode_ms_per_token": statistics.median(decode) if decode else None,
        "peak_rss_mb": measured["peak_rss_mb"],
        "rss_source": "VmHWM",
        "rss_baseline_mb": measured["rss_baseline_mb"],
        "threads": threads,
    }


def _bench_export(folder: Path, bank: MergedBank | None, ref: _Reference, tasks: list[str] | None, n_examples: int, threads: int, bar: Progress) -> list[dict]:
    """Measure one export in a child, then score it and check it against the reference, per task
    (each part a step of ``bar``)."""
    from hydraopt_mobile.suite.metrics import score

    manifest = Manifest.read(folder)
    verify_all(manifest, folder)
    bank = bank or _bank_from_export(folder)
    names = [t for t in manifest.tasks if tasks is None or t in tasks]
    tokenizer = export_tokenizer(folder)
    specs, prompts, max_new = task_prompts(tokenizer, names, n_examples)
    job = bar.add_task(f"{folder.name}: runtime, examples", total=sum(len(p) for p in prompts.values()))
    measured = _in_child(folder, prompts, max_new, threads, on_step=advancing(bar, job))
    bar.update(job, visible=False)
    job = bar.add_task(f"{folder.name}: PyTorch reference, tasks", total=len(names))
    records = []
    for task in names:
        generations = measured["tasks"][task]["generations"]
        parity = ref.check(bank, bank.task_factors(task), specs[task], n_examples, prompts[task], generations)
        texts = [tokenizer.decode(g["tokens"], skip_special_tokens=True).strip() for g in generations]
        records.append(_record(folder, manifest, task, score(specs[task], texts, "test"), parity, measured, texts, threads))
        bar.advance(job)
    bar.update(job, visible=False)
    return records


def bench_host(
    export_dirs: list[str | Path],
    tasks: list[str] | None = None,
    json: str | Path | None = None,
    banks: dict[str, MergedBank] | None = None,
    model_dir: str | Path | None = None,
    n_examples: int = 20,
    threads: int = 1,
    reference_scores: dict | None = None,
) -> list[dict]:
    """One record per export and task (see module docstring); writes ``json`` (+ ``.md``, ``.png``).

    ``banks`` maps an export folder (as given) to the bank it was made from, for the PyTorch
    reference; without it the bank is read from the export's own ``bank/`` folder (a bundle).
    ``n_examples``: test examples per task (the suite's test split, first ``n``).
    ``reference_scores``: a dict kept across calls so that exports of the same bank (fp32 and
    quantised) share one PyTorch reference score per task.
    """
    from hydraopt_mobile.suite.model import base_model_dir, load_base_model

    torch.set_num_threads(threads)
    model, ref_tokenizer = load_base_model(Path(model_dir) if model_dir else base_model_dir())
    ref = _Reference(model, ref_tokenizer, {} if reference_scores is None else reference_scores)
    records: list[dict] = []
    with stderr_progress() as bar:
        job = bar.add_task("bench host: exports", total=len(export_dirs))
        for folder in map(Path, export_dirs):
            records += _bench_export(folder, (banks or {}).get(str(folder)), ref, tasks, n_examples, threads, bar)
            bar.advance(job)
    if json is not None:
        write_reports(records, Path(json))
    return records


def task_prompts(tokenizer, names: list[str], n_examples: int) -> tuple[dict, dict, dict]:
    """(task specs cut to ``n_examples`` test examples, prompt token ids, max new tokens) per task,
    rendered with ``tokenizer`` (the export's own: :func:`export_tokenizer`)."""
    from hydraopt_mobile.suite.prompts import render_prompt
    from hydraopt_mobile.suite.tasks import load_suite

    specs = {s.name: replace(s, test=s.test[:n_examples]) for s in load_suite(names)}
    prompts = {
        t: [tokenizer(render_prompt(tokenizer, specs[t], ex), add_special_tokens=False).input_ids for ex in specs[t].test]
        for t in names
    }
    return specs, prompts, {t: specs[t].max_new_tokens for t in names}


def _bank_from_export(folder: Path) -> MergedBank:
    """The bank an export holds: its ``bank/`` folder is the bank's bundle (exporters/export.py)."""
    from hydraopt_mobile.bundle import load_bundle

    return load_bundle(folder / "bank")


def write_reports(records: list[dict], json_path: Path, notes: dict | None = None) -> None:
    """``json_path`` (records + notes), ``.md`` (per-export summary and per-task table), ``.png``."""
    from .bench_report import bench_markdown, write_plot
    from .records import write_record

    write_record(json_path, {"notes": notes or {}, "records": records}, bench_markdown(records, notes or {}), lambda png: write_plot(records, png))
