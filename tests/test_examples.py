"""The example scripts under ``examples/`` run as a user runs them (a subprocess, real merge, real
export, real runtime), on a tiny Llama with the packaged tokenizer and two PEFT adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny_models import make_tiny_chat_model, peft_adapter_of

from exporters.manifest import Manifest
from hydraopt_mobile.bundle import load_bundle

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_build_for_app_merges_exports_and_answers_each_task(tmp_path):
    model = make_tiny_chat_model(tmp_path / "model")
    ads = [f"{t}={peft_adapter_of(model, tmp_path / t, seed)}" for seed, t in enumerate(["summarise", "reply"], start=1)]
    out = tmp_path / "build"
    cmd = [sys.executable, str(EXAMPLES / "build_for_app.py"), *ads, "--budget", "0.5", "--model", str(model), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bank = load_bundle(out / "bundle")
    assert sorted(bank.tasks) == ["reply", "summarise"] and bank.storage_fraction() <= 0.5
    manifest = Manifest.read(out / "export")
    assert manifest.runtime == "onnxruntime" and manifest.tasks == bank.tasks
    lines = r.stdout.splitlines()
    assert lines[0].startswith("merged 2 tasks into ") and any(line.startswith("exported to ") for line in lines)
    assert [line.split(":")[0] for line in lines[-2:]] == bank.tasks  # one answer per task from one session
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "exists" in again.stderr  # an existing build is never overwritten
