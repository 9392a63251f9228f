"""What the benchmark scripts share: the checkout on ``sys.path``, and where things are in it.

The scripts run as ``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``
and ``from common import ...`` finds this module. Importing it puts the checkout's root there as
well, so a script then imports ``hydraopt_mobile``, ``exporters`` and other scripts
(``benchmarks.NAME``) from this checkout, installed or not: import it before those.
"""

from __future__ import annotations

import contextlib
import fcntl
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"  # the committed records (JSON, with .md and .png beside them)
SUITE_ADAPTERS = ROOT / "hydraopt_mobile" / "suite" / "adapters"  # <init>/<task>/: the committed trained adapters


def ready_target(name: str):
    """The device target ``name`` (``exporters.targets.registry``); exits with why it is not ready
    and the command that makes it ready when it is not."""
    from exporters.targets.registry import get_target

    target = get_target(name)
    ready = target.readiness()
    if not ready.ready:
        sys.exit(f"{name} is not ready: {ready.reason} ({ready.command})")
    return target


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for timing records: machines differ between runs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
