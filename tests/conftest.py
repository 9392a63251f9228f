from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _program_cache(tmp_path_factory) -> None:
    """Exports in tests cache their programs in a temporary folder, not the user's cache."""
    import os

    os.environ["HYDRAOPT_PROGRAM_CACHE"] = str(tmp_path_factory.mktemp("program-cache"))


@pytest.fixture
def make_adapters(tmp_path: Path):
    """Write planted PEFT adapters (shared A + noise, B per task) and return their folders."""

    def make(n_tasks: int = 4, rank: int = 4, noise: float = 0.05, n_layers: int = 2, hidden: int = 64, kv: int = 32, seed: int = 0, root: Path | None = None, **write_kw) -> list[Path]:
        root = root or tmp_path / "adapters"
        shapes = llama_shapes(n_layers, hidden, kv)
        paths = []
        for t, f in enumerate(planted_factors(shapes, n_tasks, rank, noise, seed)):
            paths.append(write_peft_adapter(root / f"task{t}", f, rank, 2 * rank, **write_kw))
        return paths

    return make
