"""The back ends, by ``--format`` name: the one place that lists them (the CLI, ``export_bank`` and
``open_export`` all read it).

An entry names what the command line shows (format, runtime, ``--quant`` recipes: the recipe
modules import neither torch nor ONNX) and where its implementation lives; the implementation,
which imports torch and the runtime, loads on first use, so ``hydraopt --help`` and
``hydraopt export --help`` answer at once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from exporters import et_recipes, onnx_recipes
from hydraopt_mobile.errors import UserError

if TYPE_CHECKING:
    from exporters.backend import Backend


@dataclass(frozen=True)
class BackendEntry:
    name: str  # --format
    runtime: str  # what its exports name in their manifest
    quants: dict[str, str]  # --quant name -> description
    implementation: str  # "module:class", a Backend

    def load(self) -> Backend:
        return _load(self.implementation)


@cache
def _load(implementation: str) -> Backend:
    module, cls = implementation.split(":")
    return getattr(importlib.import_module(module), cls)()


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry(et_recipes.FORMAT, et_recipes.RUNTIME, et_recipes.QUANTS, "exporters.executorch_backend:ExecuTorchBackend"),
    BackendEntry(onnx_recipes.FORMAT, onnx_recipes.RUNTIME, onnx_recipes.QUANTS, "exporters.onnx_backend:OnnxBackend"),
)}


def backend_for(fmt: str) -> Backend:
    """The back end of ``--format fmt``."""
    if fmt not in BACKENDS:
        raise UserError(f"--format {fmt!r}: choose {' or '.join(BACKENDS)}")
    return BACKENDS[fmt].load()


def backend_for_runtime(runtime: str) -> Backend:
    """The back end whose exports name ``runtime`` in their manifest (the schema allows only these)."""
    return next(e for e in BACKENDS.values() if e.runtime == runtime).load()
