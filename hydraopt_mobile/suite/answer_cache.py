"""A disk cache of generated answers, so that re-running the demo does not decode again.

A key covers everything a generation depends on: the base weights (hashed once per cache), the
rendered prompts (chat template included), the task's token budget, the split, the effective adapter's factors, the
batch size and the decoding code's version. A changed adapter, model or task therefore misses.
Answers (not scores) are stored, so a metric fix applies to cached runs too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.atomic import write_text_atomic
from hydraopt_mobile.suite.prompts import render_prompt
from hydraopt_mobile.suite.tasks import TaskSpec

# Bump when greedy decoding changes in a way that can change an answer.
DECODING_VERSION = 1


def _update(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: a size-1 dim may carry any stride


def weights_digest(model) -> str:
    """sha256 of every parameter and buffer of ``model`` (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()


class AnswerCache:
    def __init__(self, folder: Path, model, tokenizer):
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.model_digest = weights_digest(model)

    def key(self, task: TaskSpec, split: str, factors: dict[str, LoraFactors] | None, batch_size: int) -> str:
        h = hashlib.sha256()
        prompts = [render_prompt(self.tokenizer, task, e) for e in task.split(split)]
        h.update(json.dumps([DECODING_VERSION, self.model_digest, task.max_new_tokens, prompts, batch_size]).encode())
        for name in sorted(factors or {}):
            h.update(name.encode())
            _update(h, factors[name].A)
            _update(h, factors[name].B)
        return h.hexdigest()

    def get(self, key: str) -> list[str] | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text())["texts"] if path.is_file() else None

    def put(self, key: str, texts: list[str]) -> None:
        write_text_atomic(self.folder / f"{key}.json", json.dumps({"texts": texts}))
