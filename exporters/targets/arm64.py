"""``arm64-cpu``: ONNX exports on ONNX Runtime's aarch64 build, under qemu-user emulation.

What the set-up assembles under ``<cache>/targets/arm64-cpu`` (about 230 MB, from Debian's and
PyPI's registries only):

- ``qemu/qemu-aarch64``: from Debian 13's ``qemu-user`` (10.x, statically linked, runs as it is).
  Debian 12's qemu 7.2 segfaults importing onnxruntime (FIELD_NOTES).
- ``root/``: a minimal Debian 12 arm64 root, just ``python3.11-minimal``, ``libpython3.11-stdlib``,
  ``libstdc++6`` and their dependency closure (about 75 MB), unpacked with ``dpkg-deb -x``.
  No debootstrap: nothing in the root ever has to run except Python.
- ``site/``: ``onnxruntime`` and ``numpy`` aarch64 wheels at the host's versions (the parity
  reference is the host's ONNX Runtime), ``pip install --target --platform manylinux_2_28_aarch64``.

Runs are ``qemu-aarch64 -L root root/usr/bin/python3.11 device_runner.py ...``: every instruction of
the runtime and its kernels (MLAS's NEON paths) is aarch64 code, emulated. Latencies are therefore
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
from exporters.targets.registry import Readiness, Step, Target, step_facts

NAME = "arm64-cpu"
QEMU_SUITE = "trixie"
ROOT_SUITE = "bookworm"
ROOT_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
PYTHON = "3.11"
PLATFORM = "manylinux_2_28_aarch64"
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


def qemu_path(folder: Path) -> Path:
    return folder / "qemu" / "qemu-aarch64"


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


def _wheels(folder: Path) -> dict:
    tmp = folder / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
           "--platform", PLATFORM, "--python-version", PYTHON, "--implementation", "cp", "--only-binary=:all:",
           *wheel_pins()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not fetch the aarch64 wheels: {r.stderr.strip()[-1500:]}")
    _replace_dir(tmp, folder / "site")
    return {"wheels": wheel_pins(), "platform": PLATFORM}


def _smoke(folder: Path) -> dict:
    """Import the runtime on the emulated CPU: proves the three parts fit together."""
    code = "import platform, onnxruntime, numpy; print(platform.machine(), onnxruntime.__version__, numpy.__version__)"
    r = subprocess.run([*command_prefix(folder), "-c", code], capture_output=True, text=True, env=runner_env(folder), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"onnxruntime does not import on the emulated arm64 CPU: {r.stderr.strip()[-1500:]}")
    machine, ort, np = r.stdout.split()
    if machine != "aarch64":
        raise RuntimeError(f"expected an aarch64 Python under qemu, got {machine}")
    return {"machine": machine, "onnxruntime": ort, "numpy": np}


def steps() -> list[Step]:
    pins = " ".join(wheel_pins())
    return [
        Step("qemu", f"{QEMU_SUITE} qemu-user", _qemu),
        Step("root", f"{ROOT_SUITE} arm64 {' '.join(ROOT_PACKAGES)}", _root),
        Step("wheels", f"{PLATFORM} cp{PYTHON} {pins}", _wheels),
        Step("smoke", f"{QEMU_SUITE} | {ROOT_SUITE} | {pins}", _smoke),
    ]


def check(folder: Path) -> Readiness:
    missing = debian.missing_tools()
    if missing:
        return Readiness(False, f"{', '.join(missing)} not on PATH: the emulator and the arm64 root come from Debian packages",
                         "run on a Debian or Ubuntu host (apt-get, dpkg-deb)")
    stale = [s.name for s in steps() if (step_facts(folder, s.name) or {}).get("key") != s.key]
    if stale:
        what = {"qemu": "qemu-aarch64", "root": "arm64 root", "wheels": "onnxruntime/numpy aarch64 wheels " + " ".join(wheel_pins()),
                "smoke": "import check"}
        return Readiness(False, f"not set up in {folder}: " + ", ".join(what[s] for s in stale), SETUP_COMMAND)
    for path in (qemu_path(folder), python_path(folder), folder / "site" / "onnxruntime"):
        if not path.exists():
            return Readiness(False, f"{path} is missing (the cache was changed after set-up)", SETUP_COMMAND)
    smoke = step_facts(folder, "smoke") or {}
    return Readiness(True, f"{emulator_version(folder)}, Python {PYTHON} arm64, onnxruntime {smoke.get('onnxruntime')}")


def emulator_version(folder: Path) -> str:
    """The qemu version and the emulated core, e.g. ``qemu-aarch64 version 10.0.13 (...), -cpu cortex-a76``."""
    r = subprocess.run([str(qemu_path(folder)), "--version"], capture_output=True, text=True, check=True)
    return f"{r.stdout.splitlines()[0].strip()}, -cpu {emulated_cpu()}"


def command_prefix(folder: Path) -> list[str]:
    """argv that starts the target's Python (append a script and its arguments)."""
    return [str(qemu_path(folder)), "-cpu", emulated_cpu(), "-L", str(folder / "root"), str(python_path(folder))]


def runner_env(folder: Path) -> dict[str, str]:
    """A clean environment: the host's Python variables must not leak into the target's Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(folder / "site")
    env["PYTHONNOUSERSITE"] = "1"
    return env


TARGET = Target(
    name=NAME,
    summary="ARM64 CPU, user-mode emulated: ONNX Runtime's aarch64 build (MLAS NEON kernels) under qemu-aarch64",
    needs="Debian 13 qemu-user (qemu-aarch64 only), a minimal Debian 12 arm64 root with Python 3.11, "
          "onnxruntime + numpy aarch64 wheels at the host's versions (PyPI); ~230 MB",
    latency_kind="emulated",
    tolerance="fp32: token-identical to the host's ONNX Runtime on the same export, logits within 1e-4",
    on_phone="the same device_runner.py with an aarch64 Python + onnxruntime (e.g. Termux), or the Android app over adb "
             "(same protocol): latencies are then measured",
    steps=steps,
    check=check,
    python=lambda folder: (command_prefix(folder), runner_env(folder)),
    emulator=emulator_version,
)
