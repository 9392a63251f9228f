"""ExecuTorch back end: one ``.pte`` (XNNPACK) with two methods, and one safetensors file per task.

``forward(input_ids, cache_position) -> logits`` runs prefill (any length) and decode (length 1)
over a static KV cache that lives inside the program. ``set_task(*task_tensors)`` copies a task's
switchable LoRA tensors into mutable buffers that ``forward`` reads; both methods share those
buffers (``share_mutable_buffers``), so a switch writes a few hundred KB and touches nothing else:
no reload, no re-packing of the resident XNNPACK weights. The alternative the field notes verified,
one ``.ptd`` per task, needs the program reloaded (and every XNNPACK weight re-packed) per switch:
seconds on the real model, against well under a millisecond here.

Why ``forward`` adds zero to each switchable buffer: a buffer that ``forward`` never writes is
exported as a constant and baked into the program, and ``set_task``'s writes would then go to a
different copy. The in-place ``add_(0)`` makes it a mutable buffer, shared by name with
``set_task``, and keeps XNNPACK from packing it as a static weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from exporters.backend import ProgramSpec, Session
from exporters.manifest import TaskFileError
from exporters.slots import SlotLayout
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.schemas import validate


QUANTS = {
    "fp32": "float32 weights",
    "8da4w": "torchao int4 weights (group 32) with int8 dynamic activations on the base Linears",
    "8da8w": "torchao int8 weights (per channel) with int8 dynamic activations on the base Linears",
}
GROUP_SIZE = 32
PROGRAM = "model.pte"
PREFIX = "model.model."  # where the Hugging Face model sits inside ExecuTorchDecoder


class ExecuTorchDecoder(nn.Module):
    """Static-cache decoder whose switchable LoRA buffers are mutable state."""

    def __init__(self, hf_model: nn.Module, switchable: list[str], max_cache_len: int) -> None:
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        hf_model.generation_config.use_cache = True
        hf_model.generation_config.cache_implementation = "static"
        self.model = TorchExportableModuleWithStaticCache(hf_model, batch_size=1, max_cache_len=max_cache_len)
        self.switchable = switchable

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for name in self.switchable:
            self.model.model.get_buffer(name).add_(0)  # marks it mutable (module docstring)
        return self.model(input_ids=input_ids, cache_position=cache_position)


class SetTask(nn.Module):
    """Only the switchable buffers, under the same names as in :class:`ExecuTorchDecoder`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.names = [PREFIX + n for n in shapes]
        for name, shape in zip(self.names, shapes.values()):
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.register_buffer(leaf, torch.zeros(shape))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        for name, value in zip(self.names, tensors):
            self.get_buffer(name).copy_(value)
        return torch.zeros(1)


def quantize(model: nn.Module, quant: str) -> None:
    """torchao 8da4w (int4 weights, group 32) or 8da8w (int8 per channel) on the base Linears.

    LoRA factors stay fp32: they are a few percent of the bytes, are already stored in the bank's
    own format, and a second quantisation of a low-rank factor compounds its error (ExecuTorch's
    llama LoRA export excludes them for the same reason).
    """
    if quant == "fp32":
        return
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_
    from torchao.utils import unwrap_tensor_subclass

    if quant == "8da4w":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))

    def filter_fn(m: nn.Module, fqn: str) -> bool:
        return isinstance(m, nn.Linear) and (quant == "8da8w" or m.in_features % GROUP_SIZE == 0)

    with torch.no_grad():
        quantize_(model, config, filter_fn=filter_fn)
    unwrap_tensor_subclass(model)


def write_task_file(path: Path, stored: dict[str, StoredFactor], export_id: str, task: str) -> None:
    """A task's switchable factors in the bank's own number format (fp16 / int8 / int4 + scales).

    Keeping the bank's encoding keeps its storage saving on the device; the loader decodes once per
    task load (:func:`read_task_file`), so ``set_task`` still only copies ready fp32 tensors.
    """
    tensors, formats = {}, {}
    for slot, factor in stored.items():
        formats[slot] = [factor.fmt.label(), list(factor.shape), factor.transposed]
        tensors.update({f"{slot}/{key}": value.contiguous() for key, value in factor.data.items()})
    metadata = {"export_id": export_id, "task": task, "formats": json.dumps(formats)}
    save_file(tensors, str(path), metadata=metadata)


def read_task_file(path: Path, order: list[str], shapes: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Decode a task file into the fp32 tensors ``set_task`` takes, in manifest order. Its
    ``formats`` metadata is checked against schemas/task-file-formats.schema.json and each slot
    must decode to the manifest's shape (``shapes``), or :class:`TaskFileError` names the file."""
    out = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            formats = json.loads((fh.metadata() or {}).get("formats", "null"), parse_constant=_no_constant)
            validate(formats, "task-file-formats", path, TaskFileError)
            for i, slot in enumerate(order):
                if slot not in formats:
                    raise TaskFileError(f"{path}: no slot {slot!r}")
                label, shape, transposed = formats[slot]
                keys = [k for k in fh.keys() if k.startswith(slot + "/")]
                data = {k.removeprefix(slot + "/"): fh.get_tensor(k) for k in keys}
                value = StoredFactor(NumberFormat.parse(label), data, tuple(shape), transposed).values()
                if shapes is not None and list(value.shape) != list(shapes[i]):
                    raise TaskFileError(f"{path}: slot {slot!r} decodes to {list(value.shape)}, the manifest says {shapes[i]}")
                out.append(value)
    except TaskFileError:
        raise
    except (KeyError, ValueError, RuntimeError, SafetensorError) as e:  # missing parts, tensors that do not decode
        raise TaskFileError(f"{path}: not a task file of this export ({type(e).__name__}: {e})") from e
    return out


def _no_constant(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def export_program(
    hf_model: nn.Module, switchable: dict[str, tuple[int, ...]], folder: Path, quant: str, max_cache_len: int
) -> Path:
    """Lower ``hf_model`` (already wrapped with LoRA slots) to ``folder/model.pte``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    quantize(hf_model, quant)
    decoder = ExecuTorchDecoder(hf_model, list(switchable), max_cache_len).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max_cache_len)
    with torch.no_grad():
        programs = {
            "forward": torch.export.export(
                decoder, (ids, torch.arange(4)), dynamic_shapes=({1: seq}, {0: seq}), strict=True
            )
        }
        if switchable:
            example = tuple(torch.zeros(s) for s in switchable.values())
            programs["set_task"] = torch.export.export(SetTask(switchable), example, strict=True)
    edge = to_edge_transform_and_lower(
        programs, partitioner={name: ([XnnpackPartitioner()] if name == "forward" else []) for name in programs}
    )
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            # switchable buffers start at zero (the base model) instead of uninitialised memory
            passes=[InitializedMutableBufferPass(["lora_a", "lora_b"])],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )
    path = folder / PROGRAM
    with open(path, "wb") as fh:
        program.write_to_file(fh)
    return path


class ExecuTorchSession(Session):
    """ExecuTorch's Python runtime on ``model.pte``: ``set_task`` runs the program's ``set_task`` method."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        super().__init__(folder, threads)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(str(self.folder / self.manifest.entry("program").path))
        self.forward = self.program.load_method("forward")
        self.setter = self.program.load_method("set_task") if self.manifest.task_tensors else None
        self.loaded: dict[str, list] = {}
        self.max_len = self.manifest.model["max_cache_len"]

    def _load(self, task: str, path: Path) -> None:
        self.loaded[task] = read_task_file(path, list(self.manifest.task_tensors), list(self.manifest.task_tensors.values()))

    def _switch(self, task: str) -> None:
        if task not in self.loaded:
            self.load_task(task)
        self.setter.execute(self.loaded[task])

    def _step(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        if self.pos + n > self.max_len:
            raise UserError(f"sequence of {self.pos + n} tokens exceeds the export's KV cache ({self.max_len})")
        out = self.forward.execute([torch.tensor([ids]), torch.arange(self.pos, self.pos + n)])[0]
        self.pos += n
        return out[0].numpy()


class ExecuTorchBackend:
    """The :class:`~exporters.backend.Backend` for ExecuTorch (XNNPACK)."""

    name = "executorch"
    runtime = "executorch"
    quants = QUANTS
    task_ext = ".safetensors"
    task_encoding = "the bank's encoding (fp16, or int8/int4 codes + fp16 scales), decoded to fp32 on load"

    def export_program(self, model: nn.Module, spec: ProgramSpec, folder: Path) -> dict[str, str]:
        return {"program": export_program(model, spec.switchable, folder, spec.quant, spec.max_cache_len).name}

    def task_tensors(self, layout: SlotLayout, switchable: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in switchable.items()}

    def write_task_file(self, path: Path, layout: SlotLayout, task: str, export_id: str) -> None:
        write_task_file(path, layout.stored[task], export_id, task)

    def open_session(self, folder: Path, threads: int = 1) -> ExecuTorchSession:
        return ExecuTorchSession(folder, threads)
