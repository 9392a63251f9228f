"""How closely banks reproduce their adapters end to end: per task, the mean over the tokens of the
task's calibration texts of ``KL(p_adapter || p_bank)``, the next-token distributions of the base
model with the task's own adapter and with the bank's effective adapter for that task.

Why a second measure beside the data-aware objective (calibration.py): that objective is
layer-wise, each module's output error on the base model's inputs, blind to how errors of several
modules combine downstream; before its per-module scaling it ranked the suite's banks otherwise
than their scores (benchmarks/results/calibration_heldout.md: calibrated banks with half the
objective of data-free ones scored lower in 6 of 8 pairs), and this KL showed those banks 1.8-4.5x
further from their adapters. The KL sees what the model does with all modules' errors together.
It needs no labels: every position of a text predicts its next token, the last excepted; of a
``(prompt, completion)`` pair only the positions that predict the completion's tokens count
(calibration.Text). A bank's value is the mean over tasks, so every task counts the same, as in the
objective's weights ``w_t``. Beside the KL, the share of positions whose most likely next token is
the adapter's (``agreement``): the same comparison in a unit a person reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.adapter_weights import applied
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.calibration import Text
from hydraopt_mobile.errors import UserError


MAX_TOKENS = 256  # a text is measured on its first this many tokens


def _measured(tokenizer, text: Text, max_tokens: int) -> tuple[list[int], int]:
    """A text's token ids (its first ``max_tokens``) and the first position whose next token is
    measured: 0 for a text; for ``(prompt, completion)`` the prompt's last, so that the completion's
    tokens are the ones compared. Prompt and completion are tokenized apart, as a model sees a
    prompt and then generates."""
    prompt, completion = ("", text) if isinstance(text, str) else text
    first = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
    ids = (first + tokenizer(completion, add_special_tokens=False).input_ids)[:max_tokens]
    return ids, max(len(first) - 1, 0)


@torch.no_grad()
def _log_probs(model, tokenizer, measured: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Per text tokenized by :func:`_measured`, the next-token log-probabilities at its measured
    positions (up to its last but one): (positions, vocab)."""
    width = max(len(ids) for ids, _ in measured)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in measured])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in measured])
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return [torch.log_softmax(row[start : len(ids) - 1].float(), dim=-1) for row, (ids, start) in zip(logits, measured)]


@dataclass(frozen=True)
class TaskFidelity:
    """How close a bank keeps one task to its adapter on that task's texts."""

    kl: float  # mean over positions of KL(p_adapter || p_bank)
    agreement: float  # fraction of positions where both predict the same next token (argmax)
    positions: int  # next-token positions measured: a text's tokens but the first, or a completion's tokens


def check_texts(tokenizer, texts: dict[str, list[Text]], max_tokens: int = MAX_TOKENS) -> None:
    """Each task has a text with a next token to compare (two tokens, or a prompt and a completion);
    else a UserError naming the task, before any pass through the model."""
    _checked({task: [_measured(tokenizer, r, max_tokens) for r in rows] for task, rows in texts.items()})


def _checked(tokenized: dict[str, list[tuple[list[int], int]]]) -> dict[str, list[tuple[list[int], int]]]:
    for task, rows in tokenized.items():
        if not any(len(ids) - 1 > start for ids, start in rows):
            raise UserError(f"texts of task {task!r}: none has a next token to compare (a text of two tokens or more, or a prompt and a completion)")
    return tokenized


def fidelity_to_adapters(model, tokenizer, adapters: AdapterSet, banks: list[MergedBank], texts: dict[str, list[Text]], batch_size: int = 16, max_tokens: int = MAX_TOKENS, on_step: Callable[[int, int], None] | None = None) -> list[dict[str, TaskFidelity]]:
    """Per bank, ``task -> TaskFidelity`` on ``texts[task]``, for every task of ``adapters`` (each
    bank stores those tasks). Batch by batch, the adapter's distributions first and then each
    bank's, so that memory holds one batch's, whatever the number of texts; ``on_step(done, total)``
    after each task. A bank that stores what an earlier one of the list stores (``content_digest``:
    a budget that gave the same plan as another, two methods that reached the same plan) is
    measured once: a forward pass per bank and batch is what this costs."""
    tokenized = _checked({task: [_measured(tokenizer, x, max_tokens) for x in texts[task]] for task in adapters.task_names})  # once, for every pass
    if not banks:
        return []
    keys = [bank.content_digest() for bank in banks]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    distinct = sorted(set(first.values()))
    measured: list[dict[str, TaskFidelity]] = [{} for _ in distinct]
    for t, task in enumerate(adapters.task_names):
        own: dict[str, LoraFactors] = {name: adapters.factors(name)[t] for name in adapters.module_names}
        effective = [banks[i].task_factors(task) for i in distinct]
        kl, agree, positions = [0.0] * len(distinct), [0] * len(distinct), 0
        for i in range(0, len(tokenized[task]), batch_size):
            batch = tokenized[task][i : i + batch_size]
            with applied(model, own):
                reference = _log_probs(model, tokenizer, batch)
            positions += sum(r.shape[0] for r in reference)
            for b, factors in enumerate(effective):
                with applied(model, factors):
                    got = _log_probs(model, tokenizer, batch)
                kl[b] += sum(float((r.exp() * (r - g)).sum()) for r, g in zip(reference, got))
                agree[b] += sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, got))
        for b in range(len(distinct)):
            measured[b][task] = TaskFidelity(kl[b] / max(positions, 1), agree[b] / max(positions, 1), positions)
        if on_step is not None:
            on_step(t + 1, len(adapters.task_names))
    by_bank = dict(zip(distinct, measured))
    return [by_bank[first[key]] for key in keys]


def kl_to_adapters(model, tokenizer, adapters: AdapterSet, banks: list[MergedBank], texts: dict[str, list[Text]], batch_size: int = 16, max_tokens: int = MAX_TOKENS, on_step: Callable[[int, int], None] | None = None) -> list[dict[str, float]]:
    """Per bank, ``task -> KL(adapter || bank)``: :func:`fidelity_to_adapters`' KL."""
    measured = fidelity_to_adapters(model, tokenizer, adapters, banks, texts, batch_size, max_tokens, on_step)
    return [{task: f.kl for task, f in per_task.items()} for per_task in measured]


def mean_kl(per_task: dict[str, float]) -> float:
    return sum(per_task.values()) / len(per_task)
