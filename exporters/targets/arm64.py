"""``arm64-cpu``: ONNX exports on ONNX Runtime's aarch64 build and ExecuTorch exports on ExecuTorch's
aarch64 runtime (XNNPACK), under qemu-user emulation.

What the set-up assembles under ``<cache>/targets/arm64-cpu`` (about 230 MB, from Debian's and
PyPI's registries only):

- ``qemu/qemu-aarch64``: from Debian 13's ``qemu-user`` (10.x, statically linked, runs as it is).
  Debian 12's qemu 7.2 segfaults importing onnxruntime (FIELD_NOTES).
- ``root/``: a minimal Debian 12 arm64 root, just ``python3.11-minimal``, ``libpython3.11-stdlib``,
  ``libstdc++6`` and their dependency closure (about 75 MB), unpacked with ``dpkg-deb -x``.
  No debootstrap: nothing in the root ever has to run except Python.
- ``site/``: ``onnxruntime`` and ``numpy`` aarch64 wheels at the host's versions (the parity
  reference is the host's ONNX Runtime), ``pip install --target --platform manylinux_2_28_aarch64``.
- ``site-et/`` (ExecuTorch, about 870 MB): ``executorch==1.1.0`` and ``torch==2.10.0`` aarch64 for the
  same root, the newest pair whose torch is a CPU build on PyPI (torch 2.11 to 2.13 aarch64 are CUDA
  builds of 420 MB that need the CUDA libraries); the runner calls ExecuTorch's compiled bindings
  directly (``_load_program``, whose methods share the mutable buffers that ``set_slots`` writes).
  ``--no-deps`` with torch's run-time dependencies listed here, because pip evaluates torch's
  dependency markers for the host (x86_64: the CUDA packages). Tried and rejected (commands in the
  issue note): ``executorch==1.0.1`` + ``torch==2.9.1`` loads our ``.pte`` but its XNNPACK does not
  compile the 1.5.1 exporter's delegate ("XNNCompiler.cpp: Unhandled node type", error 0x11);
  PyPI's ``executorch-numpy-runtime`` 1.4.0 (ExecuTorch 1.3.1, no torch, Python >= 3.12) runs
  ``forward`` exactly but gives each method its own memory arenas, so ``set_slots`` never reaches
  ``forward``: no task switching. The ExecuTorch steps come last: without them the target is ready
  for ONNX exports and refuses ExecuTorch exports with its reason.

Runs are ``qemu-aarch64 -L root root/usr/bin/python3.11 device_runner.py ...`` with ``site`` (ONNX) or
``site-et`` (ExecuTorch) on ``PYTHONPATH``: every instruction of
the runtime and its kernels (MLAS's or XNNPACK's NEON paths) is aarch64 code, emulated. Latencies are therefore
emulated: they say nothing about a phone's speed and are labelled so.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from exporters.targets import debian
from exporters.targets.target import Readiness, Step, Target, step_facts

NAME = "arm64-cpu"
QEMU_SUITE = "trixie"
ROOT_SUITE = "bookworm"
ROOT_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
PYTHON = "3.11"
PLATFORM = "manylinux_2_28_aarch64"
# ExecuTorch's runtime for the same root (module docstring) and what ``import torch`` needs.
ET_PINS = ["executorch==1.1.0", "torch==2.10.0"]
TORCH_RUNTIME_DEPS = ["typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "MarkupSafe", "fsspec", "filelock"]
SETUP_COMMAND = f"hydraopt targets setup {NAME}"
# The emulated core. qemu-user's default ("max") offers every feature qemu knows (SVE2, SME2, i8mm),
# which ONNX Runtime's kernels would pick and which most phones lack. Cortex-A76 (Armv8.2-A with
# dot product and fp16 arithmetic; big cores of phones since 2019) is the baseline used here;
# HYDRAOPT_ARM64_CPU picks another (`qemu-aarch64 -cpu help`: cortex-a55, cortex-a710, neoverse-n2, ...).
DEFAULT_CPU = "cortex-a76"


def emulated_cpu() -> str:
    return os.environ.get("HYDRAOPT_ARM64_CPU", DEFAULT_CPU)


def wheel_pins() -> list[str]:
    """onnxruntime and numpy at the host's versions: the target runs what the host reference runs."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in ("onnxruntime", "numpy")]


def et_wheel_pins() -> list[str]:
    """ExecuTorch + torch, and numpy and torch's dependencies at the host's versions."""
    return ET_PINS + [f"{p}=={importlib.metadata.version(p)}" for p in ("numpy", *TORCH_RUNTIME_DEPS)]


def qemu_path(folder: Path) -> Path:
    return folder / "qemu" / "qemu-aarch64"


# Per export runtime: the site folder on the target Python's path, and the package that must be in it.
SITES = {"onnxruntime": ("site", "onnxruntime"), "executorch": ("site-et", "executorch")}


def python_path(folder: Path) -> Path:
    return folder / "root" / "usr" / "bin" / f"python{PYTHON}"


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _qemu(folder: Path) -> dict:
    tree = folder / "apt" / f"{QEMU_SUITE}-host"
    opts = debian.apt_tree(tree, QEMU_SUITE)
    debian.update(opts)
    debs = debian.download(opts, tree / "debs", ["qemu-user"])
    tmp = folder / "qemu.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unpacked = folder / "qemu.unpack"
    shutil.rmtree(unpacked, ignore_errors=True)
    debian.extract(debs[0], unpacked)
    tmp.mkdir()
    shutil.copy2(unpacked / "usr/bin/qemu-aarch64", tmp / "qemu-aarch64")
    shutil.rmtree(unpacked)
    version = debian.package_version(debs[0])
    for deb in debs:  # 70 MB; only the one binary is kept
        deb.unlink()
    _replace_dir(tmp, folder / "qemu")
    return {"package": version, "qemu": emulator_version(folder)}


def _root(folder: Path) -> dict:
    tree = folder / "apt" / f"{ROOT_SUITE}-arm64"
    opts = debian.apt_tree(tree, ROOT_SUITE, arch="arm64")
    debian.update(opts)
    debs = debian.download_closure(opts, tree, ROOT_PACKAGES)
    tmp = folder / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    versions = []
    for deb in debs:
        debian.extract(deb, tmp)
        versions.append(debian.package_version(deb))
        deb.unlink()
    _replace_dir(tmp, folder / "root")
    return {"suite": ROOT_SUITE, "packages": versions}


def _pip_target(folder: Path, name: str, pins: list[str], *options: str) -> dict:
    tmp = folder / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
           "--platform", PLATFORM, "--python-version", PYTHON, "--implementation", "cp", "--only-binary=:all:", *options, *pins]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not fetch the aarch64 wheels {' '.join(pins)}: {r.stderr.strip()[-1500:]}")
    _replace_dir(tmp, folder / name)
    return {"wheels": pins, "platform": PLATFORM}


def _wheels(folder: Path) -> dict:
    return _pip_target(folder, "site", wheel_pins())


def _et_wheels(folder: Path) -> dict:
    return _pip_target(folder, "site-et", et_wheel_pins(), "--no-deps")


def _import_check(folder: Path, runtime: str, code: str) -> list[str]:
    """Run ``code`` on the emulated CPU with ``runtime``'s Python; its output's words (the first:
    ``platform.machine()``, checked to be aarch64)."""
    python, env = runner(folder, runtime)
    r = subprocess.run([*python, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{runtime} does not import on the emulated arm64 CPU: {r.stderr.strip()[-1500:]}")
    words = r.stdout.split()
    if not words or words[0] != "aarch64":
        raise RuntimeError(f"expected an aarch64 Python under qemu, got {r.stdout.strip()[:200]!r}")
    return words


def _smoke(folder: Path) -> dict:
    """Import the runtime on the emulated CPU: proves the three parts fit together."""
    code = "import platform, onnxruntime, numpy; print(platform.machine(), onnxruntime.__version__, numpy.__version__)"
    machine, ort, np = _import_check(folder, "onnxruntime", code)
    return {"machine": machine, "onnxruntime": ort, "numpy": np}


def _et_smoke(folder: Path) -> dict:
    """Import ExecuTorch's bindings on the emulated CPU (as the runner does) and check that XNNPACK
    is registered."""
    code = ("import platform, importlib.metadata as m, torch, executorch.extension.pybindings._portable_lib as et; "
            "print(platform.machine(), m.version('executorch'), torch.__version__, int('XnnpackBackend' in et._get_registered_backend_names()))")
    machine, et, torch, xnnpack = _import_check(folder, "executorch", code)
    if xnnpack != "1":
        raise RuntimeError(f"executorch {et} on arm64 has no XNNPACK backend")
    return {"machine": machine, "executorch": et, "torch": torch}


def steps() -> list[Step]:
    pins, et_pins = " ".join(wheel_pins()), " ".join(et_wheel_pins())
    return [
        Step("qemu", f"{QEMU_SUITE} qemu-user", _qemu),
        Step("root", f"{ROOT_SUITE} arm64 {' '.join(ROOT_PACKAGES)}", _root),
        Step("wheels", f"{PLATFORM} cp{PYTHON} {pins}", _wheels),
        Step("smoke", f"{QEMU_SUITE} | {ROOT_SUITE} | {pins}", _smoke),
        # ExecuTorch, last: a failure here leaves the target ready for ONNX exports
        Step("et-wheels", f"{PLATFORM} cp{PYTHON} --no-deps {et_pins}", _et_wheels),
        Step("et-smoke", f"{QEMU_SUITE} | {ROOT_SUITE} | {et_pins}", _et_smoke),
    ]


# What each step installs, per runtime, and the file that must still be there afterwards.
PARTS = {
    "onnxruntime": {"qemu": "qemu-aarch64", "root": "arm64 root", "wheels": "onnxruntime/numpy aarch64 wheels", "smoke": "import check"},
    "executorch": {"et-wheels": f"{' + '.join(ET_PINS)} aarch64 wheels", "et-smoke": "ExecuTorch import check"},
}


def runtime_check(folder: Path, runtime: str) -> Readiness:
    """Whether exports of ``runtime`` run here (ExecuTorch needs the ONNX part's emulator too)."""
    if runtime not in SITES:
        return Readiness(False, f"arm64-cpu runs {' and '.join(SITES)} exports, not {runtime}", "")
    missing = debian.missing_tools()
    if missing:
        return Readiness(False, f"{', '.join(missing)} not on PATH: the emulator and the arm64 root come from Debian packages",
                         "run on a Debian or Ubuntu host (apt-get, dpkg-deb)")
    parts = {**PARTS["onnxruntime"], **PARTS[runtime]}
    stale = [s.name for s in steps() if s.name in parts and (step_facts(folder, s.name) or {}).get("key") != s.key]
    if stale:
        return Readiness(False, f"not set up in {folder}: " + ", ".join(parts[s] for s in stale), SETUP_COMMAND)
    site, package = SITES[runtime]
    for path in (qemu_path(folder), python_path(folder), folder / site / package):
        if not path.exists():
            return Readiness(False, f"{path} is missing (the cache was changed after set-up)", SETUP_COMMAND)
    if runtime == "onnxruntime":
        return Readiness(True, f"onnxruntime {step_facts(folder, 'smoke').get('onnxruntime')} (Python {PYTHON})")
    facts = step_facts(folder, "et-smoke")
    return Readiness(True, f"executorch {facts.get('executorch')} (torch {facts.get('torch')}, Python {PYTHON})")


def check(folder: Path) -> Readiness:
    """Ready when ONNX exports run; the reason also says whether ExecuTorch exports do."""
    onnx = runtime_check(folder, "onnxruntime")
    if not onnx.ready:
        return onnx
    et = runtime_check(folder, "executorch")
    et_text = et.reason if et.ready else f"ExecuTorch exports not ready: {et.reason} ({et.command})"
    return Readiness(True, f"{emulator_version(folder)}; {onnx.reason}; {et_text}")


def emulator_version(folder: Path) -> str:
    """The qemu version and the emulated core, e.g. ``qemu-aarch64 version 10.0.13 (...), -cpu cortex-a76``."""
    r = subprocess.run([str(qemu_path(folder)), "--version"], capture_output=True, text=True, check=True)
    return f"{r.stdout.splitlines()[0].strip()}, -cpu {emulated_cpu()}"


def runner(folder: Path, runtime: str) -> tuple[list[str], dict[str, str]]:
    """argv that starts the target's Python for ``runtime``'s exports (append a script and its
    arguments), and a clean environment: the host's Python variables must not leak into it."""
    argv = [str(qemu_path(folder)), "-cpu", emulated_cpu(), "-L", str(folder / "root"), str(python_path(folder))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(folder / SITES[runtime][0])
    env["PYTHONNOUSERSITE"] = "1"
    return argv, env


TARGET = Target(
    name=NAME,
    summary="ARM64 CPU, user-mode emulated: ONNX Runtime's aarch64 build (MLAS NEON kernels) and ExecuTorch's "
            "aarch64 runtime (XNNPACK) under qemu-aarch64",
    needs="Debian 13 qemu-user (qemu-aarch64 only), a minimal Debian 12 arm64 root with Python 3.11, "
          "onnxruntime + numpy aarch64 wheels at the host's versions (PyPI); ~230 MB; for ExecuTorch exports "
          f"{' + '.join(ET_PINS)} aarch64 (CPU build) for the same root (PyPI); ~870 MB more",
    latency_kind="emulated",
    tolerance="fp32 and ExecuTorch 8da4w: token-identical to the host's runtime (ONNX Runtime, or the exporter's "
              "ExecuTorch for .pte) on the same export, logits within 1e-4; ONNX int4/int8 logits within 0.05 "
              "(tiny test models; on SmolLM2 the ExecuTorch 4-bit programs' int8 activation kernels differ from x86's: "
              "logits within ~5, judged by score)",
    on_phone="the same device_runner.py with an aarch64 Python + onnxruntime (e.g. Termux), or the Android app over adb "
             "(same protocol): latencies are then measured",
    steps=steps,
    check=check,
    python=runner,
    runtime_check=runtime_check,
    emulator=emulator_version,
)
