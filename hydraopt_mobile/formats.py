"""Number formats for stored low-rank factors, with exact byte counts.

A factor is stored as a set of rank-1 component vectors: the rows of ``A`` (length d_in) and the
columns of ``B`` (length d_out). Quantisation scales follow those vectors, which is what a
low-rank factor needs (a per-row scale on ``B`` would cost d_out scales for r' values each):

- ``fp16``: the values.
- ``int8``: symmetric, one fp16 scale per component vector (per output channel of the factor).
- ``int4``: symmetric, one fp16 scale per group of ``group_size`` consecutive values of a vector;
  two values per byte; vectors are zero-padded to a whole number of groups (padding is counted).
- ``sign`` (ComPEFT, Yadav et al., arXiv 2311.13171): the ``k = ceil(density * n)`` largest-magnitude
  of the factor's ``n`` values kept as signs times one fp16 scale per factor, the rest zero. One
  uint8 blob per factor (:func:`sign_blob_layout`): the scale, then where the kept values are (a
  bitmask of ``n`` bits, or their positions as 16-bit or 32-bit integers, whichever is smaller),
  then one sign bit per kept value. It has no runtime decoder: exporters refuse it.

Decoding goes one way for every reader (the bank, the exporters' task files and task-decoder graph):
:meth:`StoredFactor.codes` gives one integer code per value plus the scales, and :func:`dequantize`
turns codes into float32 with plain tensor ops (so ``torch.onnx`` can trace it too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hydraopt_mobile.errors import UserError

FormatName = Literal["fp16", "int8", "int4", "sign"]
FORMAT_NAMES: tuple[str, ...] = ("fp16", "int8", "int4")  # what the planner and --format choose from; sign is ComPEFT's own
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class NumberFormat:
    name: FormatName = "fp16"
    group_size: int = 32
    density: float = 1.0  # sign only: the fraction of each factor's values kept

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES + ("sign",):
            raise UserError(f"--format {self.name!r}: choose one of {', '.join(FORMAT_NAMES)}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size}: choose one of {GROUP_SIZES}")
        if not 0 < self.density <= 1:
            raise UserError(f"density {self.density}: must be in (0, 1]")

    def label(self) -> str:
        if self.name == "sign":
            return f"sign-d{self.density!r}"  # repr round-trips, so parse(label) keeps every kept count
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name

    @classmethod
    def parse(cls, label: str) -> "NumberFormat":
        if label.startswith("int4-g"):
            return cls("int4", int(label.removeprefix("int4-g")))
        if label.startswith("sign-d"):
            try:
                return cls("sign", density=float(label.removeprefix("sign-d")))
            except ValueError:
                raise UserError(f"format {label!r}: expected sign-d<density>") from None
        return cls(label)  # type: ignore[arg-type]

    def _padded(self, length: int) -> int:
        g = self.group_size
        return -(-length // g) * g

    def nbytes(self, n_vectors: int, length: int) -> int:
        """Exact payload bytes of ``n_vectors`` component vectors of ``length`` values."""
        if self.name == "sign":
            return sign_blob_layout(n_vectors * length, self.density).nbytes
        if self.name == "fp16":
            return 2 * n_vectors * length
        if self.name == "int8":
            return n_vectors * length + 2 * n_vectors
        padded = self._padded(length)
        return n_vectors * padded // 2 + 2 * n_vectors * (padded // self.group_size)

    def encoded_shapes(self, n_vectors: int, length: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
        """dtype and shape of each tensor :meth:`encode` writes for ``n_vectors`` vectors of ``length``."""
        if self.name == "sign":
            return {"z": (torch.uint8, (1, self.nbytes(n_vectors, length)))}
        if self.name == "fp16":
            return {"w": (torch.float16, (n_vectors, length))}
        if self.name == "int8":
            return {"q": (torch.int8, (n_vectors, length)), "scale": (torch.float16, (n_vectors, 1))}
        padded = self._padded(length)
        return {"q": (torch.uint8, (n_vectors, padded // 2)), "scale": (torch.float16, (n_vectors, padded // self.group_size))}

    def encode(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantise ``vectors`` (n, length) into the tensors that are written to disk."""
        return self.quantise(vectors)[0]

    def quantise(self, vectors: torch.Tensor, codes: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`encode` and the float32 values the encoded tensors decode to (computed from the
        codes before int4 packing: packing is lossless, so these equal :meth:`decode`'s).
        ``codes=False``: the values alone (the tensors are left empty), for measuring."""
        v = vectors.float()
        if self.name == "sign":
            n, length = v.shape
            z = _encode_sign(v.reshape(-1), self.density)
            return {"z": z}, _decode_sign(z.reshape(-1), n * length, self.density).reshape(n, length)
        if self.name == "fp16":
            w = v.half()
            return {"w": w}, w.float()
        length = v.shape[1]
        if self.name == "int8":
            scale = (_abs_max(v, 1) / 127).half()
            q = (v / _safe(scale)).round_().clamp_(-127, 127)
            return ({"q": q.to(torch.int8), "scale": scale} if codes else {}), q.mul_(scale.float())
        n = v.shape[0]
        padded = self._padded(length)
        if padded > length:
            v = torch.cat([v, v.new_zeros(n, padded - length)], dim=1)
        grouped = v.reshape(n, -1, self.group_size)
        scale = (_abs_max(grouped, 2) / 7).half()
        q = (grouped / _safe(scale)).round_().clamp_(-8, 7)  # integers in float32
        data = {"q": _pack_int4(q.to(torch.int8).reshape(n, padded)), "scale": scale.reshape(n, -1)} if codes else {}
        # what dequantize() gives for (q, scale), without converting the codes back: codes * scale
        return data, q.mul_(scale.float()).reshape(n, padded)[:, :length]

    def codes(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``stored`` with one code per value: fp16 ``{"w"}`` as stored; int8 and int4 ``{"q": int8
        (n, padded), "scale": fp16 (n, groups)}``, int4 nibbles unpacked (int8: one group, no padding)."""
        if self.name == "fp16":
            return {"w": stored["w"]}
        q = _unpack_int4(stored["q"]) if self.name == "int4" else stored["q"].to(torch.int8)
        return {"q": q, "scale": stored["scale"].half()}

    def decode(self, stored: dict[str, torch.Tensor], length: int, n_vectors: int) -> torch.Tensor:
        """The float32 values that ``stored`` represents, shape (n_vectors, length)."""
        if self.name == "sign":
            return _decode_sign(stored["z"].reshape(-1), n_vectors * length, self.density).reshape(n_vectors, length)
        return dequantize(self.codes(stored), length)


def dequantize(codes: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """float32 (n, length) from :meth:`NumberFormat.codes`: each group of codes times its scale,
    the padding cut. Plain tensor ops, so the ONNX task decoder traces this same function."""
    if "w" in codes:
        return codes["w"].float()
    q, scale = codes["q"], codes["scale"]
    n, padded = q.shape
    groups = scale.shape[1]
    grouped = q.float().reshape(n, groups, padded // groups)
    return (grouped * scale.float().unsqueeze(-1)).reshape(n, padded)[:, :length]


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (n, even length) -> two's-complement nibbles, low nibble first."""
    return ((q[:, 0::2] & 0x0F) | ((q[:, 1::2] & 0x0F) << 4)).to(torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_int4`: uint8 (n, m) -> int8 codes (n, 2m)."""
    wide = packed.to(torch.int16)
    nibbles = torch.stack([wide & 0x0F, (wide >> 4) & 0x0F], dim=2).reshape(packed.shape[0], -1)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def _abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim=True)``, exactly, without the temporary ``abs`` (several times faster)."""
    return torch.maximum(x.amax(dim=dim, keepdim=True), -x.amin(dim=dim, keepdim=True))


@dataclass(frozen=True)
class SignBlob:
    """Where the parts of one sign-format factor lie in its uint8 blob: ``[0, 2)`` the fp16 scale,
    then the positions of the ``kept`` values (a bitmask of ``n`` bits when ``position_bytes`` is 0,
    else ``kept`` little-endian integers of that width, ascending), then ``ceil(kept / 8)`` bytes of
    sign bits (1 = negative), in position order."""

    n: int
    kept: int
    position_bytes: int  # 0: bitmask

    @property
    def where_bytes(self) -> int:
        return -(-self.n // 8) if self.position_bytes == 0 else self.kept * self.position_bytes

    @property
    def nbytes(self) -> int:
        return 2 + self.where_bytes + -(-self.kept // 8)


def sign_blob_layout(n: int, density: float) -> SignBlob:
    """The layout of a factor of ``n`` values at ``density``: the smaller of bitmask and positions."""
    kept = min(n, max(1, math.ceil(density * n - 1e-9)))
    width = 2 if n <= 1 << 16 else 4
    return SignBlob(n, kept, 0 if -(-n // 8) <= kept * width else width)


def _encode_sign(v: torch.Tensor, density: float) -> torch.Tensor:
    """The blob of ``v`` (flat): its largest-magnitude values as signs, scaled by their mean magnitude
    (the least-squares scale of those signs against ``v``)."""
    layout = sign_blob_layout(v.numel(), density)
    idx = torch.sort(torch.topk(v.abs(), layout.kept, sorted=False).indices).values
    kept = v[idx]
    scale = kept.abs().mean().reshape(1).half()
    if layout.position_bytes == 0:
        mask = torch.zeros(v.numel(), dtype=torch.bool)
        mask[idx] = True
        where = _pack_bits(mask)
    else:
        dtype = torch.int16 if layout.position_bytes == 2 else torch.int32
        shifted = idx - (1 << 15) if layout.position_bytes == 2 else idx  # int16 holds 0..65535 shifted
        where = shifted.to(dtype).view(torch.uint8)
    return torch.cat([scale.view(torch.uint8), where, _pack_bits(kept < 0)]).reshape(1, -1)


def _decode_sign(blob: torch.Tensor, n: int, density: float) -> torch.Tensor:
    layout = sign_blob_layout(n, density)
    scale = blob[:2].clone().view(torch.float16).float()  # a fresh tensor: the blob may start at any byte of its file
    where = blob[2 : 2 + layout.where_bytes].clone()  # a fresh tensor, aligned for the integer views
    if layout.position_bytes == 0:
        idx = _unpack_bits(where, n).nonzero().reshape(-1)
    elif layout.position_bytes == 2:
        idx = where.view(torch.int16).long() + (1 << 15)
    else:
        idx = where.view(torch.int32).long()
    if idx.numel() != layout.kept or (idx.numel() and (idx.min() < 0 or idx.max() >= n)):
        raise UserError(f"sign-format factor: {idx.numel()} positions within 0..{n - 1} expected {layout.kept}")
    negative = _unpack_bits(blob[2 + layout.where_bytes :].contiguous(), layout.kept)
    out = torch.zeros(n)
    out[idx] = torch.where(negative, -scale, scale)
    return out


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n / 8),), bit i of byte j is value 8 j + i."""
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -bits.numel() % 8)).reshape(-1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale).float()


@dataclass
class StoredFactor:
    """One factor as it lives on disk: encoded component vectors plus their format.

    ``transposed`` is True for B factors, whose component vectors are the columns.
    """

    fmt: NumberFormat
    data: dict[str, torch.Tensor]
    shape: tuple[int, int]
    transposed: bool

    @classmethod
    def encode(cls, matrix: torch.Tensor, fmt: NumberFormat, transposed: bool) -> "StoredFactor":
        vectors = matrix.T if transposed else matrix
        return cls(fmt, fmt.encode(vectors.contiguous()), tuple(matrix.shape), transposed)

    @classmethod
    def encode_stack(cls, matrices: torch.Tensor, fmt: NumberFormat, transposed: bool) -> tuple[list["StoredFactor"], torch.Tensor]:
        """Each of ``matrices`` (k, rows, cols) encoded as :meth:`encode` does, in one call (fp16,
        int8 and int4 quantise component vector by vector, so stacking them changes nothing; sign
        keeps one blob per factor and is refused), and the (k, rows, cols) float32 values they decode to."""
        data, values = cls.quantise_stack(matrices, fmt, transposed)
        k, rows, cols = matrices.shape
        per = data[next(iter(data))].shape[0] // k if k else 0
        factors = [cls(fmt, {part: t[i * per : (i + 1) * per].clone() for part, t in data.items()}, (rows, cols), transposed) for i in range(k)]
        return factors, values.transpose(1, 2).contiguous() if transposed else values

    @staticmethod
    def quantise_stack(matrices: torch.Tensor, fmt: NumberFormat, transposed: bool, codes: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`encode_stack`'s codes for all ``k`` matrices together (not yet split per factor;
        none with ``codes=False``) and the values they decode to as component vectors, (k, number
        of vectors, their length): the matrices themselves, or (``transposed``) their transposes."""
        if fmt.name == "sign":
            raise ValueError("encode_stack: the sign format encodes a whole factor at once; use encode")
        k, rows, cols = matrices.shape
        vectors = (matrices.transpose(1, 2) if transposed else matrices).reshape(-1, rows if transposed else cols)
        data, values = fmt.quantise(vectors, codes)
        return data, values.reshape(k, vectors.shape[0] // k if k else 0, -1)

    def spilled(self) -> "StoredFactor":
        """This factor without its tensors (already written to a bundle): format, shape and byte
        counts stay, values are gone."""
        return StoredFactor(self.fmt, {}, self.shape, self.transposed)

    @property
    def vectors_shape(self) -> tuple[int, int]:
        """(number of component vectors, their length)."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    def codes(self) -> dict[str, torch.Tensor]:
        """The component vectors as one code per value plus scales (:meth:`NumberFormat.codes`)."""
        return self.fmt.codes(self.data)

    def values(self) -> torch.Tensor:
        """Dequantised float32 matrix in its natural orientation."""
        n, length = self.vectors_shape
        v = self.fmt.decode(self.data, length, n) if n else torch.zeros(0, length)
        return (v.T if self.transposed else v).contiguous()

    def nbytes(self) -> int:
        return self.fmt.nbytes(*self.vectors_shape)
