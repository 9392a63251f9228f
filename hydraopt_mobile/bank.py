"""The merged bank in memory: per module, shared and per-task factors and which task uses which.

Every merge method (HydraOpt and the baselines) produces a :class:`MergedBank`, so bundles,
``inspect``, ``unpack``, evaluation and the exporters treat all methods alike. Task ``t`` is served
by ``B[b_index[t]] @ A[a_index[t]]`` in each module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.parallel import map_in_order
from hydraopt_mobile.storage import TensorSpec, factor_key, factor_specs, safetensors_bytes

SHARED = "shared.safetensors"


def task_file(task: str) -> str:
    return f"tasks/{task}.safetensors"


def factor_file(tasks: list[str], index: list[int], i: int) -> tuple[str, int | None]:
    """Where factor ``i`` lives (storage.py): its one task's file (no index in the key), or the
    shared file at index ``i``."""
    users = [t for t, g in enumerate(index) if g == i]
    return (task_file(tasks[users[0]]), None) if len(users) == 1 else (SHARED, i)


@dataclass
class MergedModule:
    shape: tuple[int, int]  # (d_out, d_in)
    a_index: list[int]  # task -> index into A
    b_index: list[int]  # task -> index into B
    A: list[StoredFactor]  # each (r', d_in)
    B: list[StoredFactor]  # each (d_out, r')
    # per task ||dW_t - dW^_t||^2 and ||dW_t||^2 against the adapters it was merged from
    # (module_sq_errors), when the merge measured them on its module workers; None otherwise
    sq_errors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, compare=False, repr=False)  # not copied by replace()

    @property
    def rank(self) -> int:
        return self.A[0].shape[0] if self.A else 0

    @property
    def largest_rank(self) -> int:
        """The largest rank of its A factors (0: no task uses the module): the slot rank a program needs."""
        return max((f.shape[0] for f in self.A), default=0)

    @property
    def fmt(self) -> NumberFormat:
        return self.A[0].fmt

    @property
    def layout(self) -> tuple[int, int]:
        """(k_A, k_B): how many distinct A and B factors this module stores."""
        return (len(self.A), len(self.B))

    def task_factors(self, t: int) -> LoraFactors:
        return LoraFactors(self.A[self.a_index[t]].values(), self.B[self.b_index[t]].values())

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.A + self.B)

    def shares(self) -> bool:
        """True when some factor serves two or more tasks."""
        return len(set(self.a_index)) < len(self.a_index) or len(set(self.b_index)) < len(self.b_index)


@dataclass
class MergedBank:
    tasks: list[str]
    modules: dict[str, MergedModule]
    method: str
    params: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    reference_file_bytes: int = 0  # file bytes of every input adapter in fp16 (the budget's unit; storage.py)
    reference_payload_bytes: int = 0  # the same without file headers (what per-task rank/format saves is counted on it)
    rel_errors: dict[str, float] = field(default_factory=dict)  # per task, measured at merge time

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise UserError(f"task {task!r} is not in this bank (tasks: {', '.join(self.tasks)})")
        return self.tasks.index(task)

    def task_factors(self, task: str) -> dict[str, LoraFactors]:
        """The effective adapter of ``task``: dequantised factors per module."""
        t = self.task_index(task)
        return {name: m.task_factors(t) for name, m in self.modules.items()}

    def payload_bytes(self) -> int:
        return sum(m.nbytes() for m in self.modules.values())

    def hash_factors(self, h: "hashlib._Hash") -> None:
        """Feed ``h`` every module's name, layout (A and B indices) and stored factor bytes, in
        module-name order: what the bank stores, whatever method produced it."""
        for name in sorted(self.modules):
            m = self.modules[name]
            h.update(json.dumps([name, m.a_index, m.b_index]).encode())
            for factor in m.A + m.B:
                for key in sorted(factor.data):
                    h.update(factor.data[key].contiguous().view(torch.uint8).numpy().tobytes())

    def content_digest(self) -> str:
        """SHA-256 of the tasks and :meth:`hash_factors`: equal for two banks that store the same."""
        h = hashlib.sha256(json.dumps(self.tasks).encode())
        self.hash_factors(h)
        return h.hexdigest()

    def packed(self) -> Iterator[tuple[str, dict[str, torch.Tensor], list[TensorSpec]]]:
        """``(file, tensors by key, their specs)`` for every stored factor: a factor serving one task
        lives in that task's file, one serving several in the shared file (storage.py: key scheme)."""
        for m, module in enumerate(self.modules.values()):
            yield from packed_module(self.tasks, m, module)

    def file_specs(self) -> dict[str, list[TensorSpec]]:
        """Per file, the tensors it holds; files that would hold none are not written."""
        files: dict[str, list[TensorSpec]] = {}
        for m, module in enumerate(self.modules.values()):
            for file, specs in _placed_specs(self.tasks, m, module):
                files.setdefault(file, []).extend(specs)
        return files

    def file_bytes(self) -> dict[str, int]:
        """The exact size of every tensor file a bundle of this bank holds."""
        return {file: safetensors_bytes(specs) for file, specs in self.file_specs().items()}

    def total_file_bytes(self) -> int:
        return sum(self.file_bytes().values())

    def storage_fraction(self) -> float:
        """File bytes over the reference's file bytes (every input adapter in fp16): the one storage unit."""
        return self.total_file_bytes() / self.reference_file_bytes if self.reference_file_bytes else float("nan")

    def relative_errors(self, adapters: AdapterSet) -> dict[str, float]:
        """Per task ||dW - dW^||_F / ||dW||_F over all modules, computed without dense matrices
        (each module's stored factors decoded once, every task's traces in one batch)."""
        per_module: list[tuple[torch.Tensor, torch.Tensor]] = []
        map_in_order(list(self.modules), adapters.factors, lambda _, name, factors: module_sq_errors(factors, self.modules[name]), lambda *done: per_module.append(done[3]))
        return _summed(self.tasks, per_module)

    def measured_relative_errors(self) -> dict[str, float] | None:
        """:meth:`relative_errors` against the adapters the bank was merged from, from what the
        merge measured as it built each module (``MergedModule.sq_errors``); None if a module lacks it."""
        if any(m.sq_errors is None for m in self.modules.values()):
            return None
        return _summed(self.tasks, [m.sq_errors for m in self.modules.values()])  # type: ignore[misc]


def _summed(tasks: list[str], per_module: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative errors from per-module squared errors and norms, summed in module order."""
    err = torch.zeros(len(tasks), dtype=torch.float64)
    ref = torch.zeros(len(tasks), dtype=torch.float64)
    for e, n in per_module:
        err, ref = err + e, ref + n
    return relative_from_sums(tasks, err, ref)


def with_sq_errors(factors: list[LoraFactors], module: MergedModule) -> MergedModule:
    """``module`` with its :func:`module_sq_errors` against ``factors`` (the inputs it was built from)
    recorded: a merge measures them on its module workers instead of again in the calling thread."""
    module.sq_errors = module_sq_errors(factors, module)
    return module


def module_sq_errors(factors: list[LoraFactors], module: MergedModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per task ``||dW_t - dW^_t||^2`` and ``||dW_t||^2`` of one module (float64, (T,))."""
    from hydraopt_mobile.factored import sq_errors

    A, B = [f.values() for f in module.A], [f.values() for f in module.B]
    return sq_errors(factors, [LoraFactors(A[module.a_index[t]], B[module.b_index[t]]) for t in range(len(factors))])


def relative_from_sums(tasks: list[str], err: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per task ``sqrt(err / ref)`` (0 for a task without any update)."""
    return {task: float((err[t] / ref[t]).sqrt()) if ref[t] > 0 else 0.0 for t, task in enumerate(tasks)}


def packed_module(tasks: list[str], m: int, module: MergedModule) -> Iterator[tuple[str, dict[str, torch.Tensor], list[TensorSpec]]]:
    """:meth:`MergedBank.packed` for the module at index ``m`` (no tensors for a factor whose data
    was already written away, :meth:`StoredFactor.spilled`)."""
    for file, kind, index, f in _placed(tasks, module):
        yield file, {factor_key(m, kind, index, part): t.contiguous() for part, t in f.data.items()}, factor_specs(m, kind, index, f.fmt, *f.vectors_shape)


def _placed_specs(tasks: list[str], m: int, module: MergedModule) -> Iterator[tuple[str, list[TensorSpec]]]:
    """:func:`packed_module`'s files and specs, without touching the tensors."""
    for file, kind, index, f in _placed(tasks, module):
        yield file, factor_specs(m, kind, index, f.fmt, *f.vectors_shape)


def _placed(tasks: list[str], module: MergedModule) -> Iterator[tuple[str, str, int | None, StoredFactor]]:
    """``(file, kind, index in the shared file, factor)`` of every factor that stores something."""
    for kind, factors in (("A", module.A), ("B", module.B)):
        for i, f in enumerate(factors):
            file, index = factor_file(tasks, module.a_index if kind == "A" else module.b_index, i)
            if f.vectors_shape[0]:  # a rank-0 factor (a task without this module) stores nothing
                yield file, kind, index, f


def single_adapter_module(factors: LoraFactors, n_tasks: int, fmt: NumberFormat) -> MergedModule:
    """A module where one merged adapter serves every task (k_A = k_B = 1)."""
    return MergedModule(
        shape=factors.shape,
        a_index=[0] * n_tasks,
        b_index=[0] * n_tasks,
        A=[StoredFactor.encode(factors.A, fmt, transposed=False)],
        B=[StoredFactor.encode(factors.B, fmt, transposed=True)],
    )


def grouped_module(
    shape: tuple[int, int],
    a_index: list[int],
    b_index: list[int],
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    fmt: NumberFormat,
) -> MergedModule:
    return MergedModule(
        shape=shape,
        a_index=list(a_index),
        b_index=list(b_index),
        A=[StoredFactor.encode(a, fmt, transposed=False) for a in A],
        B=[StoredFactor.encode(b, fmt, transposed=True) for b in B],
    )
