#!/usr/bin/env python3
"""On-target runner for ONNX exports: the device-runner protocol ``hydraopt-device-runner/1``.

This file is copied to (or run on) the target as it is. It needs only the Python standard library,
numpy and ONNX Runtime: no torch, no transformers, nothing from this project. Token ids go in, token
ids (and, on request, the logits needed for parity) come out; tokenising and scoring stay on the
host. It activates a task exactly as the host runtime does (``exporters/onnx_backend.py``,
``OrtSession``, which opens its sessions, decodes task files and steps the decoder with this file's
:func:`open_ort_session`, :func:`decoded_slots` and :func:`decoder_step`): the task file is checked
against the manifest (size, SHA-256), the task decoder runs once per task load with that task's
``.onnx_adapter`` active, and every decoder step is fed the task's decoded fp32 slots.

How the wire operations map to the in-process ``Backend`` / ``Session`` (``exporters/backend.py``):

- ``"export"`` (+ ``"threads"``): ``BACKENDS["onnx"].open_session(export, threads)``; the manifest is
  read and the program and task decoder opened (``session_ms``). Only ``onnxruntime`` exports.
- each entry of ``"tasks"``: ``Session.load_task(task)`` (``load_ms``: verify, decode once), then
  ``Session.set_task(task)`` (``switch_ms``: the switch from the entry before).
- each prompt of ``"prompts"[task]``: ``exporters.runtime.greedy``: ``Session.prefill(prompt)``
  (``prefill_ms``), then ``Session.decode(token)`` per generated token (``decode_ms``) until an
  end-of-sequence token of the manifest or ``"max_new_tokens"``; ``tokens`` are the argmax tokens,
  and the optional logits are the rows ``greedy(..., keep_logits=True)`` returns.

Protocol (the same wire format as the Android app's benchmark mode,
``android_demo/.../DeviceRunner.java``; JSON files, UTF-8):

Request: ``{"protocol": "hydraopt-device-runner/1", "export": DIR, "tasks": [task, ...],
"prompts": {task: [[id, ...], ...]}, "max_new_tokens": N, "threads": T}``. ``tasks`` is run in
order: load the task's file, make it active (the switch), greedy-decode each of its prompts. A task
may appear more than once: ``[a, b, a]`` switches to ``b`` and back to ``a``.

Response: ``{"protocol", "target", "runtime", "export_id", "latency_kind", "threads",
"resident_bytes", "all_tasks_bytes", "session_ms", "tasks": [{"task", "task_bytes", "load_ms",
"switch_ms", "outputs": [{"prompt_tokens", "tokens", "prefill_ms", "decode_ms_per_token"}]}]}``,
or ``{"protocol", "error": MESSAGE}`` when the request, the export or a task file is refused.

Optional extensions (a runner that does not know them ignores them, as the Android app does; the
response lists the ones it honoured in ``"extensions"``):

- ``"logits_examples": K``: the logits of the first K outputs of every task entry are written to
  ``<response>.npz`` (key ``"<entry index>/<output index>"``, float32, one row per generated token:
  the row that predicted it); each such output gets ``"logits_key"``.
- ``"switch_samples": S``: ``switch_ms`` is the median of S switches to the task from the task
  before it (or from itself for the first entry), instead of one.
- always reported: ``"machine"`` (``platform.machine()``), ``"python"``, ``"peak_rss_mb"`` (VmHWM
  of this process; under qemu-user that is the emulator's process, the emulator included), and per
  output ``"decode_ms"`` (every step).

Usage: ``python device_runner.py REQUEST.json RESPONSE.json [--target NAME] [--latency-kind KIND]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time

PROTOCOL = "hydraopt-device-runner/1"
EXTENSIONS = ["logits_examples", "switch_samples", "decode_ms", "peak_rss_mb"]
MANIFEST_SCHEMA = "hydraopt-export/1"


class Refused(Exception):
    """The request, the export or a task file is not acceptable; reported as ``"error"``."""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session on ``path``, opened as every ONNX session of this project opens one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # LoRA inputs with defaults are intended; ORT warns about each one
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def decoded_slots(task_decoder, adapter_path: str) -> dict:
    """Run the task decoder once with the ``.onnx_adapter`` at ``adapter_path`` active: slot -> fp32 values."""
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(adapter_path)
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    names = [o.name for o in task_decoder.get_outputs()]
    return dict(zip(names, task_decoder.run(names, {}, options)))


def decoder_step(session, ids: list[int], slots: dict, past: list) -> tuple:
    """One step of ``model.onnx``: (logits (n, vocab) of ``ids`` after the cache ``past``, the new cache)."""
    import numpy as np

    feeds = {"input_ids": np.array([ids], dtype=np.int64), **slots}
    feeds.update({f"past.{i}": p for i, p in enumerate(past)})
    out = session.run(None, feeds)
    return out[0][0], out[1:]


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Export:
    """The parts of an export's ``manifest.json`` a runner needs (exporters/manifest.py writes it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise Refused(f"{folder}: no manifest.json; not an export folder")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("schema") != MANIFEST_SCHEMA:
            raise Refused(f"{path}: not a {MANIFEST_SCHEMA} manifest")
        if raw["runtime"] != "onnxruntime":
            raise Refused(f"export {raw['export_id']} is for {raw['runtime']}; this runner runs ONNX exports")
        self.raw = raw
        self.export_id: str = raw["export_id"]
        self.tasks: list[str] = raw["tasks"]
        self.files: list[dict] = raw["files"]
        self.switchable = bool(raw["task_tensors"])
        self.model: dict = raw["model"]

    def entry(self, role: str, task: str | None = None) -> dict:
        for f in self.files:
            if f["role"] == role and f.get("task") == task:
                return f
        raise Refused(f"export {self.export_id}: no {role} file" + (f" for task {task!r}" if task else ""))

    def bytes_of(self, role: str) -> int:
        return sum(f["bytes"] for f in self.files if f["role"] == role)

    def resident_bytes(self) -> int:
        return self.bytes_of("program") + self.bytes_of("task_decoder")

    def task_bytes(self, task: str) -> int:
        return self.entry("task", task)["bytes"] if self.switchable else 0

    def verified_task_file(self, task: str) -> str:
        """The task file's path after checking its size and SHA-256 against the manifest."""
        if task not in self.tasks:
            raise Refused(f"task {task!r} is not in export {self.export_id} (tasks: {', '.join(self.tasks)})")
        entry = self.entry("task", task)
        path = os.path.join(self.folder, entry["path"])
        if not os.path.isfile(path):
            raise Refused(f"{path}: task file for {task!r} is missing")
        if os.path.getsize(path) != entry["bytes"]:
            raise Refused(f"{path}: {os.path.getsize(path)} bytes, but the export wrote {entry['bytes']} for task {task!r}")
        if _sha256(path) != entry["sha256"]:
            raise Refused(f"{path}: SHA-256 does not match export {self.export_id}'s task {task!r}; refusing to load it")
        return path


class OrtRunner:
    """ONNX Runtime session on the export; the KV cache is explicit (``past.*`` in, ``present.*`` out)."""

    def __init__(self, export: Export, threads: int) -> None:
        import numpy as np

        self.np, self.export, self.threads = np, export, threads
        t0 = time.perf_counter()
        self.session = open_ort_session(os.path.join(export.folder, export.entry("program")["path"]), threads)
        self.task_decoder = None
        if export.switchable:
            self.task_decoder = open_ort_session(os.path.join(export.folder, export.entry("task_decoder")["path"]), threads)
        self.session_ms = (time.perf_counter() - t0) * 1e3
        m = export.model
        self.past_shape = (1, m["kv_heads"], 0, m["head_dim"])
        self.n_kv = 2 * m["n_layers"]
        self.eos = set(m["eos_token_id"])
        self.slots: dict[str, dict] = {}
        self.feeds: dict = {}

    def load_task(self, task: str) -> float:
        """Verify and read the task file, decode its slots once; milliseconds."""
        t0 = time.perf_counter()
        if not self.export.switchable:
            if task not in self.export.tasks:
                raise Refused(f"this merged export serves only {self.export.tasks[0]!r}, not {task!r}")
        else:
            self.slots[task] = decoded_slots(self.task_decoder, self.export.verified_task_file(task))
        return (time.perf_counter() - t0) * 1e3

    def set_task(self, task: str) -> float:
        """Make a loaded task active: the decoder step is fed its slots from now on; milliseconds."""
        t0 = time.perf_counter()
        if self.export.switchable:
            self.feeds = self.slots[task]
        return (time.perf_counter() - t0) * 1e3

    def _step(self, ids: list[int], past: list) -> tuple:
        return decoder_step(self.session, ids, self.feeds, past)

    def greedy(self, prompt: list[int], max_new: int) -> dict:
        """Greedy decoding; stops at an end-of-sequence token of the manifest or after ``max_new``."""
        np = self.np
        past = [np.zeros(self.past_shape, dtype=np.float32) for _ in range(self.n_kv)]
        t0 = time.perf_counter()
        logits, past = self._step(prompt, past)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        rows = [logits[-1]]
        tokens: list[int] = []
        decode_ms: list[float] = []
        token = int(np.argmax(rows[-1]))
        while True:
            tokens.append(token)
            if token in self.eos or len(tokens) >= max_new:
                break
            t0 = time.perf_counter()
            logits, past = self._step([token], past)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            rows.append(logits[-1])
            token = int(np.argmax(rows[-1]))
        return {"tokens": tokens, "prefill_ms": prefill_ms, "decode_ms": decode_ms, "rows": np.stack(rows).astype(np.float32)}


def run(request: dict, target: str, latency_kind: str) -> tuple[dict, dict]:
    """The response and the logits arrays (``"<entry>/<output>"`` -> rows) for one request."""
    out: dict = {"protocol": PROTOCOL}
    arrays: dict = {}
    try:
        if request.get("protocol") != PROTOCOL:
            raise Refused(f"request protocol is {request.get('protocol')!r}, expected {PROTOCOL}")
        export = Export(request["export"])
        threads = int(request.get("threads", 1))
        max_new = int(request["max_new_tokens"])
        prompts = request.get("prompts") or {}
        keep = int(request.get("logits_examples", 0))
        samples = max(1, int(request.get("switch_samples", 1)))
        runner = OrtRunner(export, threads)
        import onnxruntime

        out.update({
            "target": target, "runtime": f"onnxruntime {onnxruntime.__version__}", "export_id": export.export_id,
            "latency_kind": latency_kind, "threads": threads, "resident_bytes": export.resident_bytes(),
            "all_tasks_bytes": export.bytes_of("task"), "session_ms": runner.session_ms,
            "machine": platform.machine(), "python": platform.python_version(), "extensions": EXTENSIONS,
        })
        entries = []
        previous = None
        for index, task in enumerate(request["tasks"]):
            entry: dict = {"task": task, "task_bytes": export.task_bytes(task), "load_ms": runner.load_task(task)}
            times = []
            for _ in range(samples):
                runner.set_task(previous or task)
                times.append(runner.set_task(task))
            entry["switch_ms"] = statistics.median(times)
            outputs = []
            for i, ids in enumerate(prompts.get(task, [])):
                g = runner.greedy([int(t) for t in ids], max_new)
                o = {"prompt_tokens": len(ids), "tokens": g["tokens"], "prefill_ms": g["prefill_ms"],
                     "decode_ms_per_token": statistics.median(g["decode_ms"]) if g["decode_ms"] else None,
                     "decode_ms": g["decode_ms"]}
                if i < keep:
                    o["logits_key"] = f"{index}/{i}"
                    arrays[o["logits_key"]] = g["rows"]
                outputs.append(o)
            entry["outputs"] = outputs
            entries.append(entry)
            previous = task
        out["tasks"] = entries
        out["peak_rss_mb"] = _peak_rss_mb()
    except Refused as e:
        out = {"protocol": PROTOCOL, "error": f"Refused: {e}"}
        arrays = {}
    except Exception as e:  # the host reads the error; the runner must always answer
        out = {"protocol": PROTOCOL, "error": f"{type(e).__name__}: {e}"}
        arrays = {}
    return out, arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hydraopt device runner (ONNX Runtime)")
    parser.add_argument("request")
    parser.add_argument("response")
    parser.add_argument("--target", default=platform.machine())
    parser.add_argument("--latency-kind", default="measured", choices=["measured", "emulated", "estimated"])
    args = parser.parse_args(argv)
    try:
        with open(args.request, encoding="utf-8") as f:
            request = json.load(f)
    except (OSError, ValueError) as e:
        request = {"protocol": f"unreadable request: {e}"}
    response, arrays = run(request, args.target, args.latency_kind)
    if arrays:
        import numpy as np

        npz = args.response + ".npz"
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(npz + ".tmp", npz)
        response["logits_file"] = os.path.basename(npz)
    with open(args.response + ".tmp", "w", encoding="utf-8") as f:
        json.dump(response, f)
    os.replace(args.response + ".tmp", args.response)  # written whole, then renamed
    return 1 if "error" in response else 0


if __name__ == "__main__":
    sys.exit(main())
