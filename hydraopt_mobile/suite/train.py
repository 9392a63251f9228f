"""Training one PEFT LoRA adapter per task, deterministically, on CPU.

Determinism: the LoRA initialisation and the batch order both come from ``seed``; with one thread
and the same torch build, retraining reproduces the adapters bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.peft_io import write_peft_files
from hydraopt_mobile.suite.model import MODEL_ID, base_model_dir, load_base_model
from hydraopt_mobile.suite.prompts import training_ids
from hydraopt_mobile.suite.tasks import TaskSpec, load_suite
from hydraopt_mobile.suite.train_config import TrainConfig

WARMUP_FRACTION = 0.1
TRAINED = json_marker("trained adapter folder", "training.json", "base_model", MODEL_ID)


def _batches(task: TaskSpec, tokenizer, steps: int, batch_size: int, generator: torch.Generator):
    """``steps`` padded batches drawn epoch by epoch from a seeded permutation of the training set."""
    encoded = [training_ids(tokenizer, task, ex) for ex in task.train]
    order: list[int] = []
    for _ in range(steps):
        idx = []
        while len(idx) < batch_size:
            if not order:
                order = torch.randperm(len(encoded), generator=generator).tolist()
            idx.append(order.pop())
        rows = [encoded[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for j, (ids, lab) in enumerate(rows):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, : len(lab)] = torch.tensor(lab)
            mask[j, : len(ids)] = 1
        yield input_ids, labels, mask


def _answer_loss(lm, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, projecting only those positions to the vocabulary.

    Same value as the model's own loss, but the 49k-way LM head (a fifth of the model's compute)
    runs on a few answer positions instead of the whole padded batch.
    """
    hidden = lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _save_fp16(peft_model, out_dir: Path, meta: dict) -> None:
    """Write a standard PEFT folder with fp16 LoRA weights and ``training.json``, atomically; an
    existing folder is replaced only when it is a trained adapter folder itself."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state})
    factors = {m: (state[f"base_model.model.{m}.lora_A.weight"], state[f"base_model.model.{m}.lora_B.weight"]) for m in modules}
    config = {k: list(v) if isinstance(v, set) else v for k, v in peft_model.peft_config["default"].to_dict().items()}
    # PEFT records the local model path; a portable id keeps committed adapters machine-independent.
    config.update(base_model_name_or_path=MODEL_ID, inference_mode=True)
    with atomic_dir(out_dir, overwrite=True, kind=TRAINED) as tmp:
        write_peft_files(tmp, factors, config, torch.float16)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def train_adapter(task: TaskSpec, out_dir: Path, config: TrainConfig = TrainConfig(), *, model=None, tokenizer=None,
                  model_dir: Path | None = None, on_step: Callable[[int, int], None] | None = None) -> Path:
    """Train one LoRA adapter on ``task.train`` and write it to ``out_dir`` (fp16 PEFT folder).

    AdamW with linear warm-up then cosine decay; loss only on answer tokens. ``model``/``tokenizer``
    may be passed to reuse an already loaded base model (it is left unchanged). Runs on torch's
    current thread count (the caller sets it). ``on_step(done, total)`` after each optimiser step.
    """
    from peft import LoraConfig, get_peft_model

    settings = config.settings(task)
    steps, seed = settings["steps"], settings["seed"]
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model(model_dir)
    torch.manual_seed(seed)  # fixes the LoRA A initialisation
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    peft_model.train()
    start = time.time()
    losses: list[float] = []
    try:
        for step, (input_ids, labels, mask) in enumerate(_batches(task, tokenizer, steps, config.batch_size, generator)):
            loss = _answer_loss(peft_model.get_base_model(), input_ids, mask, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, steps)
        meta = {
            "task": task.name,
            "base_model": MODEL_ID,
            **settings,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "seconds": round(time.time() - start, 1),
            "first_loss": round(losses[0], 4),
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        }
        _save_fp16(peft_model, Path(out_dir), meta)
    finally:
        peft_model.unload()  # removes the LoRA layers, leaving the shared base model as it was
    return Path(out_dir)


def train_suite(out_dir: Path, config: TrainConfig = TrainConfig(), tasks: list[str] | None = None, model_dir: Path | None = None,
                on_step: Callable[[int, int], None] | None = None) -> dict[str, Path]:
    """Train every suite task's adapter into ``out_dir/<task>/``; returns task -> folder.
    ``on_step(done, total)`` counts optimiser steps over all tasks."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = model_dir or base_model_dir()
    model, tokenizer = load_base_model(model_dir)
    suite = load_suite(tasks, seed=0)
    total, done, out = sum(config.settings(t)["steps"] for t in suite), 0, {}
    for task in suite:
        step = None if on_step is None else (lambda i, _, before=done: on_step(before + i, total))
        out[task.name] = train_adapter(task, Path(out_dir) / task.name, config, model=model, tokenizer=tokenizer, on_step=step)
        done += config.settings(task)["steps"]
    return out
