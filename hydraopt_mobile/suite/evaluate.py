"""Scoring the base model, or any set of per-task effective adapters, on the suite.

Each effective adapter (an original one or a merged bundle's) is applied exactly, ``B @ A`` added
into the base weights while it is scored (hydraopt_mobile/adapter_weights.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from hydraopt_mobile.adapters import LoraFactors, load_adapter
from hydraopt_mobile.adapter_weights import applied
from hydraopt_mobile.suite.metrics import score
from hydraopt_mobile.suite.answer_cache import AnswerCache
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.prompts import render_prompt
from hydraopt_mobile.suite.tasks import TaskSpec

DEFAULT_BATCH_SIZE = 48  # one batch per 48-example test split: fewer, wider decode steps are faster on CPU


def adapters_from_folders(paths: dict[str, Path] | list[Path]) -> dict[str, dict[str, LoraFactors]]:
    """Read PEFT folders into ``task -> module -> LoraFactors`` (a list is keyed by folder name)."""
    items = paths.items() if isinstance(paths, dict) else ((Path(p).name, p) for p in paths)
    return {name: load_adapter(Path(path), name).modules for name, path in items}


@torch.no_grad()
def generate(model, tokenizer, task: TaskSpec, split: str = "test", batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
    """Greedy, KV-cached, batched (left-padded) answers to every example of ``split``, in order."""
    examples = task.split(split)
    prompts = [render_prompt(tokenizer, task, ex) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    tokenizer.padding_side = "left"
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            out[i] = text.strip()
    return out


def evaluate(
    tasks: list[TaskSpec],
    adapters: dict[str, dict[str, LoraFactors]] | None,
    model=None,
    tokenizer=None,
    split: str = "test",
    batch_size: int = DEFAULT_BATCH_SIZE,
    predictions: dict[str, list[str]] | None = None,
    cache: Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """``task -> score`` (0..100) on ``split``; ``adapters=None`` scores the base model.

    Otherwise every task is scored with its own effective adapter ``adapters[task.name]``.
    Pass a dict as ``predictions`` to also receive the generated texts. With a ``cache`` folder, a
    task already scored with the same weights, adapter, examples and decoding settings is not
    generated again (see :class:`AnswerCache`). ``on_step(done, total)`` after each task (the
    application draws it). Runs on torch's current thread count (the caller sets it).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model()
    if adapters is not None:
        missing = [t.name for t in tasks if t.name not in adapters]
        if missing:
            raise KeyError(f"no adapter for tasks {missing}")
    model.eval()
    store = AnswerCache(cache, model, tokenizer) if cache is not None else None
    scores: dict[str, float] = {}
    for done, task in enumerate(tasks):
        factors = None if adapters is None else adapters[task.name]
        key = store.key(task, split, factors, batch_size) if store else None
        texts = store.get(key) if store else None
        if texts is None:
            with applied(model, factors):
                texts = generate(model, tokenizer, task, split, batch_size)
            if store:
                store.put(key, texts)
        scores[task.name] = score(task, texts, split)
        if predictions is not None:
            predictions[task.name] = texts
        if on_step is not None:
            on_step(done + 1, len(tasks))
    return scores
