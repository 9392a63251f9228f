"""Fuzz targets over everything this tool reads from outside (issue 11), shared by the bounded
property tests (test_fuzz.py) and the longer campaign (benchmarks/fuzz.py).

Each target starts from a valid input (tiny: 2 layers, 64 x 64, r=4), applies random mutations
drawn by hypothesis (values replaced by hostile or mistyped ones, keys deleted, lists permuted,
indices nudged, header bytes flipped) and reads the result with the real reader. The properties:

- the reader either accepts it or raises one of the tool's own error types (``TOOL_ERRORS``);
  any other exception is a finding (it would be a traceback);
- no file outside the input's folder is opened (a Python audit hook watches ``open``; a copy of a
  valid file with a matching checksum waits outside as bait);
- what is accepted round-trips: written back by the tool and read again, it gives the same values.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hypothesis import strategies as st
from typer.testing import CliRunner

from exporters.backend import Session
from exporters.targets.device_runner import BankSlots
from exporters.manifest import MANIFEST, Manifest, ManifestError, TaskFileError, file_entry, verify_all
from hydraopt_mobile.adapters import AdapterError, TaskAdapter, build_adapter_set, load_adapter
from hydraopt_mobile.bank import MergedBank, grouped_module
from hydraopt_mobile.bundle import BundleError, load_bundle, sha256_file, write_bundle
from hydraopt_mobile.app.cli import app
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.peft_io import write_peft_folder
from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

TOOL_ERRORS = (AdapterError, BundleError, ManifestError, TaskFileError)
BAIT = "outside.bin"

# ---------------------------------------------------------------- mutations

HOSTILE_STRINGS = [
    "", ".", "..", "../" + BAIT, "/etc/hostname", "tasks/../../" + BAIT, "tasks", "task0", "TASK0", "a/b",
    "shared.safetensors", "manifest.json", "fp16", "int8", "int4-g32", "int4-g7", "int4-gx", "w", "q", "scale",
    "-1", "NaN", "1e309", "\x00", "é", "q_proj(", ".*", "F16", "I64", "BOOL",
]
SCALARS = (
    st.none() | st.booleans() | st.integers(-3, 130) | st.integers(-(2**63), 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0.0, 1.0, 4.0, -1.0])  # integral floats: JSON Schema would call them integers
    | st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=12)
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate_json(data: st.DataObject, doc: Any, max_steps: int = 3) -> Any:
    """``doc`` after 1..max_steps random edits at random places of its tree."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, max_steps), label="steps")):
        path = data.draw(st.sampled_from(_paths(doc)), label="path")
        node = _get(doc, path)
        op = data.draw(st.sampled_from(["replace", "delete", "nudge", "permute", "sibling", "add"]), label="op")
        if op == "nudge" and isinstance(node, int) and not isinstance(node, bool):
            new: Any = node + data.draw(st.sampled_from([-1, 1, -node - 1, 99, 2**31]), label="delta")
        elif op == "permute" and isinstance(node, list) and len(node) > 1:
            new = data.draw(st.permutations(node), label="permutation")
        elif op == "permute" and isinstance(node, dict) and len(node) > 1:
            keys = list(node)
            new = dict(zip(keys, data.draw(st.permutations([node[k] for k in keys]), label="values")))
        elif op == "sibling":  # a value from elsewhere in the same document: plausible but wrong
            new = copy.deepcopy(_get(doc, data.draw(st.sampled_from(_paths(doc)), label="from")))
        elif op == "add" and isinstance(node, dict):
            node[data.draw(st.sampled_from(HOSTILE_STRINGS), label="key")] = data.draw(VALUES, label="value")
            continue
        elif op == "delete" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
            continue
        else:
            new = data.draw(VALUES, label="value")
        if not path:
            doc = new
        else:
            _get(doc, path[:-1])[path[-1]] = new
    return doc


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def mutate_safetensors(data: st.DataObject, raw: bytes) -> bytes:
    """A safetensors file with its header edited (JSON mutations, or raw byte flips and lengths)."""
    header, body = split_safetensors(raw)
    if data.draw(st.booleans(), label="json header edit"):
        text = json.dumps(mutate_json(data, header)).encode()
        return struct.pack("<Q", len(text)) + text + body
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, min(len(buf), 8 + len(json.dumps(header))) - 1), label="at")
        buf[i] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="length")]
    return bytes(buf)


# ---------------------------------------------------------------- watching reads


class ReadWatch:
    """Records every ``open`` of a path under ``root`` that is not under ``allowed`` (audit hook)."""

    root: Path | None = None
    allowed: Path | None = None
    escapes: list[str] = []
    _installed = False

    @classmethod
    def watch(cls, root: Path, allowed: Path) -> None:
        if not cls._installed:
            sys.addaudithook(cls._hook)
            cls._installed = True
        cls.root, cls.allowed, cls.escapes = root.resolve(), allowed.resolve(), []

    @classmethod
    def stop(cls) -> list[str]:
        cls.root = cls.allowed = None
        return cls.escapes

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        if event != "open" or cls.root is None or not isinstance(args[0], (str, Path)):
            return
        path = Path(args[0]).resolve()
        if path.is_relative_to(cls.root) and not path.is_relative_to(cls.allowed):
            cls.escapes.append(str(path))


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    make: Callable[[Path], Path]  # root -> the valid input's folder, under root
    read: Callable[[st.DataObject, Path], Any]  # mutate the copy of the folder, then read it (watched)
    round_trip: Callable[[Path, Any], None]  # what read accepted, written back and read again


def _dense(factors: dict) -> dict[str, torch.Tensor]:
    return {m: f.dense() for m, f in factors.items()}


def make_adapter(root: Path) -> Path:
    shapes = llama_shapes(2, 64, 32)
    return write_peft_adapter(root / "adapter", planted_factors(shapes, 1, 4, 0.05, 0)[0], 4, 8)


def adapter_round_trip(folder: Path, adapter: TaskAdapter) -> None:
    out = folder.parent / "round-trip"
    write_peft_folder(adapter.modules, out, adapter.base_model)
    again = load_adapter(out, "task0")
    want, got = _dense(adapter.modules), _dense(again.modules)
    assert want.keys() == got.keys() and all(torch.allclose(want[m], got[m], atol=1e-5) for m in want), "adapter round trip differs"


def read_adapter_config(data: st.DataObject, folder: Path) -> TaskAdapter:
    cfg = folder / "adapter_config.json"
    cfg.write_text(json.dumps(mutate_json(data, json.loads(cfg.read_text()))))
    return load_adapter(folder, "task0")


def read_adapter_header(data: st.DataObject, folder: Path) -> TaskAdapter:
    st_file = folder / "adapter_model.safetensors"
    st_file.write_bytes(mutate_safetensors(data, st_file.read_bytes()))
    return load_adapter(folder, "task0")


def make_export_folder(root: Path) -> Path:
    """An export folder's manifest and files (the bytes are stand-ins: only the manifest reader and
    the checksum verification run here; the runtimes' own tests use real exports)."""
    folder = root / "export"
    (folder / "bank" / "tasks").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"program" * 10)
    tasks = ["task0", "task1"]
    files = [file_entry(folder, "model.onnx", "program")]
    for t in tasks:
        (folder / "bank" / "tasks" / f"{t}.safetensors").write_bytes(t.encode() * 20)
        files.append(file_entry(folder, f"bank/tasks/{t}.safetensors", "task", t))
    model = {"architecture": "LlamaForCausalLM", "n_layers": 2, "kv_heads": 2, "head_dim": 16, "vocab_size": 256, "eos_token_id": [2], "max_cache_len": 64, "parameters": 1}
    layout = {"format": "fp16", "a_ranks": [4, 4], "b_ranks": [4, 4], "a_index": [0, 1], "b_index": [0, 1]}
    Manifest("0123456789abcdef", "onnxruntime", "fp32", "hydraopt", tasks, files, [["m.lora_a", [4, 64]], ["m.lora_b", [64, 4]]], [],
             {"m": 4}, {"modules": [["m", 64, 64, 0]], "layouts": [layout]}, {t: [f"bank/tasks/{t}.safetensors"] for t in tasks},
             {"sha256": files[0].sha256, "key": ""}, None, {}, model).write(folder)
    shutil.copy(folder / "bank" / "tasks" / "task0.safetensors", root / BAIT)  # bait: same bytes as task0's file
    return folder


def read_export_manifest(data: st.DataObject, folder: Path) -> Manifest:
    path = folder / MANIFEST
    path.write_text(json.dumps(mutate_json(data, json.loads(path.read_text()))))
    manifest = Manifest.read(folder)
    verify_all(manifest, folder)
    return manifest


def export_manifest_round_trip(folder: Path, manifest: Manifest) -> None:
    manifest.write(folder)
    assert Manifest.read(folder) == manifest, "export manifest round trip differs"


def make_task_file(root: Path) -> Path:
    """A bank's files as an export holds them (every format: fp16, int8, int4 + scales; shared,
    group and per-task factors), decoded by the runtimes' numpy reader (``BankSlots``)."""
    return make_bundle(root)


def _bank_slots(folder: Path) -> BankSlots:
    raw = json.loads((folder / "manifest.json").read_text())
    slots = [[f"{name}.{s}", shape] for name, o, i, _ in raw["modules"] for s, shape in (("lora_a", [4, i]), ("lora_b", [o, 4]))]
    return BankSlots({"tasks": raw["tasks"], "slots": slots, "bank": raw})


def read_task_file_mutated(data: st.DataObject, folder: Path) -> dict:
    """t0's own file edited (what a runtime reads on a switch): refused as a TaskFileError or decoded to the slots' shapes."""
    path = folder / "tasks" / "t0.safetensors"
    path.write_bytes(mutate_safetensors(data, path.read_bytes()))
    bank = _bank_slots(folder)
    shared = (folder / "shared.safetensors", (folder / "shared.safetensors").read_bytes())
    own = (path, path.read_bytes())
    Session._decoded(lambda: bank.load_shared((str(shared[0]), shared[1])), shared)
    return Session._decoded(lambda: bank.task_slots("t0", (str(own[0]), own[1])), own)


def task_file_round_trip(folder: Path, values: dict) -> None:
    """Accepted values have exactly the slots' shapes (what a runtime feeds)."""
    bank = _bank_slots(folder)
    assert {k: list(v.shape) for k, v in values.items()} == {k: list(s) for k, s in bank.slots.items()}, "task file accepted with other shapes"


def make_bundle(root: Path) -> Path:
    """A 3-task bundle with every kind of module: A shared + B per task (fp16), A in two groups
    (int8), everything per task (int4), one factor pair for all (fp16)."""
    shapes = llama_shapes(2, 64, 32)
    factors = planted_factors(shapes, 3, 4, 0.3, 0)
    adapters = build_adapter_set([load_adapter(write_peft_adapter(root / "ad" / f"t{t}", f, 4, 8), f"t{t}") for t, f in enumerate(factors)])
    plans = {"q_proj": ([0, 0, 0], [0, 1, 2], "fp16"), "k_proj": ([0, 0, 1], [0, 1, 2], "int8"), "v_proj": ([0, 1, 2], [0, 1, 2], "int4-g32"), "o_proj": ([0, 0, 0], [0, 0, 0], "fp16")}
    modules = {}
    for name in adapters.module_names:
        a_index, b_index, label = plans[name.rsplit(".", 1)[-1]]
        fs = adapters.factors(name)
        A = [fs[a_index.index(g)].A for g in range(max(a_index) + 1)]
        B = [fs[b_index.index(g)].B for g in range(max(b_index) + 1)]
        modules[name] = grouped_module(adapters.shapes[name], a_index, b_index, A, B, NumberFormat.parse(label))
    bank = MergedBank(adapters.task_names, modules, "fuzz", fingerprint=adapters.fingerprint(), reference_file_bytes=1, reference_payload_bytes=1)
    shutil.rmtree(root / "ad")
    folder = write_bundle(bank, root / "bundle")
    shutil.copy(folder / "tasks" / "t0.safetensors", root / BAIT)
    return folder


def read_bundle_manifest(data: st.DataObject, folder: Path) -> MergedBank:
    path = folder / "manifest.json"
    path.write_text(json.dumps(mutate_json(data, json.loads(path.read_text()))))
    return read_bundle_both_ways(folder)


def read_bundle_task_file(data: st.DataObject, folder: Path) -> MergedBank:
    """A task file's header edited and the manifest's size and checksum updated to match (an editor
    who knows the format)."""
    task = folder / "tasks" / "t0.safetensors"
    task.write_bytes(mutate_safetensors(data, task.read_bytes()))
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    raw["files"]["tasks/t0.safetensors"] = {"bytes": task.stat().st_size, "sha256": sha256_file(task)}
    raw["file_bytes"] = sum(f["bytes"] for f in raw["files"].values())
    path.write_text(json.dumps(raw))
    return read_bundle_both_ways(folder)


def read_bundle_both_ways(folder: Path) -> MergedBank:
    """``unpack``'s reader and the ``inspect`` command (printing included) must agree."""
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exception is None or isinstance(result.exception, SystemExit), f"inspect: traceback {result.exception!r}"
    try:
        bank = load_bundle(folder)
    except BundleError:
        assert result.exit_code == 2, "inspect accepted a bundle that unpack refuses"
        raise
    assert result.exit_code == 0, f"inspect refused a bundle that unpack accepts: {result.output}"
    return bank


def bundle_round_trip(folder: Path, bank: MergedBank) -> None:
    again = load_bundle(write_bundle(bank, folder.parent / "round-trip"))
    assert again.tasks == bank.tasks, "bundle round trip changed the tasks"
    for task in bank.tasks:
        want, got = _dense(bank.task_factors(task)), _dense(again.task_factors(task))
        assert want.keys() == got.keys() and all(torch.equal(want[m], got[m]) for m in want), f"bundle round trip differs for {task}"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("adapter_config", make_adapter, read_adapter_config, adapter_round_trip),
        Target("adapter_safetensors_header", make_adapter, read_adapter_header, adapter_round_trip),
        Target("export_manifest", make_export_folder, read_export_manifest, export_manifest_round_trip),
        Target("bank_task_file", make_task_file, read_task_file_mutated, task_file_round_trip),
        Target("bundle_manifest", make_bundle, read_bundle_manifest, bundle_round_trip),
        Target("bundle_task_file", make_bundle, read_bundle_task_file, bundle_round_trip),
    ]
}


def run_case(target: Target, data: st.DataObject, pristine: Path, work: Path) -> str:
    """One fuzz case in ``work`` (emptied by the caller): the outcome, or AssertionError for a finding."""
    folder = Path(shutil.copytree(pristine.parent, work, dirs_exist_ok=True)) / pristine.name
    ReadWatch.watch(work, folder)
    try:
        value = target.read(data, folder)
    except TOOL_ERRORS as e:
        return type(e).__name__
    finally:
        escapes = ReadWatch.stop()
        assert not escapes, f"{target.name}: opened outside the folder: {escapes}"
    target.round_trip(folder, value)
    return "accepted"
