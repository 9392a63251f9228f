"""``qnn-htp``: the Qualcomm Hexagon NPU, emulated: a QDQ A16W8 graph of an ONNX export on the QNN
execution provider's HTP backend (an x86 emulator shipped in PyPI's ``onnxruntime-qnn``).

``onnxruntime-qnn`` 2.7.0 is a plug-in execution provider (module ``onnxruntime_qnn``, registered
with ``onnxruntime.register_execution_provider_library``) that depends on ``onnxruntime`` itself; it
still gets its own environment under ``<cache>/targets/qnn-htp/venv``: it brings the QAIRT 2.51
libraries (~500 MB with its dependencies) and must not move the project's pins.

What runs (``qnn_graph.py`` in that environment): the export's decoder step with static shapes, a
QDQ A16W8 version (finite causal mask, Reciprocal as Div, per-channel 8-bit weights through 1x1
Convs) with the task slots as inputs (fixed 16-bit encodings, zero defaults), opened with
CPU fallback disabled (the session opens only if every node runs on HTP), tasks switched by feeding
each task's decoded slots. Not through the device-runner protocol: HTP runs static shapes only (no
generate loop with a growing cache), and one static 8-row step of SmolLM2 takes 80-100 s on the
emulator here (FIELD_NOTES' ~7.5 s per token does not hold), so examples are scored teacher-forced
with the prompt's cache prefilled on the CPU (``hydraopt_mobile/app/qnn_bench.py``: ``hydraopt bench
qnn-htp``).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from exporters.targets.protocol import OnStep, run_streaming
from exporters.targets.target import Readiness, Step, Target, step_facts

NAME = "qnn-htp"
QNN_PIN = "onnxruntime-qnn==2.7.0"
SCRIPT = Path(__file__).with_name("qnn_graph.py")
SETUP_COMMAND = f"hydraopt targets setup {NAME}"
QAIRT_TOOLS = ("qnn-context-binary-generator", "qairt-converter", "qnn-onnx-converter", "qnn-model-lib-generator", "qairt-lora-importer")


def pins() -> list[str]:
    """onnxruntime, onnx and numpy at the host's versions, plus onnxruntime-qnn."""
    return [QNN_PIN] + [f"{p}=={importlib.metadata.version(p)}" for p in ("onnxruntime", "onnx", "numpy")]


def venv_python(folder: Path) -> Path:
    return folder / "venv" / "bin" / "python"


def _venv(folder: Path) -> dict:
    tmp = folder / "venv.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True)
    # the project's pip installs into the new environment (no ensurepip download, no bootstrap)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"), "install", "-q",
                        "--disable-pip-version-check", *pins()], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {' '.join(pins())}: {r.stderr.strip()[-1500:]}")
    if (folder / "venv").exists():
        shutil.rmtree(folder / "venv")
    tmp.rename(folder / "venv")  # bin/python and pyvenv.cfg hold no path of the venv itself: a rename is safe
    return {"pins": pins()}


def _smoke(folder: Path) -> dict:
    code = ("import onnxruntime as ort, onnxruntime_qnn as q; "
            "ort.register_execution_provider_library('QNNExecutionProvider', q.get_library_path()); "
            "print(ort.__version__, q.__version__, [d.ep_name for d in ort.get_ep_devices()].count('QNNExecutionProvider'))")
    r = subprocess.run([str(venv_python(folder)), "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"the QNN execution provider does not register: {r.stderr.strip()[-1500:]}")
    ort, qnn, devices = r.stdout.split()[-3:]
    if int(devices) < 1:
        raise RuntimeError("the QNN execution provider registered no device")
    return {"onnxruntime": ort, "onnxruntime_qnn": qnn}


def steps() -> list[Step]:
    return [Step("venv", " ".join(pins()), _venv), Step("smoke", " ".join(pins()), _smoke)]


def check(folder: Path) -> Readiness:
    if sys.platform != "linux" or not sys.maxsize > 2**32:
        return Readiness(False, "the HTP emulator in onnxruntime-qnn ships for x86_64 Linux (and Windows) only", "-")
    stale = [s.name for s in steps() if (step_facts(folder, s.name) or {}).get("key") != s.key]
    if stale or not venv_python(folder).exists():
        return Readiness(False, f"not set up in {folder}: own environment with {' '.join(pins())}", SETUP_COMMAND)
    smoke = step_facts(folder, "smoke") or {}
    return Readiness(True, f"onnxruntime {smoke.get('onnxruntime')} + onnxruntime-qnn {smoke.get('onnxruntime_qnn')} (HTP emulator)")


def htp_check(export: Path, tasks: list[str], seq: int = 8, past: int = 2, workdir: Path | None = None, quants: tuple[str, ...] = ("a16w8",),
              archs: tuple[str, ...] = (), context_quants: tuple[str, ...] = (), context_tasks: list[str] | None = None, ids: dict | None = None, lora_probe: Path | None = None,
              static_check: bool = True, reuse_qdq: bool = False, rope_theta: float | None = None, minutes: float = 0,
              effect_tasks: int = 2, timeout: int = 1800, on_step: OnStep | None = None) -> dict:
    """Quantise ``export`` to QDQ (``quants``: a16w8, a8w8), open it on HTP without CPU fallback, run ``tasks`` in order
    on every eval window; per ``archs`` (htp_arch), compile an offline context binary of each of ``context_quants``
    (default all), reload it and run ``context_tasks``.

    ``ids``: ``{"calibration": {task: [ids]}, "eval": {task: [ids]}}``, each of ``past + seq`` token ids (default random),
    or ``{"cached": ids, "step": ids}`` (a prompt shorter than ``past``: left-padded cache; needs ``rope_theta``).
    ``minutes``: no new example after that long (0: no limit); ``effect_tasks``: how many of ``tasks`` (the first) also
    run without slots for the LoRA effect.
    ``lora_probe``: a file tried as ``qnn.lora_config``'s adapter binary section on the first context binary.
    ``on_step(done, total)``: after each HTP run (examples x tasks x quants), as ``qnn_graph.py`` reports them.
    Returns ``qnn_graph.py``'s report (per quant: nodes, ops, bytes, runs with max error and top-1 agreement vs
    the fp32 export on the CPU and the LoRA effect's cosine; per context binary its bytes and runs) and, under
    ``"logits"``, every run's logits keyed ``quant/session/run/window`` and the fp32 references ``fp32/task/window``.
    """
    folder = TARGET.folder()
    with tempfile.TemporaryDirectory(prefix="hydraopt-qnn-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cmd = [str(venv_python(folder)), str(SCRIPT), str(export), str(work), "--seq", str(seq), "--past", str(past),
               "--tasks", ",".join(tasks), "--quants", ",".join(quants), "--archs", ",".join(archs),
               "--context-tasks", ",".join(context_tasks or tasks),
               "--context-quants", ",".join(context_quants)]
        if reuse_qdq:
            cmd.append("--reuse-qdq")
        if rope_theta is not None:
            cmd += ["--rope-theta", str(rope_theta)]
        if minutes:
            cmd += ["--minutes", str(minutes)]
        cmd += ["--effect-tasks", str(effect_tasks)]
        if not static_check:
            cmd.append("--no-static-check")
        if lora_probe is not None:
            cmd += ["--lora-probe", str(lora_probe)]
        if ids is not None:
            (work / "ids.json").write_text(json.dumps(ids))
            cmd += ["--ids", str(work / "ids.json")]
        r = run_streaming(cmd, timeout=timeout, on_step=on_step)
        if r.returncode != 0:
            raise RuntimeError(f"qnn_graph.py failed: {r.stderr}")
        return read_report(work)


def lora_route_limit() -> dict:
    """What the wheel ships for QNN's own LoRA route: libraries only, none of QAIRT's tools that write adapter binary sections."""
    folder = TARGET.folder()
    site = next((venv_python(folder).parents[1] / "lib").glob("python3*/site-packages"))
    wheel = sorted(p.name for p in (site / "onnxruntime_qnn").iterdir() if p.is_file())
    found = {t: shutil.which(t, path=f"{venv_python(folder).parent}:/usr/bin:/usr/local/bin") for t in QAIRT_TOOLS}
    return {"command": f"ls {site / 'onnxruntime_qnn'}; which {' '.join(QAIRT_TOOLS)}", "wheel_files": wheel, "qairt_tools_found": found}


def read_report(work: Path) -> dict:
    """``qnn_graph.py``'s report in ``work`` (written after each quant) with its logits under ``"logits"``."""
    import numpy as np

    report = json.loads((work / "report.json").read_text())
    with np.load(work / "logits.npz") as z:
        report["logits"] = {k: z[k] for k in z.files}
    return report


TARGET = Target(
    name=NAME,
    summary="Qualcomm Hexagon NPU, emulated: QDQ A16W8 graph on ONNX Runtime's QNN execution provider (HTP backend, x86 emulator)",
    needs=f"its own environment (~550 MB, PyPI): {QNN_PIN} (QAIRT 2.51 libraries) with onnxruntime, onnx, numpy at the host's versions",
    latency_kind="emulated",
    tolerance="every node on HTP (CPU fallback disabled); switching back bit-identical; A16W8 logits within 0.15 of fp32 on "
              "the tiny test model (observed 0.04-0.06 vs task distance ~0.73, LoRA-effect cosine 0.988)",
    on_phone="the offline context binary for the phone's htp_arch (ep.context_enable=1: ctx_v<arch>_qnn.bin + its EPContext "
             "model, written per arch by qnn_graph.py --archs) loaded by ONNX Runtime's QNN EP on the Snapdragon (Android AAR "
             "with QNN); tasks switched by feeding their slots; not run on a phone here",
    steps=steps,
    check=check,
)
