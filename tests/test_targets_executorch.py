"""ExecuTorch exports on ``arm64-cpu`` (ExecuTorch 1.1.0's aarch64 runtime with XNNPACK under
qemu-aarch64) against the host's ExecuTorch, and teacher-forced scoring on both runtimes.

Pins that the op sets the host's exporter writes (ExecuTorch 1.5.1: XNNPACK delegate, fp32 and
8da4w, plus the portable ops of ``set_slots`` and ExecuTorch's LLM kernels of the default
``custom-ops`` attention, ``llama::update_cache`` and ``llama::custom_sdpa``, which the runner
registers from the 1.1.0 wheel's own ``libcustom_ops_aot_lib``) load and run on the older
runtime used on the target, that ``set_slots`` switches tasks there (alpha -> beta -> alpha, back
bit-identical) and that the outputs equal the host's within the target's tolerance (observed
<= 5e-7 for both quantisations: the same XNNPACK kernels' fp32 arithmetic in another order).

Nothing is mocked or skipped: the set-up downloads on a clean machine (~870 MB for ExecuTorch,
about 3 min) and a target that cannot be set up fails with its reason. Slow by nature: each
emulated runner spends ~55 s importing torch under qemu, and each tiny ExecuTorch export lowers
for 60-100 s; about 5 minutes in all.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from exporters.manifest import Manifest
from exporters.targets.registry import get_target
from hydraopt_mobile.app.targets_bench import TargetNotReady, bench_target, ready_target, run_pair
from test_targets import ready_target as setup_target
from tiny_models import PROMPT, TinyExports, reference_logits

TOL = 1e-4
MAX_NEW = 6
PROMPTS = {"alpha": [PROMPT, PROMPT[:4]], "beta": [PROMPT, PROMPT[:4]]}


@pytest.fixture(scope="module")
def arm64():
    return setup_target("arm64-cpu", "executorch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyExports:
    return TinyExports(tmp_path_factory.mktemp("targets-et"))


def pytorch_argmax(tiny: dict, task: str, prompt: list[int], answer: list[int]) -> tuple[list[int], np.ndarray]:
    """Independently of every runtime: PyTorch with the task's adapter merged into the weights,
    one pass over prompt + answer; the rows that predict each answer token and their argmax."""
    rows = reference_logits(tiny["model"], tiny["bank"], task, prompt + answer[:-1])[len(prompt) - 1:]
    return [int(t) for t in rows.argmax(-1)], rows


def test_executorch_8da4w_on_arm64_equals_host_and_switches_back(arm64, tiny):
    assert Manifest.read(tiny["et-8da4w"]).model["attention"] == "custom-ops"  # the LLM kernels run on the target
    on_arm, on_host = run_pair("arm64-cpu", tiny["et-8da4w"], ["alpha", "beta", "alpha"], PROMPTS, MAX_NEW)
    d = on_arm.data
    assert d["machine"] == "aarch64" and d["latency_kind"] == "emulated" and d["scoring"] == "generated"
    assert d["runtime"].startswith("executorch 1.1.0") and on_host.data["runtime"].startswith("executorch 1.5.1")
    for index in range(3):
        for i in range(2):
            assert d["tasks"][index]["outputs"][i]["tokens"] == on_host.data["tasks"][index]["outputs"][i]["tokens"]
            err = np.abs(on_arm.rows(index, i) - on_host.rows(index, i)).max()
            assert err < TOL, f"entry {index} example {i}: max logit error vs host {err}"
    for i in range(2):  # back to alpha after beta: bit-identical
        np.testing.assert_array_equal(on_arm.rows(0, i), on_arm.rows(2, i))
    assert np.abs(on_arm.rows(0, 0)[0] - on_arm.rows(1, 0)[0]).max() > 0.05, "set_slots had no effect on arm64"
    assert d["tasks"][0]["task_bytes"] > 0 and d["resident_bytes"] > d["tasks"][0]["task_bytes"]


def test_executorch_fp32_teacher_forced_on_arm64_matches_pytorch(arm64, tiny):
    """alpha -> beta -> alpha, teacher-forced: the argmax at every answer position is PyTorch's."""
    answers = {t: [pytorch_argmax(tiny, t, PROMPT, [1] * MAX_NEW)[0][:3] + [7, 9], [200, 3, 77]] for t in PROMPTS}
    on_arm, on_host = run_pair("arm64-cpu", tiny["et-fp32"], ["alpha", "beta", "alpha"], PROMPTS, MAX_NEW, answers=answers)
    assert on_arm.data["scoring"] == on_host.data["scoring"] == "teacher-forced"
    for index, task in enumerate(["alpha", "beta", "alpha"]):
        for i, prompt in enumerate(PROMPTS[task]):
            want, rows = pytorch_argmax(tiny, task, prompt, answers[task][i])
            got = on_arm.data["tasks"][index]["outputs"][i]
            assert got["tokens"] == want == on_host.data["tasks"][index]["outputs"][i]["tokens"]
            assert on_arm.rows(index, i).shape == (len(answers[task][i]), rows.shape[1])
            assert np.abs(on_arm.rows(index, i) - rows).max() < TOL
            assert np.abs(on_arm.rows(index, i) - on_host.rows(index, i)).max() < TOL
    np.testing.assert_array_equal(on_arm.rows(0, 0), on_arm.rows(2, 0))
    assert np.abs(on_arm.rows(0, 0) - on_arm.rows(1, 0)).max() > 0.05


def test_onnx_teacher_forced_records(arm64, tiny, tmp_path):
    """The bench records of teacher-forced scoring, on an ONNX export (fast: no torch under qemu):
    an example is exact when every argmax is its answer token, judged against PyTorch here."""
    export = tiny["fp32"]
    exact_alpha = []  # PyTorch's own greedy continuation for alpha: exact by construction
    for _ in range(4):
        exact_alpha.append(int(reference_logits(tiny["model"], tiny["bank"], "alpha", PROMPT + exact_alpha)[-1].argmax()))
    answers = {"alpha": [exact_alpha, [5, 5, 5]], "beta": [[5, 5, 5], exact_alpha]}
    expected = {t: [100.0 * (pytorch_argmax(tiny, t, PROMPT, a)[0] == a) for a in answers[t]] for t in answers}
    assert expected["alpha"][0] == 100.0 and 0.0 in expected["alpha"] + expected["beta"], expected
    records = bench_target("arm64-cpu", export, prompts={t: [PROMPT, PROMPT] for t in answers}, answers=answers,
                           teacher_forced=True, json_out=tmp_path / "tf.json")
    for r in records:
        assert r["scoring"] == "teacher-forced" and r["tokens_identical"] and r["max_logit_err"] < TOL
        assert r["score_each"] == expected[r["task"]] == r["score_each_host"]
        assert r["score"] == np.mean(expected[r["task"]])
    assert records[0]["switch_back_identical"] is True
    assert "teacher-forced" in (tmp_path / "tf.md").read_text()


def test_onnx_ready_without_executorch_part(arm64, tiny, tmp_path, monkeypatch):
    """A cache with only the ONNX steps: the target is ready (for ONNX), says ExecuTorch is not,
    and refuses an ExecuTorch export with the reason and the set-up command."""
    real = arm64.folder()
    fake = tmp_path / "cache" / "targets" / "arm64-cpu"
    fake.mkdir(parents=True)
    for name in ("qemu", "root", "site"):
        os.symlink(real / name, fake / name)
    for step in ("qemu", "root", "wheels", "smoke"):
        shutil.copy(real / f".step-{step}.json", fake / f".step-{step}.json")
    monkeypatch.setenv("HYDRAOPT_CACHE", str(tmp_path / "cache"))
    r = get_target("arm64-cpu").readiness()
    assert r.ready and "ExecuTorch exports not ready" in r.reason and "hydraopt targets setup arm64-cpu" in r.reason
    with pytest.raises(TargetNotReady, match="not ready for executorch exports.*hydraopt targets setup arm64-cpu"):
        ready_target("arm64-cpu", "executorch")
    assert ready_target("arm64-cpu", "onnxruntime").name == "arm64-cpu"
