"""Host side of the device-runner protocol (``hydraopt-device-runner/1``, see ``device_runner.py``):
write a request, start the runner on a target (or on the host, for the reference), read the answer.

The same request runs on both sides, so the host reference goes through the same runner code on the
host's own ONNX Runtime: any difference in the outputs is the target's runtime and kernels.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exporters.targets.device_runner import PROGRESS, PROTOCOL

OnStep = Callable[[int, int], None]  # (done, total), as the library's progress callbacks

RUNNER = Path(__file__).with_name("device_runner.py")


class RunnerError(RuntimeError):
    """The runner did not answer, or answered with an error."""


@dataclass
class Response:
    data: dict
    logits: dict[str, np.ndarray] = field(repr=False)
    wall_s: float  # the whole run, process start (and, emulated, the runtime's import) included

    def entries(self) -> list[dict]:
        return self.data["tasks"]

    def rows(self, entry: int, output: int) -> np.ndarray | None:
        """Logits that predicted each generated token of one output (None if not requested)."""
        key = self.entries()[entry]["outputs"][output].get("logits_key")
        return None if key is None else self.logits[key]


def make_request(export: Path, sequence: list[str], prompts: dict[str, list[list[int]]], max_new_tokens: int,
                 threads: int = 1, logits_examples: int = 0, switch_samples: int = 1,
                 answers: dict[str, list[list[int]]] | None = None) -> dict:
    """A protocol request: run ``sequence`` (tasks, repeats allowed: ``[a, b, a]`` switches back).
    ``answers`` (one per prompt): score them teacher-forced instead of generating."""
    tasks = list(dict.fromkeys(sequence))
    request = {"protocol": PROTOCOL, "export": str(Path(export).resolve()), "tasks": list(sequence),
               "prompts": {t: [list(map(int, p)) for p in prompts.get(t, [])] for t in tasks},
               "max_new_tokens": int(max_new_tokens), "threads": int(threads),
               "logits_examples": int(logits_examples), "switch_samples": int(switch_samples)}
    if answers is not None:
        request["teacher_forced"] = True
        request["answers"] = {t: [list(map(int, a)) for a in answers.get(t, [])] for t in tasks}
    return request


def run_streaming(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
                  on_step: OnStep | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` as ``subprocess.run(cmd, capture_output=True, text=True)`` does, except that
    its ``hydraopt-progress DONE TOTAL`` stderr lines (device_runner.report_progress) go to
    ``on_step`` as they come instead of into ``stderr``, of which the last 2,000 characters are kept
    (for error messages). A run past ``timeout`` is killed and raises ``subprocess.TimeoutExpired``."""
    tail: collections.deque[str] = collections.deque(maxlen=400)
    out: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr

        def read_stderr() -> None:
            for line in stderr:
                fields = line.split()
                if len(fields) == 3 and fields[0] == PROGRESS and fields[1].isdigit() and fields[2].isdigit():
                    if on_step is not None:
                        on_step(int(fields[1]), int(fields[2]))
                else:
                    tail.append(line)

        readers = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=lambda: out.extend(stdout), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            for reader in readers:
                reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(tail).strip()[-2000:])


def run_request(python: list[str], env: dict[str, str] | None, request: dict, target: str, latency_kind: str,
                timeout: float = 3600, on_step: OnStep | None = None) -> Response:
    """Run ``request`` with the runner under the Python started by ``python`` (argv prefix);
    ``on_step(done, total)`` after each example, as the runner reports them.
    A teacher-forced request answered by a runner that generated instead (an older runner ignores
    fields it does not know) is refused: its scores would not be comparable."""
    with tempfile.TemporaryDirectory(prefix="hydraopt-runner-") as tmp:
        req, resp = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req.write_text(json.dumps(request))
        t0 = time.perf_counter()
        r = run_streaming([*python, str(RUNNER), str(req), str(resp), "--target", target, "--latency-kind", latency_kind],
                          env=env, timeout=timeout, on_step=on_step)
        wall = time.perf_counter() - t0
        if not resp.is_file():
            raise RunnerError(f"the runner on {target} wrote no response (exit {r.returncode}): {r.stderr}")
        data = json.loads(resp.read_text())
        if "error" in data:
            raise RunnerError(f"the runner on {target} refused the run: {data['error']}")
        if request.get("teacher_forced") and data.get("scoring") != "teacher-forced":  # a runner ignores what it does not know
            raise RunnerError(f"the runner on {target} does not do teacher-forced scoring (it answered {data.get('scoring', 'generated')!r})")
        logits: dict[str, np.ndarray] = {}
        if data.get("logits_file"):
            with np.load(Path(tmp) / data["logits_file"]) as z:
                logits = {k: z[k] for k in z.files}
        return Response(data, logits, wall)


def run_on_host(request: dict, on_step: OnStep | None = None) -> Response:
    """The reference: the same runner on the host's Python and runtime (the project's venv: ONNX
    Runtime, or the exporter's own ExecuTorch)."""
    import platform

    return run_request([sys.executable], None, request, f"host-{platform.machine()}", "measured", on_step=on_step)
