"""``export_bank``: a merged bank plus a base model folder -> a self-contained export folder.

Layout of an export folder::

    manifest.json              files, bytes, SHA-256, tasks, slots, bank layouts, tokenizer, export id
    model.pte | model.onnx     the program: base weights + zero LoRA slots of the signature; a function
                               of (base model, quantisation, KV cache length, signature) only
    bank/manifest.json         the bank's bundle manifest (hydraopt_mobile/bundle.py)
    bank/shared.safetensors    factors used by two or more tasks, the bank's number format: loaded once
    bank/tasks/<task>.safetensors  factors of that task alone: read on each task load
    tokenizer/                 tokenizer and chat template copied from the model folder

The data files are the bank's own bundle files, so their bytes are ``MergedBank.file_bytes()``
exactly and ``bank/`` is a bundle (``load_bundle`` reads it: ``bench`` finds its PyTorch reference
there). Programs are cached by signature (``exporters/program_cache.py``): a second bank that fits a
cached program's signature is exported without lowering anything. The folder is written in a
temporary place and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch
from rich import get_console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank, factor_file
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.bundle import MANIFEST as BUNDLE_MANIFEST, sorted_tasks, write_bundle_files
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.paths import task_name_problem

from exporters.backend import Backend, ProgramSpec, check_quant
from exporters.manifest import SCHEMA, FileEntry, Manifest, file_entry
from exporters.onnx_backend import kv_shape
from exporters.program_cache import cached_program, place_program, program_key, store_program
from exporters.registry import backend_for
from exporters.slots import attach_slots, bank_signature, check_base_model, check_fits, merge_into, parse_slot_spec

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "generation_config.json",
)
DEFAULT_MAX_CACHE_LEN = 256
EXPORT = json_marker("export folder", "manifest.json", "schema", SCHEMA.split("/")[0] + "/")


def _load_bank(bank_or_path: MergedBank | str | Path) -> MergedBank:
    if isinstance(bank_or_path, MergedBank):
        bank = bank_or_path
    else:
        from hydraopt_mobile.bundle import load_bundle

        bank = load_bundle(Path(bank_or_path))
    signs = sorted({m.fmt.label() for m in bank.modules.values() if m.A and m.fmt.name == "sign"})
    if signs:
        raise UserError(
            f"{bank_or_path if not isinstance(bank_or_path, MergedBank) else 'bank'}: method {bank.method!r} stores {', '.join(signs)} "
            "(sparse signs, ComPEFT): no exporter decodes that format; unpack the tasks to PEFT (hydraopt unpack) instead"
        )
    return bank


def bank_digest(bank: MergedBank) -> str:
    """SHA-256 (16 hex) over a bank's tasks, layouts and stored factor bytes: which bank an export holds."""
    h = hashlib.sha256(json.dumps([bank.method, bank.tasks]).encode())
    bank.hash_factors(h)
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


def _task_files(bank: MergedBank, task: str) -> list[str]:
    """The bank files ``task`` reads: the shared file if it uses a shared factor, then its own."""
    t = bank.task_index(task)
    used = set()
    for m in bank.modules.values():
        for factors, index in ((m.A, m.a_index), (m.B, m.b_index)):
            if factors[index[t]].shape[0] and factors[index[t]].shape[1]:
                used.add(factor_file(bank.tasks, index, index[t])[0])
    return [f"bank/{rel}" for rel in sorted(used, key=lambda rel: rel.startswith("tasks/"))]


def _program(backend: Backend, model: torch.nn.Module, spec: ProgramSpec, folder: Path, key: tuple[str, dict] | None,
             fp32_key: tuple[str, dict] | None = None) -> tuple[dict[str, str], dict]:
    """The program files (role -> path) in ``folder``, from the cache when ``key`` is cached, else
    lowered (and cached when ``key`` is given); and how: ``{"source", "phases_s"}``.

    A back end with ``derive_program`` (ONNX: the quantisation recipes rewrite the lowered fp32
    graph) gets a quantised program from the fp32 program of ``fp32_key``, lowering and caching
    that first when it is not cached yet."""
    if key is not None:
        cached = cached_program(key[0], backend.program_file)
        if cached is not None:
            return {"program": backend.program_file}, {"source": f"cache ({place_program(cached, folder / backend.program_file)})", "phases_s": {}}
    phases: dict[str, float] = {}
    derive = getattr(backend, "derive_program", None)
    if derive is not None and fp32_key is not None and spec.quant != "fp32":
        fp32 = cached_program(fp32_key[0], backend.program_file)
        source = "derived from the cached fp32 program"
        if fp32 is None:
            files = backend.export_program(model, replace(spec, quant="fp32"), folder, phases)
            store_program(fp32_key[0], fp32_key[1], folder / files["program"])
            fp32 = cached_program(fp32_key[0], backend.program_file)
            source = "derived from the fp32 program (lowered and cached)"
        files = derive(fp32, spec, folder, phases)
        how = {"source": source, "phases_s": phases}
    else:
        files = backend.export_program(model, spec, folder, phases)
        how = {"source": "lowered", "phases_s": phases}
    if key is not None:
        store_program(key[0], key[1], folder / files["program"])
    return files, how


def export_bank(
    bank_or_path: MergedBank | str | Path,
    model_dir: str | Path,
    fmt: str,
    quant: str,
    out: str | Path,
    overwrite: bool = False,
    merged_task: str | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    slots: str | dict[str, int] | None = None,
    use_cache: bool = True,
    attention: str | None = None,
) -> Path:
    """Export a bank for ``fmt`` (a back end of ``exporters.registry.BACKENDS``: ``executorch`` or
    ``onnx``) with the base model in ``model_dir``.

    ``quant``: one of the back end's ``quants`` (ExecuTorch ``fp32``/``8da4w``/``8da8w``, ONNX
    ``fp32``/``int4``/``int8``). ``slots``: the program's signature, a ``--slots`` spec
    (``exporters/slots.py``) or module -> rank; default: the bank's own modules and ranks. A bank
    module outside it or of a larger rank is refused. ``use_cache``: reuse and store programs in the
    project cache (``exporters/program_cache.py``). ``merged_task``: instead of slots, fold that
    task's effective adapter into the base weights (the "one fully merged model per task"
    deployment, used as the latency and bytes reference); the export then serves only that task,
    its program is never cached, and its bank files are only the reference for ``bench``.
    ``attention``: ExecuTorch only, which attention kernels the program uses
    (``exporters/et_attention.py``: ``custom-ops``, the default, or ``portable`` for runtimes built
    without ExecuTorch's LLM custom ops); recorded as the manifest's ``model.attention``.
    """
    backend = backend_for(fmt)
    check_quant(backend, quant)
    if backend.runtime == "executorch":
        from exporters.et_attention import DEFAULT_ATTENTION
        from exporters.executorch_backend import check_attention

        attention = attention or DEFAULT_ATTENTION
        check_attention(attention)
    elif attention is not None:
        raise UserError(f"--attention {attention!r}: only ExecuTorch exports have a choice of attention kernels")
    bank = _load_bank(bank_or_path)
    for task in bank.tasks:  # they become file names (a bundle's were checked when it was read)
        problem = task_name_problem(task)
        if problem:
            raise UserError(problem)
    bank = sorted_tasks(bank)
    if merged_task is not None and merged_task not in bank.tasks:
        raise UserError(f"--merged-task {merged_task!r}: not a task of the bank ({', '.join(bank.tasks)})")
    model_dir = Path(model_dir)
    export_id = uuid.uuid4().hex[:16]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    inputs = [model_dir] if isinstance(bank_or_path, MergedBank) else [model_dir, Path(bank_or_path)]
    quiet = not get_console().is_terminal  # a transient bar in a pipe or a log leaves only an empty line
    with atomic_dir(Path(out), overwrite, kind=EXPORT, inputs=inputs) as folder, Progress(*columns, transient=True, disable=quiet) as bar:
        step = bar.add_task(f"export {fmt}/{quant}: loading base model")
        t0 = time.perf_counter()
        model = load_causal_lm(model_dir)
        check_base_model(bank, model)
        info = _model_info(model, max_cache_len)
        if attention is not None:
            info["attention"] = attention
        if merged_task is not None:
            merge_into(model, bank.task_factors(merged_task))
            signature: dict[str, int] = {}
        else:
            signature = parse_slot_spec(slots, model) if isinstance(slots, str) else dict(slots or bank_signature(bank))
            check_fits(bank, signature)
        shapes = attach_slots(model, signature)
        cached = use_cache and merged_task is None
        key = program_key(model_dir, backend.runtime, quant, max_cache_len, signature, attention) if cached else None
        fp32_key = program_key(model_dir, backend.runtime, "fp32", max_cache_len, signature, attention) if cached else None
        load_s = time.perf_counter() - t0
        bar.update(step, description=f"export {fmt}/{quant}: program (cached, or lowered: ExecuTorch XNNPACK takes minutes)")
        program, how = _program(backend, model, ProgramSpec(shapes, quant, max_cache_len, attention), folder, key, fp32_key)
        files: list[FileEntry] = [file_entry(folder, rel, role) for role, rel in program.items()]
        inputs, placement = backend.program_slots(model, shapes)
        bar.update(step, description=f"export {fmt}/{quant}: bank files")
        (folder / "bank").mkdir()
        bundle = write_bundle_files(bank, folder / "bank")
        data_role = "reference" if merged_task is not None else None
        files.append(file_entry(folder, f"bank/{BUNDLE_MANIFEST}", data_role or "bank"))
        for rel in bundle["files"]:
            task = rel.removeprefix("tasks/").removesuffix(".safetensors") if rel.startswith("tasks/") else None
            files.append(file_entry(folder, f"bank/{rel}", data_role or ("task" if task else "shared"), None if data_role else task))
        tokenizer = _copy_tokenizer(model_dir, folder)
        files += [file_entry(folder, rel, "tokenizer") for rel in tokenizer]
        Manifest(
            export_id=export_id,
            runtime=backend.runtime,
            quant=quant,
            method=bank.method if merged_task is None else f"{bank.method}+merged:{merged_task}",
            tasks=list(bank.tasks) if merged_task is None else [merged_task],
            files=files,
            slots=[[name, list(shape)] for name, shape in inputs.items()],
            placement=placement,
            signature=signature,
            bank={"modules": bundle["modules"], "layouts": bundle["layouts"]},
            task_files={} if merged_task is not None else {t: _task_files(bank, t) for t in bank.tasks},
            program={"sha256": files[0].sha256, "key": key[0] if key else ""},
            tokenizer_dir="tokenizer" if tokenizer else None,
            bank_fingerprint={"fingerprint": bank.fingerprint, "params": bank.params, "tasks": bank.tasks},
            model=info,
            extra={"bank_digest": bank_digest(bank), "program_source": how["source"], "phases_s": {"load_model": load_s, **how["phases_s"]}},
        ).write(folder)
        bar.update(step, description=f"export {fmt}/{quant}: done")
    return Path(out)
