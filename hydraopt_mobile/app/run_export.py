"""``hydraopt run EXPORT PROMPT``: try an export before an app ships it. One session on the export's
own runtime answers the prompt with each task in turn, switching tasks in place as the app does
(the program loads once; a task's file is read, checked and decoded on its first use)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

from exporters.manifest import Manifest
from hydraopt_mobile.errors import UserError


def prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """The prompt's token ids: the user turn (after ``system``, if given) in the tokenizer's chat
    template with the assistant turn opened, or ``prompt`` as it is with ``raw``."""
    if raw:
        if system is not None:
            raise UserError("--system applies to the chat template; with --raw, put it in the prompt")
        return tokenizer(prompt, add_special_tokens=False).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the export's tokenizer has no chat template: pass --raw to feed the prompt as it is")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def suite_instructions(tasks: list[str]) -> dict[str, str]:
    """Each suite task's instruction, the system message its adapter was trained with."""
    from hydraopt_mobile.suite.tasks import TASK_NAMES, load_suite

    if unknown := [t for t in tasks if t not in TASK_NAMES]:
        raise UserError(f"--suite-instructions: {', '.join(map(repr, unknown))} not suite tasks (suite: {', '.join(TASK_NAMES)})")
    return {t.name: t.instruction for t in load_suite(tasks)}


def answer_tasks(export: Path, prompt: str, tasks: list[str] | None = None, system: str | Mapping[str, str] | None = None,
                 raw: bool = False, max_new_tokens: int = 64, threads: int = 1) -> list[dict]:
    """One greedy answer per task (default: every task of the export, in its order), from one
    session; ``system``: one system message for all tasks, or one per task. Each record: ``task``,
    ``answer``, ``tokens``, ``switch_ms`` (the task's first activation: read, check and decode its
    file, then switch), ``prefill_ms`` and ``decode_ms_per_token`` (median over the steps; None for
    a one-token answer): host timings."""
    from exporters.runtime import greedy, open_export

    from .bench import export_tokenizer

    manifest = Manifest.read(export)
    tasks = list(manifest.tasks) if not tasks else tasks
    if unknown := [t for t in tasks if t not in manifest.tasks]:
        raise UserError(f"{export}: no task {', '.join(map(repr, unknown))}; its tasks: {', '.join(manifest.tasks)}")
    tokenizer = export_tokenizer(export)
    ids = {task: prompt_ids(tokenizer, prompt, system if not isinstance(system, Mapping) else system[task], raw) for task in tasks}
    session = open_export(export, threads)
    records = []
    for task in tasks:
        t0 = time.perf_counter()
        session.set_task(task)
        switch_ms = (time.perf_counter() - t0) * 1e3
        gen = greedy(session, list(ids[task]), max_new_tokens)
        records.append({
            "task": task,
            "answer": tokenizer.decode(gen.tokens, skip_special_tokens=True).strip(),
            "tokens": gen.tokens,
            "switch_ms": switch_ms,
            "prefill_ms": gen.prefill_s * 1e3,
            "decode_ms_per_token": statistics.median(gen.decode_s) * 1e3 if gen.decode_s else None,
        })
    return records
