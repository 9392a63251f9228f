"""What the benchmark scripts share: the checkout on ``sys.path``, and where things are in it.

The scripts run as ``python benchmarks/NAME.py``, so Python puts this folder first on ``sys.path``
and ``from common import ...`` finds this module. Importing it puts the checkout's root there as
well, so a script then imports ``hydraopt_mobile``, ``exporters`` and other scripts
(``benchmarks.NAME``) from this checkout, installed or not: import it before those.
"""

from __future__ import annotations

import sys
from pathlib import Path

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
