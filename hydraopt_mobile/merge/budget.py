"""Storage budgets: a fraction of fp16 one-adapter-per-task, or an absolute size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hydraopt_mobile.errors import UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Budget:
    """``fraction`` of the reference bytes, or absolute ``nbytes``."""

    fraction: float | None = None
    nbytes: int | None = None

    @classmethod
    def parse(cls, text: str, option: str = "--budget") -> "Budget":
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m:
            raise UserError(f"{option} {text!r}: give a fraction like 0.5 or a size like 12MB")
        value, unit = float(m[1]), m[2].upper()
        if not unit:
            if not 0 < value <= 1:
                raise UserError(f"{option} {text!r}: a fraction must be in (0, 1]; add a unit (e.g. 12MB) for bytes")
            return cls(fraction=value)
        if unit not in _UNITS:
            raise UserError(f"{option} {text!r}: unknown unit {m[2]!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
        return cls(nbytes=int(value * _UNITS[unit]))

    def resolve(self, reference_bytes: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.fraction * reference_bytes)

    def label(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.nbytes}B"


class InfeasibleBudget(UserError):
    """No layout fits; the message names the smallest feasible budget."""
