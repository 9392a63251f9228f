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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Llama of tests/tiny_models.py, saved once per test module."""
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def bank():
    """The tiny bank with every kind of slot (tests/tiny_models.py: make_bank)."""
    from tiny_models import make_bank

    return make_bank()


@pytest.fixture(scope="module")
def refs(tiny_dir, bank):
    """``refs(task, seq)``: PyTorch logits of the tiny model with ``task``'s adapter merged (None: base), cached."""
    from tiny_models import reference_logits

    cache: dict = {}

    def get(task: str | None, seq: list[int]):
        if (task, tuple(seq)) not in cache:
            cache[(task, tuple(seq))] = reference_logits(tiny_dir, bank, task, seq)
        return cache[(task, tuple(seq))]

    return get


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
