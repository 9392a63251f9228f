"""What the benchmark scripts share: the checkout on ``sys.path``, and where things are in it.

The scripts run as ``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``
and ``from common import ...`` finds this module. Importing it puts the checkout's root there as
well, so a script then imports ``hydraopt_mobile``, ``exporters`` and other scripts
(``benchmarks.NAME``) from this checkout, installed or not: import it before those.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"  # the committed records (JSON, with .md and .png beside them)
SUITE_ADAPTERS = ROOT / "hydraopt_mobile" / "suite" / "adapters"  # <init>/<task>/: the committed trained adapters


def burst(session, tokens: int) -> float:
    """ms per token over ``tokens`` decode steps after a 16-token prefill (``session``: anything with
    ``prefill(ids)`` and ``decode(token)``, as :class:`exporters.backend.Session`)."""
    session.prefill(list(range(1, 17)))
    start = time.perf_counter()
    for t in range(tokens):
        session.decode(100 + t)
    return (time.perf_counter() - start) * 1e3 / tokens


def ready_target(name: str):
    """The device target ``name`` (``exporters.targets.registry``); exits with why it is not ready
    and the command that makes it ready when it is not."""
    from exporters.targets.registry import get_target

    target = get_target(name)
    ready = target.readiness()
    if not ready.ready:
        sys.exit(f"{name} is not ready: {ready.reason} ({ready.command})")
    return target


def open_lock(path: Path | None) -> int | None:
    """The file descriptor of the machine's CPU lock file ``path`` for :func:`cpu_lock`, creating the
    file where it is missing (a fresh machine has none); None when no lock is asked for."""
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644) if path else None


@contextlib.contextmanager
def cpu_lock(fd: int | None, mode: int) -> Iterator[float]:
    """Hold the machine's CPU lock (``flock(2)`` on ``fd``) in ``mode`` (``fcntl.LOCK_SH`` to export
    or score beside other jobs, ``fcntl.LOCK_EX`` to time; nothing when ``fd`` is None); yields the
    seconds spent waiting for it."""
    if fd is None:
        yield 0.0
        return
    t0 = time.time()
    fcntl.flock(fd, mode)
    try:
        yield round(time.time() - t0, 1)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def time_in_two_processes(cmd: list[str], fd: int | None) -> tuple[dict[str, list[float]], list[dict]]:
    """Run ``cmd`` (a script's own timing mode, printing ``{session: [ms/token per round]}`` as its
    last line) in two fresh processes, the second with ``--reverse`` (its sessions opened in the
    opposite order: within a process the session opened first decodes slower, slot_overhead.py),
    each under the exclusive CPU lock ``fd``; returns the rounds of both pooled per session, and each
    process's order, lock wait and seconds."""
    times: dict[str, list[float]] = {}
    conditions = []
    for reverse in (False, True):
        with cpu_lock(fd, fcntl.LOCK_EX) as waited:
            started = time.time()
            out = subprocess.run(cmd + (["--reverse"] if reverse else []), check=True, capture_output=True, text=True).stdout
            conditions.append({"order": "reversed" if reverse else "as given", "lock_wait_s": waited, "seconds": round(time.time() - started, 1)})
        for key, rounds in json.loads(out.strip().splitlines()[-1]).items():
            times.setdefault(key, []).extend(rounds)
    return times, conditions


def machine_probe() -> dict:
    """What a timing depends on besides the code, for timing records: the CPU model, its widest
    vector extension, the cores, and two speeds measured now on one thread (a pure-Python loop, as
    in an export's tracing; an fp32 matmul, as in a merge or a decode step). Machines of the pool
    differ: on 2026-12-03 the same exports took 1.8x as long as on 2026-12-02 (export_reuse.json),
    and only records carrying these figures can say how much of a change is the machine's."""
    import torch

    flags = f" {_cpuinfo('flags') or _cpuinfo('Features')} "  # x86 names them flags, aarch64 Features
    isa = next((name for name in ("avx512f", "avx2", "asimd") if f" {name} " in flags), "unknown")
    t0 = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    python_ns = (time.perf_counter() - t0) / 2_000_000 * 1e9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(512, 512)
        x @ x
        t0 = time.perf_counter()
        for _ in range(20):
            x @ x
        gflops = 20 * 2 * 512**3 / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)
    return {"cpu": cpu_model(), "isa": isa, "cores": os.cpu_count(), "python_loop_ns_per_iter": round(python_ns, 1),
            "matmul_gflops_1_thread": round(gflops, 1)}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for timing records: machines differ between runs."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpuinfo(field: str) -> str:
    """The value of the first ``field`` line of ``/proc/cpuinfo``, or '' where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def adapter_digests(folder: Path) -> dict[str, str]:
    """Task -> SHA-256 of its ``adapter_model.safetensors`` under ``folder``: which adapters a
    record was measured on. Training is not bit-reproducible across machines (the same command
    on another CPU gives other weights), so a resumable script must not add records measured on
    retrained adapters to records of the earlier ones."""
    from hydraopt_mobile.checksum import sha256_file

    return {p.name: sha256_file(p / "adapter_model.safetensors") for p in sorted(folder.iterdir()) if (p / "adapter_model.safetensors").exists()}


def resumable_records(records: list[dict], recorded: dict[str, dict[str, str]], init: str, digests: dict[str, str], forget: bool, path: Path) -> list[dict]:
    """``records`` without those of ``init`` when ``forget``; refuses (naming ``path`` and the tasks)
    when ``init``'s records were measured on adapters other than ``digests`` (``recorded``: the
    results file's init -> task -> SHA-256). Records from before digests were recorded are kept."""
    if forget:
        return [r for r in records if r.get("init") != init]
    old = recorded.get(init)
    if old is not None and old != digests and any(r.get("init") == init for r in records):
        differ = sorted(t for t in old.keys() | digests.keys() if old.get(t) != digests.get(t))
        sys.exit(f"{path}: its {init} records were measured on other adapters (SHA-256 differ for {', '.join(differ)}); "
                 f"pass --forget-init {init} to drop them and measure these adapters")
    return records


def readme_block(body: str, begin: str, end: str, text: str) -> str:
    """``body`` (the README's text) with what lies between the markers ``begin`` and ``end`` replaced by
    ``text`` (a script's generated table); ``body`` unchanged when it lacks either marker."""
    if begin not in body or end not in body:
        return body
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}{end}{tail}"


def is_record_of(record: dict | None, bank) -> bool:
    """Whether a frontier record was measured on ``bank`` (a MergedBank): the same file bytes and every
    task's relative error within 1e-6 (another CPU type or thread count can round a merge into
    another bank of the same bytes)."""
    return record is not None and record.get("file_bytes") == bank.total_file_bytes() and all(abs(record["rel_errors"][t] - e) <= 1e-6 for t, e in bank.rel_errors.items())
