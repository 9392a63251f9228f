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
from typing import Literal

import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.paths import confined, task_name_problem

from exporters import executorch_backend, onnx_backend
from exporters.manifest import SCHEMA, FileEntry, Manifest, file_entry
from exporters.slots import SlotLayout, attach_slots, layout_from_bank, merge_into, task_graph_tensors

Format = Literal["executorch", "onnx"]
TASK_EXT = {"executorch": ".safetensors", "onnx": ".onnx_adapter"}
RUNTIME = {"executorch": "executorch", "onnx": "onnxruntime"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "generation_config.json",
)
DEFAULT_MAX_CACHE_LEN = 256
EXPORT = json_marker("export folder", "manifest.json", "schema", SCHEMA.split("/")[0] + "/")
TASK_ENCODING = {
    "executorch": "the bank's encoding (fp16, or int8/int4 codes + fp16 scales), decoded to fp32 on load",
    "onnx": "fp16 values, or int8 codes (int4 unpacked to one per byte) + fp16 scales, decoded to fp32 on load by task_decoder.onnx",
}


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


def _load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def _copy_tokenizer(model_dir: Path, folder: Path) -> list[str]:
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if present:
        (folder / "tokenizer").mkdir()
        for name in present:
            shutil.copy2(model_dir / name, folder / "tokenizer" / name)
    return [f"tokenizer/{name}" for name in present]


def _model_info(model: torch.nn.Module, max_cache_len: int) -> dict:
    config = model.config
    kv_heads, head_dim = onnx_backend.kv_shape(config)
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
    fmt: Format,
    quant: str,
    out: str | Path,
    overwrite: bool = False,
    merged_task: str | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
) -> Path:
    """Export a bank for ``fmt`` (``executorch`` or ``onnx``) with the base model in ``model_dir``.

    ``quant``: ``fp32``/``8da4w``/``8da8w`` for ExecuTorch, ``fp32``/``int4``/``int8`` for ONNX.
    ``merged_task``: instead of switchable slots, fold that task's effective adapter into the base
    weights (the "one fully merged model per task" deployment, used as the latency and bytes
    reference); the export then serves only that task and has no task files.
    """
    if fmt not in TASK_EXT:
        raise ValueError(f"--format {fmt!r}: choose executorch or onnx")
    allowed = executorch_backend.QUANTS if fmt == "executorch" else onnx_backend.QUANTS
    if quant not in allowed:
        raise ValueError(f"--quant {quant!r}: {fmt} exports support {', '.join(allowed)}")
    bank = _load_bank(bank_or_path)
    for task in bank.tasks:  # they become file names (a bundle's were checked when it was read)
        problem = task_name_problem(task)
        if problem:
            raise ValueError(problem)
    model_dir = Path(model_dir)
    export_id = uuid.uuid4().hex[:16]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    inputs = [model_dir] if isinstance(bank_or_path, MergedBank) else [model_dir, Path(bank_or_path)]
    with atomic_dir(Path(out), overwrite, kind=EXPORT, inputs=inputs) as folder, Progress(*columns, transient=True) as bar:
        step = bar.add_task(f"export {fmt}/{quant}: loading base model")
        model = _load_model(model_dir)
        info = _model_info(model, max_cache_len)
        layout = layout_from_bank(bank)
        if merged_task is not None:
            merge_into(model, layout.task_factors(merged_task))
            tasks, layout = [merged_task], SlotLayout([merged_task], {}, {}, {merged_task: {}})
        else:
            tasks = list(bank.tasks)
        switchable = attach_slots(model, layout)
        bar.update(step, description=f"export {fmt}/{quant}: tracing and lowering (ExecuTorch XNNPACK: minutes)")
        if fmt == "executorch":
            program = executorch_backend.export_program(model, switchable, folder, quant, max_cache_len)
        else:
            program = onnx_backend.export_program(model, list(switchable), folder, quant)
        files: list[FileEntry] = [file_entry(folder, program.name, "program")]
        bar.update(step, description=f"export {fmt}/{quant}: task files")
        task_tensors = {n: list(shape) for n, shape in switchable.items()}
        if switchable and fmt == "onnx":
            files.append(file_entry(folder, onnx_backend.export_task_decoder(layout, folder).name, "task_decoder"))
            task_tensors = {n: list(t.shape) for n, t in task_graph_tensors(layout, tasks[0]).items()}
        if switchable:
            (folder / "tasks").mkdir()
            for task in tasks:
                rel = f"tasks/{task}{TASK_EXT[fmt]}"
                path = confined(folder, rel, ValueError)
                if fmt == "executorch":
                    executorch_backend.write_task_file(path, layout.stored[task], export_id, task)
                else:
                    onnx_backend.write_task_file(path, task_graph_tensors(layout, task))
                files.append(file_entry(folder, rel, "task", task))
        tokenizer = _copy_tokenizer(model_dir, folder)
        files += [file_entry(folder, rel, "tokenizer") for rel in tokenizer]
        Manifest(
            export_id=export_id,
            runtime=RUNTIME[fmt],
            quant=quant,
            method=bank.method if merged_task is None else f"{bank.method}+merged:{merged_task}",
            tasks=tasks,
            files=files,
            task_tensors=task_tensors,
            task_dtype=TASK_ENCODING[fmt],
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
