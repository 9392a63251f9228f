"""Headless plots: one figure, drawn by the caller, saved to a PNG and closed.

Every plot of the toolkit and its benchmarks is drawn inside :func:`figure`, so none repeats the
backend choice (Agg: build machines and CI have no display), the layout pass, the save and the
cleanup (a figure left open keeps its memory for the life of the process, also when drawing fails).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal


@contextmanager
def figure(png: Path, ncols: int = 1, *, figsize: tuple[float, float], dpi: int = 110, squeeze: bool = True,
           layout: Literal["tight", "constrained", "crop"] = "tight") -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` of ``plt.subplots(1, ncols, squeeze=squeeze)``; after the block the figure is laid
    out (``tight``: ``tight_layout``; ``constrained``: matplotlib's constrained layout while drawing;
    ``crop``: the PNG cropped to what was drawn), written to ``png`` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=squeeze, constrained_layout=layout == "constrained")
    try:
        yield fig, axes
        if layout == "tight":
            fig.tight_layout()
        fig.savefig(png, dpi=dpi, bbox_inches="tight" if layout == "crop" else None)
    finally:
        plt.close(fig)
