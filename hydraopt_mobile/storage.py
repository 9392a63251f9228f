"""Storage in file bytes: what a device keeps is files, so every size this toolkit reports is the
exact size of the safetensors files it writes (headers included).

A bundle file (format 3) is one safetensors tensor, ``data``: a flat uint8 array holding the file's
factor parts back to back. Which parts a file holds, and their dtypes and shapes, follow from the
bundle manifest's layouts (the shared file holds every factor serving several tasks, a task's file
at most one A and one B per module; ``part``: ``w`` for fp16, ``q`` + ``scale`` for int8 / int4,
formats.py), so the file repeats none of it: the parts are named ``<module index>.<A|B><factor
index>.<part>`` in the shared file and ``<module index>.<A|B>.<part>`` in a task's own, and lie in
:func:`file_order` (larger dtypes first, then by name: every part starts aligned to its dtype).
Readers (bundle.open_bundle, exporters/targets/device_runner.py, the Android app) check the blob's
length against the layouts and slice it. Format 2 gave every part its own header entry: 50-70
bytes of JSON each, a third of the smallest bundles' bytes (benchmarks/results/compact_packing_check.md).

The reference that budgets and fractions are measured against is packed the same way: each input
adapter's A and B in fp16, one file per task (:func:`reference_file_bytes`), so a bundle of the
unchanged adapters is exactly 1.0 of it. Configs and manifests count on neither side.

A safetensors file is an 8-byte length, a JSON header padded with spaces to a multiple of 8, and
the tensors' bytes; with one tensor of ``n`` bytes its size is known before anything is written
(:func:`safetensors_bytes`), and the planner bounds it by :func:`file_overhead_bound` with ``n``
at the budget's number of digits (no file exceeds the budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hydraopt_mobile.formats import NumberFormat

FILE_METADATA = {"hydraopt_bundle": "3"}
BLOB = "data"  # the one tensor of a bundle file
_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int8: "I8", torch.uint8: "U8"}


@dataclass(frozen=True)
class TensorSpec:
    """One part of a file, without its data."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def factor_key(module_index: int, kind: str, index: int | None, part: str) -> str:
    """``index`` None: the factor lives in its task's own file."""
    return f"{module_index}.{kind}{'' if index is None else index}.{part}"


def factor_specs(module_index: int, kind: str, index: int | None, fmt: "NumberFormat", n_vectors: int, length: int) -> list[TensorSpec]:
    """The parts one stored factor (``n_vectors`` component vectors of ``length`` values) writes."""
    if n_vectors == 0:
        return []
    return [TensorSpec(factor_key(module_index, kind, index, part), dtype, shape) for part, (dtype, shape) in fmt.encoded_shapes(n_vectors, length).items()]


def file_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The order of the parts in a file: larger dtypes first, then by key."""
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.key))


def _header(payload: int, metadata: dict[str, str] | None) -> str:
    header: dict = {"__metadata__": metadata} if metadata else {}
    header[BLOB] = {"dtype": _DTYPES[torch.uint8], "shape": [payload], "data_offsets": [0, payload]}
    return json.dumps(header, separators=(",", ":"))


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = FILE_METADATA) -> bytes:
    """A bundle file's first bytes for ``specs`` (what safetensors' ``save_file`` writes for their
    blob): the 8-byte little-endian header length and the JSON header padded with spaces to a
    multiple of 8; the parts follow in :func:`file_order`."""
    header = _header(sum(s.nbytes for s in specs), metadata).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def safetensors_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = FILE_METADATA) -> int:
    """The exact size of the bundle file holding ``specs``."""
    payload = sum(s.nbytes for s in specs)
    return 8 + -(-len(_header(payload, metadata).encode()) // 8) * 8 + payload


def file_overhead_bound(payload_digits: int, metadata: dict[str, str] | None = FILE_METADATA) -> int:
    """Bytes of one file beyond its parts when its payload has at most ``payload_digits`` digits:
    length prefix and padded header."""
    return 8 + -(-len(_header(10**payload_digits - 1, metadata).encode()) // 8) * 8


def reference_specs(ranks_and_shapes: list[tuple[int, tuple[int, int]]]) -> list[TensorSpec]:
    """One task's adapter in fp16, packed as a bundle packs a task's own factors:
    ``ranks_and_shapes[m] = (rank, (d_out, d_in))`` for module index ``m``."""
    from hydraopt_mobile.formats import NumberFormat

    fp16 = NumberFormat("fp16")
    specs: list[TensorSpec] = []
    for m, (rank, (d_out, d_in)) in enumerate(ranks_and_shapes):
        specs += factor_specs(m, "A", None, fp16, rank, d_in) + factor_specs(m, "B", None, fp16, rank, d_out)
    return specs


def reference_file_bytes(per_task: list[list[tuple[int, tuple[int, int]]]]) -> int:
    """File bytes of the reference: every task's adapter in fp16, one safetensors file per task."""
    return sum(safetensors_bytes(reference_specs(task)) for task in per_task)
