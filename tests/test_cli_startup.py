"""Every help page of ``hydraopt`` (and ``--version``) answers without loading torch, ONNX or transformers (they take
seconds to import: ``hydraopt --help`` took 3.4 s when the command modules imported them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

HEAVY = ("torch", "onnx", "onnxruntime", "transformers", "executorch", "safetensors")

# In a fresh interpreter: the help page of the app, of every group and of every command, then the
# heavy modules that got imported on the way.
WALK = r"""
import json, sys
import typer
from typer.testing import CliRunner
from hydraopt_mobile.app.cli import app

def paths(cmd, prefix):
    yield prefix
    if hasattr(cmd, "commands"):  # a group
        for name, sub in cmd.commands.items():
            yield from paths(sub, prefix + [name])

runner = CliRunner()
pages = {}
for path in paths(typer.main.get_command(app), []):
    r = runner.invoke(app, [*path, "--help"])
    pages[" ".join(path)] = [r.exit_code, r.stdout]
r = runner.invoke(app, ["--version"])
pages["--version"] = [r.exit_code, r.stdout]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps({"pages": pages, "heavy": heavy}))
"""


def test_every_help_page_loads_no_heavy_library() -> None:
    r = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{WALK}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    pages = out["pages"]
    assert {"", "merge", "export", "bench host", "suite eval", "targets setup", "android"} <= set(pages)
    code, version = pages.pop("--version")
    assert code == 0 and version.startswith(f"hydraopt-mobile {metadata.version('hydraopt-mobile')} (Python "), version
    assert f"torch {metadata.version('torch')}" in version and f"onnxruntime {metadata.version('onnxruntime')}" in version
    for path, (code, text) in pages.items():
        assert code == 0 and "Usage: " in text, f"hydraopt {path} --help: exit {code}: {text[-500:]}"
    assert "int4-mixed" in pages["export"][1] and "8da4w-mixed-qkv-noclip" in pages["export"][1]  # the recipes, listed without ONNX
    assert out["heavy"] == [], f"help pages imported {out['heavy'][:10]}"


def test_a_command_still_sets_torch_threads() -> None:
    """The help check must not skip the thread setting for a command that runs."""
    code = ("import torch\nfrom typer.testing import CliRunner\nfrom hydraopt_mobile.app.cli import app\n"
            "seen = []\n"
            "import hydraopt_mobile.app.cli as cli\n"
            "@cli.app.command('threads-probe')\n"
            "def probe() -> None:\n    seen.append(torch.get_num_threads())\n"
            "torch.set_num_threads(2)\n"
            "r = CliRunner().invoke(app, ['--threads', '1', 'threads-probe'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(seen[0], torch.get_num_threads())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1", "2"]  # 1 thread during the command, the caller's count restored after
