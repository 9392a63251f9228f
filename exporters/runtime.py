"""Running an export on its real runtime: :func:`open_export` opens the session of the back end the
manifest names (``exporters.registry``), and :func:`greedy` decodes with any session
(:class:`exporters.backend.Session`: ``load_task``, ``set_task``, ``prefill``, ``decode``).
:func:`answer_tasks` is what an app does with them: one session answers a prompt (in the export's
own tokenizer and chat template, :func:`export_tokenizer`) with each task in turn, switching in
place (``hydraopt run``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters.backend import Session
from exporters.manifest import Manifest
from exporters.registry import backend_for_runtime
from hydraopt_mobile.errors import UserError


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


def export_tokenizer(folder: Path):
    """The tokenizer and chat template shipped in the export."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder / Manifest.read(folder).tokenizer_dir))


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


def answer_tasks(export: Path, prompt: str, tasks: list[str] | None = None, system: str | Mapping[str, str] | None = None,
                 raw: bool = False, max_new_tokens: int = 64, threads: int = 1) -> list[dict]:
    """One greedy answer per task (default: every task of the export, in its order), from one
    session; ``system``: one system message for all tasks, or one per task. Each record: ``task``,
    ``answer``, ``tokens``, ``switch_ms`` (the task's first activation: read, check and decode its
    file, then switch), ``prefill_ms`` and ``decode_ms_per_token`` (median over the steps; None for
    a one-token answer): host timings."""
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
