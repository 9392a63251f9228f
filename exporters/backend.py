"""The ``Backend`` protocol: what a runtime back end does for an export, and the ``Session`` it opens.

Exporting (:func:`exporters.export.export_bank`) and running (:func:`exporters.runtime.open_export`)
go through this protocol only; ExecuTorch (``executorch_backend``) and ONNX Runtime
(``onnx_backend``) are its two implementations, listed in :data:`exporters.registry.BACKENDS`.

A back end

- lowers the wrapped model (:func:`exporters.slots.attach_slots`: every slot of the signature zero)
  to its program (``export_program``: role -> file, timing its phases);
- opens a :class:`Session` on an export folder (``open_session``).

The data files are the bank's own (``exporters/export.py``) and are the same for both back ends.
A session decodes the bank's shared file once when it opens, loads a task (verifies its own file
against the manifest, reads and decodes it once into every slot of the signature: ``BankSlots``),
makes a loaded task active (``set_task``: the switch, which writes the slots and touches no base
weight), and runs the decoder (``prefill`` a new sequence, ``decode`` one more token), keeping the
KV cache itself. The out-of-process device runner (``exporters/targets/device_runner.py``) speaks
the same operations over its wire format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import nn

from exporters.manifest import Manifest, TaskFileError, verified_shared_file, verified_task_file
from exporters.targets.device_runner import BankSlots, Refused, TaskSlots
from hydraopt_mobile.errors import UserError


class Session(ABC):
    """Common part of every back end's session: manifest, verified task loading, positions."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.threads = threads
        self.pos = 0
        self.active: str | None = None
        self.bank: BankSlots | None = None
        self.decoded: dict[str, TaskSlots] = {}  # task -> its decoded slots (slot -> fp32 array, manifest order)
        if self.manifest.slots:
            self.bank = BankSlots({"tasks": self.manifest.tasks, "slots": self.manifest.slots, "placement": self.manifest.placement, "bank": self.manifest.bank})
            shared = verified_shared_file(self.manifest, self.folder)
            self._decoded(lambda: self.bank.load_shared(shared), shared)

    @property
    def tasks(self) -> list[str]:
        return self.manifest.tasks

    def load_task(self, task: str, path: Path | None = None) -> None:
        """Verify ``task``'s own file (size and SHA-256, before reading it), decode every slot of
        the task and keep them ready to switch to."""
        if self.bank is None:  # a merged export serves its one task with no file
            self._check_merged(task)
            return
        own = verified_task_file(self.manifest, self.folder, task, path)
        slots = self._decoded(lambda: self.bank.task_slots(task, own), own)
        self.decoded[task] = slots
        self._load(task, slots)

    def unload(self, task: str) -> None:
        """Forget ``task``'s decoded slots (not the active task's: switch away first); their memory
        serves the next load of a task of the same layout (``BankSlots.release``), so an app that
        keeps a bounded number of tasks loaded decodes into memory it already has."""
        if task == self.active and self.bank is not None:
            raise UserError(f"task {task!r} is active: switch to another task before unloading it")
        self._unload(task)
        slots = self.decoded.pop(task, None)
        if slots is not None:
            self.bank.release(slots)

    @staticmethod
    def _decoded(decode, stored: tuple[Path, bytes] | None):
        """``decode()``, with a file the decoder refuses reported as :class:`TaskFileError`."""
        try:
            return decode()
        except (Refused, KeyError, ValueError, IndexError, TypeError) as e:
            raise TaskFileError(f"{stored[0] if stored else 'no file'}: not a file of this export's bank ({type(e).__name__}: {e})") from e

    def set_task(self, task: str) -> None:
        """Make ``task`` active (loading it first if needed): the switch."""
        if self.bank is None:
            self._check_merged(task)
        else:
            if task not in self.decoded:
                self.load_task(task)
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

    def _load(self, task: str, slots: TaskSlots) -> None:
        """Keep ``task``'s decoded slots (also in ``decoded``) in the runtime's form, if it has its own."""

    def _unload(self, task: str) -> None:
        """Drop ``task``'s runtime form, if any (``unload`` drops its decoded slots)."""

    @abstractmethod
    def _switch(self, task: str) -> None:
        """Make loaded ``task``'s slots the ones the decoder reads."""


@dataclass(frozen=True)
class ProgramSpec:
    """What a back end lowers besides the model: its slots and the export's options."""

    slots: dict[str, tuple[int, int]]  # slot -> shape, as :func:`exporters.slots.attach_slots` returns
    quant: str  # one of the back end's ``quants``
    max_cache_len: int  # static KV cache length (back ends with a dynamic cache ignore it)
    attention: str | None = None  # ExecuTorch's attention kernels (exporters/et_attention.py; None: the default); others ignore it


class Backend(Protocol):
    """One runtime's export format and session (see the module docstring)."""

    name: str  # the ``--format`` value
    runtime: str  # the manifest's ``runtime``
    quants: dict[str, str]  # ``--quant`` value -> one-line description
    program_file: str  # the program's file name in an export folder and in the program cache

    def export_program(self, model: nn.Module, spec: ProgramSpec, folder: Path, phases: dict[str, float]) -> dict[str, str]:
        """Write the program for ``model`` (wrapped with slots) into ``folder``: role -> relative
        path; adds each lowering phase's seconds to ``phases``."""
        ...

    def program_slots(self, model: nn.Module, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], list[list]]:
        """(the program's slot inputs: name -> shape, placement) for the module slots ``shapes``:
        placement entries ``[module slot, shape, program slot, first row, first column]`` say where
        a module's slot lies in a program input that holds several (empty: each is its own input)."""
        ...

    def open_session(self, folder: Path, threads: int = 1) -> Session:
        """A session on the export in ``folder``."""
        ...


def check_quant(backend: Backend, quant: str) -> None:
    """Refuse a ``--quant`` the back end does not offer."""
    if quant not in backend.quants:
        listing = "; ".join(f"{name} ({description})" for name, description in backend.quants.items())
        raise UserError(f"--quant {quant!r}: {backend.name} exports support {listing}")

