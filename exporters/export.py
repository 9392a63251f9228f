"""``export_bank``: a merged bank plus a base model folder -> a self-contained export folder.

Layout of an export folder::

    manifest.json            files, bytes, SHA-256, tasks, slots, tokenizer location, export id
    model.pte | model.onnx   resident part: base weights + shared LoRA factors + generation graph
    tasks/<task>.<ext>       one per task: that task's switchable LoRA tensors (fp16)
    tokenizer/               tokenizer and chat template copied from the model folder

The folder is written in a temporary place and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.paths import confined, task_name_problem

from exporters.backend import ProgramSpec, check_quant
from exporters.manifest import SCHEMA, FileEntry, Manifest, file_entry
from exporters.onnx_backend import kv_shape
from exporters.registry import backend_for
from exporters.slots import SlotLayout, attach_slots, layout_from_bank, merge_into

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "generation_config.json",
)
DEFAULT_MAX_CACHE_LEN = 256
EXPORT = json_marker("export folder", "manifest.json", "schema", SCHEMA.split("/")[0] + "/")


def _load_bank(bank_or_path: MergedBank | str | Path) -> MergedBank:
    if isinstance(bank_or_path, MergedBank):
        return bank_or_path
    from hydraopt_mobile.bundle import load_bundle

    return load_bundle(Path(bank_or_path))


def bank_digest(bank: MergedBank) -> str:
    """SHA-256 (16 hex) over a bank's tasks, layouts and stored factor bytes: which bank an export holds."""
    h = hashlib.sha256(json.dumps([bank.method, bank.tasks]).encode())
    for name in sorted(bank.modules):
        m = bank.modules[name]
        h.update(json.dumps([name, m.a_index, m.b_index]).encode())
        for factor in m.A + m.B:
            for key in sorted(factor.data):
                h.update(factor.data[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _copy_tokenizer(model_dir: Path, folder: Path) -> list[str]:
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if present:
        (folder / "tokenizer").mkdir()
        for name in present:
            shutil.copy2(model_dir / name, folder / "tokenizer" / name)
    return [f"tokenizer/{name}" for name in present]


def _model_info(model: torch.nn.Module, max_cache_len: int) -> dict:
    config = model.config
    kv_heads, head_dim = kv_shape(config)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else config.eos_token_id
    return {
        "architecture": type(model).__name__,
        "n_layers": config.num_hidden_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        "max_cache_len": max_cache_len,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def export_bank(
    bank_or_path: MergedBank | str | Path,
    model_dir: str | Path,
    fmt: str,
    quant: str,
    out: str | Path,
    overwrite: bool = False,
    merged_task: str | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
) -> Path:
    """Export a bank for ``fmt`` (a back end of ``exporters.registry.BACKENDS``: ``executorch`` or
    ``onnx``) with the base model in ``model_dir``.

    ``quant``: one of the back end's ``quants`` (ExecuTorch ``fp32``/``8da4w``/``8da8w``, ONNX
    ``fp32``/``int4``/``int8``). ``merged_task``: instead of switchable slots, fold that task's
    effective adapter into the base weights (the "one fully merged model per task" deployment, used
    as the latency and bytes reference); the export then serves only that task and has no task files.
    """
    backend = backend_for(fmt)
    check_quant(backend, quant)
    bank = _load_bank(bank_or_path)
    for task in bank.tasks:  # they become file names (a bundle's were checked when it was read)
        problem = task_name_problem(task)
        if problem:
            raise UserError(problem)
    if merged_task is not None and merged_task not in bank.tasks:
        raise UserError(f"--merged-task {merged_task!r}: not a task of the bank ({', '.join(bank.tasks)})")
    model_dir = Path(model_dir)
    export_id = uuid.uuid4().hex[:16]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    inputs = [model_dir] if isinstance(bank_or_path, MergedBank) else [model_dir, Path(bank_or_path)]
    with atomic_dir(Path(out), overwrite, kind=EXPORT, inputs=inputs) as folder, Progress(*columns, transient=True) as bar:
        step = bar.add_task(f"export {fmt}/{quant}: loading base model")
        model = load_causal_lm(model_dir)
        info = _model_info(model, max_cache_len)
        layout = layout_from_bank(bank)
        if merged_task is not None:
            merge_into(model, layout.task_factors(merged_task))
            tasks, layout = [merged_task], SlotLayout([merged_task], {}, {}, {merged_task: {}})
        else:
            tasks = list(bank.tasks)
        switchable = attach_slots(model, layout)
        bar.update(step, description=f"export {fmt}/{quant}: tracing and lowering (ExecuTorch XNNPACK: minutes)")
        resident = backend.export_program(model, ProgramSpec(layout, switchable, quant, max_cache_len), folder)
        files: list[FileEntry] = [file_entry(folder, rel, role) for role, rel in resident.items()]
        bar.update(step, description=f"export {fmt}/{quant}: task files")
        if switchable:
            (folder / "tasks").mkdir()
            for task in tasks:
                rel = f"tasks/{task}{backend.task_ext}"
                backend.write_task_file(confined(folder, rel, UserError), layout, task, export_id)
                files.append(file_entry(folder, rel, "task", task))
        tokenizer = _copy_tokenizer(model_dir, folder)
        files += [file_entry(folder, rel, "tokenizer") for rel in tokenizer]
        Manifest(
            export_id=export_id,
            runtime=backend.runtime,
            quant=quant,
            method=bank.method if merged_task is None else f"{bank.method}+merged:{merged_task}",
            tasks=tasks,
            files=files,
            task_tensors=backend.task_tensors(layout, switchable) if switchable else {},
            task_dtype=backend.task_encoding,
            resident_slots=sorted(layout.resident),
            tokenizer_dir="tokenizer" if tokenizer else None,
            bank_fingerprint={"fingerprint": bank.fingerprint, "params": bank.params, "tasks": bank.tasks},
            model=info,
            extra={
                "bundle": None if isinstance(bank_or_path, MergedBank) else str(Path(bank_or_path).resolve()),
                "bank_digest": bank_digest(bank),
            },
        ).write(folder)
        bar.update(step, description=f"export {fmt}/{quant}: done")
    return Path(out)
