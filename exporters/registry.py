"""The back ends, by ``--format`` name: the one place that lists them (the CLI, ``export_bank`` and
``open_export`` all read it)."""

from __future__ import annotations

from exporters.backend import Backend
from exporters.executorch_backend import ExecuTorchBackend
from exporters.onnx_backend import OnnxBackend
from hydraopt_mobile.errors import UserError

BACKENDS: dict[str, Backend] = {b.name: b for b in (ExecuTorchBackend(), OnnxBackend())}


def backend_for(fmt: str) -> Backend:
    """The back end of ``--format fmt``."""
    if fmt not in BACKENDS:
        raise UserError(f"--format {fmt!r}: choose {' or '.join(BACKENDS)}")
    return BACKENDS[fmt]


def backend_for_runtime(runtime: str) -> Backend:
    """The back end whose exports name ``runtime`` in their manifest (the schema allows only these)."""
    return next(b for b in BACKENDS.values() if b.runtime == runtime)
