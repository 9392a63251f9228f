"""Storage in file bytes: what a device keeps is files, so every size this toolkit reports is the
exact size of the safetensors files it writes (headers included).

Factors are packed one tensor per stored part, keyed ``<module index>.<A|B><factor index>.<part>``
in the shared file and ``<module index>.<A|B>.<part>`` in a task's own file, which holds at most one
A and one B per module (``part``: ``w`` for fp16, ``q`` + ``scale`` for int8 / int4; formats.py). The reference that
budgets and fractions are measured against is packed the same way: each input adapter's A and B in
fp16, one file per task (:func:`reference_file_bytes`), so a bundle of the unchanged adapters is
exactly 1.0 of it. Configs and manifests count on neither side.

A safetensors file is an 8-byte length, a JSON header padded with spaces to a multiple of 8, and
the tensors' bytes. The header lists every tensor as ``"key":{"dtype":..,"shape":[..],
"data_offsets":[begin,end]}`` in the order safetensors writes them (larger dtypes first, then by
key), so its size is known before anything is written: :func:`safetensors_bytes` computes it
exactly, and the planner prices a candidate's header entries with :func:`entry_chars`, bounding each
offset by the digits of the budget (no offset exceeds the file's size, which is within budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hydraopt_mobile.formats import NumberFormat

FILE_METADATA = {"hydraopt_bundle": "2"}
_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int8: "I8", torch.uint8: "U8"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file, without its data."""

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
    """The tensors one stored factor (``n_vectors`` component vectors of ``length`` values) writes."""
    if n_vectors == 0:
        return []
    return [TensorSpec(factor_key(module_index, kind, index, part), dtype, shape) for part, (dtype, shape) in fmt.encoded_shapes(n_vectors, length).items()]


def file_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors writes tensors in: larger dtypes first, then by key."""
    return sorted(specs, key=lambda s: (-s.dtype.itemsize, s.key))


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> str:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in file_order(specs):
        header[s.key] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    return json.dumps(header, separators=(",", ":"))


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = FILE_METADATA) -> bytes:
    """A safetensors file's first bytes for ``specs``: the 8-byte little-endian header length and
    the JSON header padded with spaces to a multiple of 8; the tensors follow in :func:`file_order`."""
    header = _header(specs, metadata).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def safetensors_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None = FILE_METADATA) -> int:
    """The exact size of the safetensors file holding ``specs`` (what ``save_file`` writes)."""
    header = len(_header(specs, metadata).encode())
    return 8 + -(-header // 8) * 8 + sum(s.nbytes for s in specs)


def entry_chars(spec: TensorSpec, offset_digits: int) -> int:
    """Header characters of one tensor entry (with its separating comma), each offset taking at most
    ``offset_digits`` digits: an upper bound used for planning."""
    entry = json.dumps({spec.key: {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": []}}, separators=(",", ":"))
    return len(entry) - 2 + 1 + 2 * offset_digits + 1  # drop the outer braces; comma; two offsets and their comma


def file_overhead_bound(metadata: dict[str, str] | None = FILE_METADATA) -> int:
    """Bytes of one file beyond its tensor entries and data: length prefix, braces, metadata, padding."""
    return 8 + len(_header([], metadata).encode()) + 7


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
