"""Separate virtual environments for the exporters users would pick instead of ours, for
``benchmarks/vs_optimum.py``: ``optimum-executorch`` and ``optimum-onnx``. Their pins conflict with
ours (``optimum-executorch 1.1.0`` pins ``transformers==5.0.0rc1``, ``optimum-onnx 0.1.0``
``transformers<4.58``; we run 5.24), so each gets its own venv under
``~/.cache/hydraopt-mobile/envs/<name>/``, never the project's.

    python benchmarks/optimum_envs.py [--only optimum-executorch] [--resolve-unpinned]

Idempotent: a venv whose marker (``hydraopt-env.json``) holds the same requirement list is kept
as it is; otherwise the folder is emptied and built again. The marker is written last (atomically),
once the install and its import check passed, so a venv without one is an interrupted build. The marker records every installed version (``pip freeze``) and the
venv's size on disk. PyPI only (through pip as configured here).

Both tools' pins are met with our own ``torch==2.13.0`` (the local CPU wheel) and
``executorch==1.5.1``: we pin them explicitly. Unpinned, pip takes the newest torch allowed
(``2.14.1`` from PyPI), a CUDA build with its ``nvidia-*`` wheels (GBs); ``--resolve-unpinned``
records that resolution (a dry run, nothing downloaded beyond metadata), and what installing each
tool into the project's own environment would replace (``transformers`` 5.24 -> 5.0.0rc1 or 4.57),
in ``benchmarks/results/optimum_envs.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydraopt_mobile.app.records import write_record  # noqa: E402
from hydraopt_mobile.atomic import write_text_atomic  # noqa: E402
from hydraopt_mobile.errors import UserError  # noqa: E402

ENVS_DIR = Path(os.environ.get("HYDRAOPT_ENVS", Path.home() / ".cache" / "hydraopt-mobile" / "envs"))
MARKER = "hydraopt-env.json"
NEED_FREE_GB = 6.0  # measured: the two venvs take about 2.5 + 1.5 GB, plus pip's unpacking room
RESULTS = ROOT / "benchmarks" / "results" / "optimum_envs.json"


@dataclass(frozen=True)
class EnvSpec:
    name: str
    requirements: tuple[str, ...]
    check: str  # Python run in the venv once installed: must exit 0
    unpinned: tuple[str, ...]  # what a user would type, for --resolve-unpinned

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.requirements, self.check]).encode()).hexdigest()[:16]


ENVS = {
    e.name: e
    for e in (
        EnvSpec(
            "optimum-executorch",
            ("torch==2.13.0", "executorch==1.5.1", "optimum-executorch==1.1.0"),
            "import torch, executorch, transformers, optimum.executorch; print(torch.__version__, transformers.__version__)",
            ("optimum-executorch==1.1.0",),
        ),
        EnvSpec(
            "optimum-onnx",
            ("torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "onnxscript==0.7.2"),
            "import torch, onnxruntime, transformers, optimum.exporters.onnx; print(torch.__version__, transformers.__version__)",
            ("optimum-onnx[onnxruntime]==0.1.0",),
        ),
    )
}


def python(name: str) -> Path:
    """The interpreter of env ``name`` (built or not)."""
    return ENVS_DIR / name / "bin" / "python"


def marker(name: str) -> dict | None:
    path = ENVS_DIR / name / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _run(cmd: list[str], what: str) -> str:
    """Run ``cmd``, streaming its output as progress; its output (for freeze)."""
    print(f"[envs] {what}: {' '.join(cmd)}", flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("Collecting", "Downloading", "Successfully", "ERROR")):
                print(f"[envs]   {line.rstrip()[:200]}", flush=True)
    if proc.returncode:
        print("".join(lines[-60:]), file=sys.stderr)
        raise UserError(f"envs: {what} failed (exit {proc.returncode}); output above")
    return "".join(lines)


def ensure(name: str) -> dict:
    """Build env ``name`` unless an up-to-date one is there; its marker (versions, size)."""
    spec = ENVS[name]
    have = marker(name)
    if have is not None and have.get("digest") == spec.digest() and python(name).exists():
        print(f"[envs] {name}: up to date ({ENVS_DIR / name})", flush=True)
        return have
    ENVS_DIR.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(ENVS_DIR).free / 1e9
    if free_gb < NEED_FREE_GB:
        raise UserError(f"envs: {ENVS_DIR} has {free_gb:.1f} GB free; building {name} needs about {NEED_FREE_GB} GB")
    folder = ENVS_DIR / name
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(folder)], f"{name}: venv")
    pip = [str(folder / "bin" / "python"), "-m", "pip"]
    _run(pip + ["install", "--progress-bar", "off", "--upgrade", "pip"], f"{name}: pip")
    _run(pip + ["install", "--progress-bar", "off", *spec.requirements], f"{name}: install {' '.join(spec.requirements)}")
    checked = _run([str(folder / "bin" / "python"), "-c", spec.check], f"{name}: import check").strip()
    freeze = _run(pip + ["freeze", "--all"], f"{name}: freeze").split()
    record = {
        "name": name, "digest": spec.digest(), "requirements": list(spec.requirements), "check": checked,
        "python": base, "versions": dict(line.split("==", 1) for line in freeze if "==" in line),
        "bytes_on_disk": _du_bytes(folder), "build_seconds": round(time.time() - t0, 1),
    }
    write_text_atomic(folder / MARKER, json.dumps(record, indent=1))
    print(f"[envs] {name}: ready in {record['build_seconds']} s, {record['bytes_on_disk'] / 1e9:.2f} GB", flush=True)
    return record


def resolve_unpinned(name: str) -> dict:
    """What pip would install for the tool alone (a dry run in a throwaway venv)."""
    spec = ENVS[name]
    with tempfile.TemporaryDirectory() as tmp:
        venv, report = Path(tmp) / "v", Path(tmp) / "report.json"
        _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], f"{name}: dry-run venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        _run(pip + ["install", "-q", "--upgrade", "pip"], f"{name}: pip")
        _run(pip + ["install", "--dry-run", "--ignore-installed", "--report", str(report), *spec.unpinned], f"{name}: dry run, unpinned")
        got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    cuda = sorted(n for n in got if n.startswith(("nvidia", "cuda", "triton")))
    return {"command": f"pip install {' '.join(spec.unpinned)}", "torch": got.get("torch"), "executorch": got.get("executorch"),
            "transformers": got.get("transformers"), "cuda_packages": cuda, "n_packages": len(got)}


def main_env_changes(name: str) -> dict:
    """What ``pip install <tool>`` into *this* interpreter's environment would change (a dry run:
    nothing is installed): package -> [installed, would be]. The reason the tools get their own venvs."""
    from importlib.metadata import PackageNotFoundError, version

    spec = ENVS[name]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _run([sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report), *spec.unpinned], f"{name}: dry run into our env")
        got = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    changes = {}
    for pkg, new in sorted(got.items()):
        try:
            changes[pkg] = [version(pkg), new]
        except PackageNotFoundError:
            changes[pkg] = [None, new]
    return {"command": f"{sys.executable} -m pip install --dry-run {' '.join(spec.unpinned)}",
            "downgrades_or_replaces": {k: v for k, v in changes.items() if v[0] is not None},
            "adds": sorted(k for k, v in changes.items() if v[0] is None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(ENVS), action="append", help="build only this env (repeatable)")
    ap.add_argument("--resolve-unpinned", action="store_true", help="also record what the tools pull unpinned (dry run)")
    args = ap.parse_args()
    names = args.only or sorted(ENVS)
    built = {name: ensure(name) for name in names}
    if args.resolve_unpinned:
        data = {"envs": {n: {k: v for k, v in m.items() if k != "versions"} | {
            "key_versions": {k: v for k, v in m["versions"].items() if k in ("torch", "executorch", "torchao", "transformers", "optimum", "optimum-executorch", "optimum-onnx", "onnxruntime", "onnx", "onnxscript")}}
            for n, m in built.items()},
            "unpinned": {n: resolve_unpinned(n) for n in names},
            "into_our_env": {n: main_env_changes(n) for n in names}}
        write_record(RESULTS, data)
        print(json.dumps({k: data[k] for k in ("unpinned", "into_our_env")}, indent=1))


if __name__ == "__main__":
    main()
