"""``ethos-u``: Arm Ethos-U55 and Ethos-U85 NPUs through ExecuTorch's Arm backend, estimated.

What the set-up installs under ``<cache>/targets/ethos-u/site`` (about 200 MB, PyPI only): the pins
of executorch's own ``ethos-u`` extra, ``ethos-u-vela`` (Arm's NPU compiler, whose performance
estimator gives the cycles and memory) and ``tosa-tools`` (the TOSA reference model, which runs a
lowered TOSA graph with the integer numerics the NPU implements), with ``--no-deps``: their
dependencies (numpy, flatbuffers, ml_dtypes) are the project's. The extra also pins
``ml_dtypes==0.5.1``; the project's 0.7 is used and works. The ExecuTorch Arm backend itself
(quantiser, partitioner, TOSA lowering) is in the project's ``executorch``: the target's Python is
the project's interpreter with ``site`` appended to ``sys.path`` in a subprocess, so nothing of the
target ever enters the project's ``.venv`` or the calling process.

What runs (``ethos_u_layer.py``, given its job by ``ethos_u_compile.py``): one decoder layer, PT2E-quantised for the NPU, lowered to TOSA
and compiled by Vela for each NPU configuration. There is no Corstone FVP (the NPU simulator) on
PyPI, so nothing runs the ``.pte`` itself: latency is Vela's estimate (``latency_kind
"estimated"``), numerics are the TOSA reference model's. One layer; no whole-model claim.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from exporters.targets.target import Readiness, Step, Target, step_facts
from hydraopt_mobile.errors import UserError

NAME = "ethos-u"
SCRIPT = Path(__file__).with_name("ethos_u_layer.py")
SETUP_COMMAND = f"hydraopt targets setup {NAME}"
NPUS = ("ethos-u55-128", "ethos-u85-256")
QUANTS = ("a8w8", "a16w8")
SITE_PACKAGES = ("ethos-u-vela", "tosa-tools")


def pins() -> list[str]:
    """Vela and the TOSA tools at the versions executorch's ``ethos-u`` extra pins."""
    reqs = importlib.metadata.requires("executorch") or []
    found = [r.split(";")[0].strip() for r in reqs if 'extra == "ethos-u"' in r and r.split("==")[0] in SITE_PACKAGES]
    if len(found) != len(SITE_PACKAGES):
        raise RuntimeError(f"executorch {importlib.metadata.version('executorch')} declares no ethos-u extra pins for {SITE_PACKAGES}")
    return sorted(found)


def site(folder: Path) -> Path:
    return folder / "site"


def _site(folder: Path) -> dict:
    tmp = folder / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(tmp), *pins()], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {' '.join(pins())}: {r.stderr.strip()[-1500:]}")
    if site(folder).exists():
        shutil.rmtree(site(folder))
    tmp.rename(site(folder))
    return {"pins": pins()}


def _smoke(folder: Path) -> dict:
    code = (f"import sys; sys.path.append({str(site(folder))!r}); import importlib.metadata as m; "
            "from ethosu import vela; import tosa_reference_model; "
            "from executorch.backends.arm import arm_vela; assert arm_vela.has_vela; "
            "print(m.version('ethos-u-vela'), m.version('tosa-tools'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"Vela or the TOSA reference model does not import: {r.stderr.strip()[-1500:]}")
    vela, tosa = r.stdout.split()[-2:]
    return {"vela": vela, "tosa_tools": tosa}


def steps() -> list[Step]:
    key = " ".join(pins())
    return [Step("site", key, _site), Step("smoke", key, _smoke)]


def check(folder: Path) -> Readiness:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return Readiness(False, "tosa-tools (the TOSA reference model) ships x86_64 Linux wheels only", "-")
    try:
        stale = [s.name for s in steps() if (step_facts(folder, s.name) or {}).get("key") != s.key]
    except RuntimeError as e:
        return Readiness(False, str(e), "pip install executorch (the project's pin)")
    if stale or not (site(folder) / "tosa_reference_model").exists():
        return Readiness(False, f"not set up in {folder}: {' and '.join(pins())} (--no-deps) in site/", SETUP_COMMAND)
    smoke = step_facts(folder, "smoke") or {}
    return Readiness(True, f"Vela {smoke.get('vela')} + TOSA reference model {smoke.get('tosa_tools')} "
                           f"(ExecuTorch {importlib.metadata.version('executorch')} Arm backend); no FVP: estimates only")


TARGET = Target(
    name=NAME,
    summary="Arm Ethos-U55/U85 NPUs via ExecuTorch's Arm backend: one decoder layer, Vela's cycle/memory estimate, "
            "the TOSA reference model's int8/int16 outputs",
    needs=f"a site folder (~200 MB, PyPI, --no-deps) with {' and '.join(pins())} beside the project's executorch",
    latency_kind="estimated",
    tolerance="tiny test layer at A8W8: TOSA reference output within 0.05 x the fp32 output's max, nearer its own task than "
              "the other, LoRA effect cosine > 0.95, switching back bit-identical; the real layer's errors are reported, not bounded "
              "(A8W8 rel. error ~0.24, LoRA effect cosine 0.51-0.90)",
    on_phone="not a phone NPU: the same .pte runs on a Cortex-M55/M85 + Ethos-U board (Corstone-300/320) with ExecuTorch's "
             "arm_executor_runner; no FVP or board here",
    steps=steps,
    check=check,
)


def ensure_ready() -> Path:
    """The target's folder; :class:`UserError` with the reason and the command when not ready."""
    if not (ready := TARGET.readiness()).ready:
        raise UserError(f"target {NAME} is not ready: {ready.reason}; make it ready: {ready.command}")
    return TARGET.folder()
