"""torch's CPU thread count, set at the command-line and benchmark boundary only: the library and
the suite run on whatever the caller chose."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def idle_cores() -> int:
    """Cores minus the 1-minute load average, at least 1: torch threads on a busy core stall the rest."""
    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block on ``n`` torch threads (0: :func:`idle_cores`), then restore the previous count."""
    import torch  # here, not at import: the command line's --help needs no torch

    before = torch.get_num_threads()
    torch.set_num_threads(n if n > 0 else idle_cores())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
