"""The ``Backend`` protocol: what a runtime back end does for an export, and the ``Session`` it opens.

Exporting (:func:`exporters.export.export_bank`) and running (:func:`exporters.runtime.open_export`)
go through this protocol only; ExecuTorch (``executorch_backend``) and ONNX Runtime
(``onnx_backend``) are its two implementations, listed in :data:`exporters.registry.BACKENDS`.

A back end

- lowers the wrapped model (:func:`exporters.slots.attach_slots`) to its program, plus any other
  resident file (``export_program``: role -> file);
- writes one task's switchable tensors in its task-file format (``write_task_file``), whose tensors
  the manifest lists (``task_tensors``);
- opens a :class:`Session` on an export folder (``open_session``).

A session loads a task (verifies the file against the manifest, reads and decodes it once), makes a
loaded task active (``set_task``: the switch, which touches no resident weight), and runs the
decoder (``prefill`` a new sequence, ``decode`` one more token), keeping the KV cache itself. The
out-of-process device runner (``exporters/targets/device_runner.py``) speaks the same operations
over its wire format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import nn

from exporters.manifest import Manifest, verified_task_file
from exporters.slots import SlotLayout
from hydraopt_mobile.errors import UserError


class Session(ABC):
    """Common part of every back end's session: manifest, verified task loading, positions."""

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
        """Make ``task`` active (loading it first if needed): the switch."""
        if not self.manifest.task_tensors:
            self._check_merged(task)
        else:
            self._switch(task)
        self.active = task

    def reset(self) -> None:
        self.pos = 0

    def _check_merged(self, task: str) -> None:
        if task not in self.tasks:
            raise UserError(f"this merged export serves only {self.tasks[0]!r}, not {task!r}")

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Logits (n, vocab) for a new sequence ``ids``."""
        self.reset()
        return self._step(ids)

    def decode(self, token: int) -> np.ndarray:
        """Logits (vocab,) for one more token."""
        return self._step([token])[-1]

    @abstractmethod
    def _step(self, ids: list[int]) -> np.ndarray:
        """Logits (n, vocab) for ``ids`` after the cached positions; advances ``pos``."""

    @abstractmethod
    def _load(self, task: str, path: Path) -> None:
        """Read and decode the verified task file ``path``."""

    @abstractmethod
    def _switch(self, task: str) -> None:
        """Make ``task``'s decoded tensors the ones the decoder reads (loading it first if needed)."""


@dataclass(frozen=True)
class ProgramSpec:
    """What a back end lowers besides the model: its slots and the export's options."""

    layout: SlotLayout
    switchable: dict[str, tuple[int, ...]]  # slot -> shape, as :func:`exporters.slots.attach_slots` returns
    quant: str  # one of the back end's ``quants``
    max_cache_len: int  # static KV cache length (back ends with a dynamic cache ignore it)


class Backend(Protocol):
    """One runtime's export format and session (see the module docstring)."""

    name: str  # the ``--format`` value
    runtime: str  # the manifest's ``runtime``
    quants: dict[str, str]  # ``--quant`` value -> one-line description
    task_ext: str  # task-file extension, dot included
    task_encoding: str  # the manifest's ``task_dtype``: how task files store the tensors

    def export_program(self, model: nn.Module, spec: ProgramSpec, folder: Path) -> dict[str, str]:
        """Write the resident files for ``model`` (wrapped with slots) into ``folder``: role -> relative path."""
        ...

    def task_tensors(self, layout: SlotLayout, switchable: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
        """The tensors every task file holds (manifest order) and their shapes."""
        ...

    def write_task_file(self, path: Path, layout: SlotLayout, task: str, export_id: str) -> None:
        """``task``'s switchable tensors as a task file at ``path``."""
        ...

    def open_session(self, folder: Path, threads: int = 1) -> Session:
        """A session on the export in ``folder``."""
        ...


def check_quant(backend: Backend, quant: str) -> None:
    """Refuse a ``--quant`` the back end does not offer."""
    if quant not in backend.quants:
        raise UserError(f"--quant {quant!r}: {backend.name} exports support {', '.join(backend.quants)}")

