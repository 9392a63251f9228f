"""What a device target is: data (name, summary, what it needs, how its latency is to be read, its
parity tolerance) plus a readiness check and idempotent set-up steps. Each target module
(``arm64``, ``qnn_htp``, ``ethos_u``) defines one :class:`Target`; ``registry.py`` maps names to them.

Set-up installs into ``<cache>/targets/<name>`` (``$HYDRAOPT_CACHE`` or ``~/.cache/hydraopt-mobile``)
from package registries only: each step leaves a stamp naming what it installed, and a step whose
stamp matches is skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # what is there, or what is missing
    command: str = ""  # what makes it ready ("" when ready)


@dataclass(frozen=True)
class Step:
    """One idempotent set-up step; ``key`` names what it installs (a changed key re-runs it)."""

    name: str
    key: str
    run: Callable[[Path], dict]  # (target folder) -> facts recorded in the stamp


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    needs: str  # what the set-up installs, and from where
    latency_kind: str  # "measured" | "emulated" | "estimated"
    tolerance: str  # parity with the host fp32 export that the tests hold it to
    on_phone: str  # what the same harness does on a real phone
    steps: Callable[[], list[Step]]
    check: Callable[[Path], Readiness]  # (target folder) -> readiness, cheap: runs nothing heavy
    # (target folder, export runtime) -> (argv that starts the target's Python for that runtime's
    # exports, its environment); None: no device runner
    python: Callable[[Path, str], tuple[list[str], dict[str, str]]] | None = None
    # (target folder, export runtime) -> whether exports of that runtime run here; None: ``check``
    runtime_check: Callable[[Path, str], Readiness] | None = None
    emulator: Callable[[Path], str] | None = None  # (target folder) -> emulator version, if emulated

    def folder(self) -> Path:
        return targets_root() / self.name

    def readiness(self) -> Readiness:
        return self.check(self.folder())

    def setup(self, progress: bool = True) -> dict:
        """Run the steps whose stamps are missing or stale; returns ``{step: seconds or "cached"}``."""
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        done: dict[str, float | str] = {}
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, disable=not progress, transient=False) as bar:
            for step in self.steps():
                stamp = folder / f".step-{step.name}.json"
                if stamp.is_file() and json.loads(stamp.read_text()).get("key") == step.key:
                    done[step.name] = "cached"
                    bar.add_task(f"[dim]{self.name}: {step.name} (cached)", total=1, completed=1)
                    continue
                job = bar.add_task(f"{self.name}: {step.name}", total=None)
                t0 = time.perf_counter()
                facts = step.run(folder)
                done[step.name] = round(time.perf_counter() - t0, 1)
                stamp.write_text(json.dumps({"key": step.key, "seconds": done[step.name], **facts}, indent=1))
                bar.update(job, total=1, completed=1, description=f"{self.name}: {step.name} ({done[step.name]} s)")
        return done


def step_facts(folder: Path, step: str) -> dict | None:
    """What a finished step recorded (None if it has not run)."""
    stamp = folder / f".step-{step}.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def targets_root() -> Path:
    """``$HYDRAOPT_CACHE/targets``, else ``~/.cache/hydraopt-mobile/targets``."""
    env = os.environ.get("HYDRAOPT_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "hydraopt-mobile") / "targets"
