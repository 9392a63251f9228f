"""Running an export on its real runtime: ExecuTorch's Python runtime or ONNX Runtime.

Both sessions offer the same small interface: ``load_task`` (verify the task file against the
manifest, then read it), ``set_task`` (make a loaded task active: the switch), ``prefill`` and
``decode`` (logits as numpy arrays; the KV cache lives in the session), and :func:`greedy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters.manifest import Manifest, verified_task_file


class Session:
    """Common part: manifest, verified task loading, position bookkeeping."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.threads = threads
        self.pos = 0
        self.active: str | None = None

    @property
    def tasks(self) -> list[str]:
        return self.manifest.tasks

    def load_task(self, task: str, path: Path | None = None) -> None:
        """Verify ``task``'s file (size and SHA-256, before reading it) and keep it ready to switch to."""
        if not self.manifest.task_tensors:  # a merged export serves its one task with no file
            self._check_merged(task)
            return
        self._load(task, verified_task_file(self.manifest, self.folder, task, path))

    def set_task(self, task: str) -> None:
        if not self.manifest.task_tensors:
            self._check_merged(task)
        else:
            self._switch(task)
        self.active = task

    def reset(self) -> None:
        self.pos = 0

    def _check_merged(self, task: str) -> None:
        if task not in self.tasks:
            raise KeyError(f"this merged export serves only {self.tasks[0]!r}, not {task!r}")

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Logits (n, vocab) for a new sequence ``ids``."""
        self.reset()
        return self._step(ids)

    def decode(self, token: int) -> np.ndarray:
        """Logits (vocab,) for one more token."""
        return self._step([token])[-1]

    def _step(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _load(self, task: str, path: Path) -> None:
        raise NotImplementedError

    def _switch(self, task: str) -> None:
        raise NotImplementedError


class ExecuTorchSession(Session):
    def __init__(self, folder: Path, threads: int = 1) -> None:
        super().__init__(folder, threads)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(str(self.folder / self.manifest.entry("program").path))
        self.forward = self.program.load_method("forward")
        self.setter = self.program.load_method("set_task") if self.manifest.task_tensors else None
        self.loaded: dict[str, list] = {}
        self.max_len = self.manifest.model["max_cache_len"]

    def _load(self, task: str, path: Path) -> None:
        from exporters.executorch_backend import read_task_file

        self.loaded[task] = read_task_file(path, list(self.manifest.task_tensors), list(self.manifest.task_tensors.values()))

    def _switch(self, task: str) -> None:
        if task not in self.loaded:
            self.load_task(task)
        self.setter.execute(self.loaded[task])

    def _step(self, ids: list[int]) -> np.ndarray:
        import torch

        n = len(ids)
        if self.pos + n > self.max_len:
            raise ValueError(f"sequence of {self.pos + n} tokens exceeds the export's KV cache ({self.max_len})")
        out = self.forward.execute([torch.tensor([ids]), torch.arange(self.pos, self.pos + n)])[0]
        self.pos += n
        return out[0].numpy()


class OrtSession(Session):
    """``load_task`` reads the task's ``.onnx_adapter`` and runs the task decoder once with it
    active (``RunOptions.add_active_adapter``); ``set_task`` then only picks which decoded slots
    the decoder step is fed."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        super().__init__(folder, threads)
        import onnxruntime as ort

        self.ort = ort
        self.session = self._open(self.manifest.entry("program").path)
        self.task_decoder = self._open(self.manifest.entry("task_decoder").path) if self.manifest.task_tensors else None
        self.slots: dict[str, dict[str, np.ndarray]] = {}  # task -> decoded fp32 slot values
        self.feeds: dict[str, np.ndarray] = {}
        m = self.manifest.model
        self.past_shape = (1, m["kv_heads"], 0, m["head_dim"])
        self.n_kv = 2 * m["n_layers"]
        self.past: list[np.ndarray] = []

    def _open(self, rel: str):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # LoRA inputs with defaults are intended; ORT warns about each one
        return self.ort.InferenceSession(str(self.folder / rel), options, providers=["CPUExecutionProvider"])

    def _load(self, task: str, path: Path) -> None:
        adapter = self.ort.LoraAdapter()
        adapter.Load(str(path))
        options = self.ort.RunOptions()
        options.add_active_adapter(adapter)
        names = [o.name for o in self.task_decoder.get_outputs()]
        self.slots[task] = dict(zip(names, self.task_decoder.run(names, {}, options)))

    def _switch(self, task: str) -> None:
        if task not in self.slots:
            self.load_task(task)
        self.feeds = self.slots[task]

    def reset(self) -> None:
        super().reset()
        self.past = [np.zeros(self.past_shape, dtype=np.float32) for _ in range(self.n_kv)]

    def _step(self, ids: list[int]) -> np.ndarray:
        feeds = {"input_ids": np.array([ids], dtype=np.int64), **self.feeds}
        feeds.update({f"past.{i}": p for i, p in enumerate(self.past)})
        out = self.session.run(None, feeds)
        self.past = out[1:]
        self.pos += len(ids)
        return out[0][0]


def open_export(folder: str | Path, threads: int = 1) -> Session:
    """A session on the runtime the export was made for."""
    runtime = Manifest.read(Path(folder)).runtime
    cls = {"executorch": ExecuTorchSession, "onnxruntime": OrtSession}[runtime]
    return cls(Path(folder), threads)


@dataclass
class Generation:
    tokens: list[int]  # generated tokens (without the prompt)
    logits: list[np.ndarray] = field(repr=False)  # [prefill logits (n, V)] + one (V,) per decode step
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)


def greedy(session: Session, ids: list[int], max_new_tokens: int, keep_logits: bool = False) -> Generation:
    """Greedy decoding on the runtime; stops at an end-of-sequence token of the manifest."""
    import time

    eos = set(session.manifest.model["eos_token_id"])
    t0 = time.perf_counter()
    logits = session.prefill(ids)
    gen = Generation([], [logits] if keep_logits else [], time.perf_counter() - t0)
    token = int(np.argmax(logits[-1]))
    while True:
        gen.tokens.append(token)
        if token in eos or len(gen.tokens) >= max_new_tokens:
            return gen
        t0 = time.perf_counter()
        step = session.decode(token)
        gen.decode_s.append(time.perf_counter() - t0)
        if keep_logits:
            gen.logits.append(step)
        token = int(np.argmax(step))
