"""Running an export on its real runtime: :func:`open_export` opens the session of the back end the
manifest names (``exporters.registry``), and :func:`greedy` decodes with any session
(:class:`exporters.backend.Session`: ``load_task``, ``set_task``, ``prefill``, ``decode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters.backend import Session
from exporters.manifest import Manifest
from exporters.registry import backend_for_runtime


def open_export(folder: str | Path, threads: int = 1) -> Session:
    """A session on the runtime the export was made for."""
    return backend_for_runtime(Manifest.read(Path(folder)).runtime).open_session(Path(folder), threads)


@dataclass
class Generation:
    tokens: list[int]  # generated tokens (without the prompt)
    logits: list[np.ndarray] = field(repr=False)  # [prefill logits (n, V)] + one (V,) per decode step
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    def token_logits(self) -> np.ndarray:
        """(generated tokens, V): the logits each generated token was chosen from, the prefill's last
        row and then one row per decode step; kept only with ``greedy(..., keep_logits=True)``."""
        return np.stack([self.logits[0][-1], *self.logits[1:]])


def greedy(session: Session, ids: list[int], max_new_tokens: int, keep_logits: bool = False, eos: list[int] | None = None) -> Generation:
    """Greedy decoding on the runtime; stops at an end-of-sequence token (``eos``, default the
    manifest's). ``session`` may be any object with ``prefill`` and ``decode`` when ``eos`` is given
    (``benchmarks/vs_optimum.py`` runs other tools' programs through it)."""
    import time

    eos = set(session.manifest.model["eos_token_id"] if eos is None else eos)
    t0 = time.perf_counter()
    logits = session.prefill(ids)
    gen = Generation([], [logits] if keep_logits else [], time.perf_counter() - t0)
    token = int(np.argmax(logits[-1]))
    while True:
        gen.tokens.append(token)
        if token in eos or len(gen.tokens) >= max_new_tokens:
            return gen
        t0 = time.perf_counter()
        step = session.decode(token)
        gen.decode_s.append(time.perf_counter() - t0)
        if keep_logits:
            gen.logits.append(step)
        token = int(np.argmax(step))
