"""ExecuTorch back end: one ``.pte`` (XNNPACK) with two methods; the data are the bank's files.

``forward(input_ids, cache_position) -> logits`` runs prefill (any length) and decode (length 1)
over a static KV cache that lives inside the program. ``set_slots(*slots)`` copies every LoRA slot
of the signature (fp32, decoded by the runtime from the bank's files: ``BankSlots``) into mutable
buffers that ``forward`` reads; both methods share those buffers (``share_mutable_buffers``), so a
switch writes the slots (a few MB at most) and touches nothing else: no reload, no re-packing of
the XNNPACK base weights. One method for all slots, not one for shared and one for per-task slots,
because which slots a bank shares is data, not part of the program. The alternative the field
notes verified, one ``.ptd`` per task, needs the program reloaded (and every XNNPACK weight
re-packed) per switch.

``forward`` only reads the slot buffers. ExecuTorch's memory planning with ``share_mutable_buffers``
plans a buffer that one method reads and another mutates as the same mutable memory in both
(``MemoryPlanningPass.run_multimethod``: a read-only buffer of the same name as a mutated one is
"in fact mutable"), so no write in ``forward`` is needed. What would bake a slot into the program is
XNNPACK: it takes an fp32 Linear only with a static weight, packed at lowering time;
:func:`slot_partitioner` takes a Linear whose weight is a slot buffer with that weight as a
delegate input instead, so the slot matmuls run inside the same XNNPACK partitions as the base
Linears around them. (Before, ``forward`` wrote ``add_(0)`` into every slot buffer to make it
mutable: a write-back ``copy_`` per slot buffer per step, and the slot matmuls outside XNNPACK,
splitting its partitions: benchmarks/results/vs_optimum_et_profile.md.)

Lowering speed: torch.fx's ``NodeSource`` deep-copies every node's ``from_node`` provenance chain
each time a pass re-creates the node, which grows with pass depth; :func:`shallow_provenance` copies
only the outer list during lowering (the same information: NodeSource objects are not mutated after
creation; upstream pytorch/pytorch#193051 makes the same change). The program's bytes are the same
either way (tests/test_export_program.py). :mod:`exporters.et_lowering` cuts the re-traces and
checks that change nothing (its docstring: where the lowering's time goes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from exporters.backend import ProgramSpec, Session
from exporters.manifest import verified_program
from exporters.et_attention import ATTENTIONS, DEFAULT_ATTENTION, register_custom_ops, use_custom_ops
from exporters.et_lowering import fast_lowering
from exporters.et_recipes import FORMAT, GROUP_SIZE, QUANTS, RECIPES, RUNTIME
from exporters.slots import SLOT_A, SLOT_B
from exporters.targets.device_runner import TaskSlots
from hydraopt_mobile.errors import UserError


PROGRAM = "model.pte"
PREFIX = "model.model."  # where the Hugging Face model sits inside ExecuTorchDecoder


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise UserError(f"--attention {attention!r}: one of " + "; ".join(f"{k} ({v})" for k, v in ATTENTIONS.items()))


class ExecuTorchDecoder(nn.Module):
    """Static-cache decoder; its LoRA slot buffers (``slots``) are state that only ``set_slots`` writes."""

    def __init__(self, hf_model: nn.Module, slots: list[str], max_cache_len: int, attention: str = DEFAULT_ATTENTION) -> None:
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        check_attention(attention)
        hf_model.generation_config.use_cache = True
        hf_model.generation_config.cache_implementation = "static"
        self.model = TorchExportableModuleWithStaticCache(hf_model, batch_size=1, max_cache_len=max_cache_len)
        if attention == "custom-ops":
            use_custom_ops(self.model)
        self.slots = slots

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, cache_position=cache_position)  # only reads the slots (module docstring)


class SetSlots(nn.Module):
    """Only the slot buffers, under the same names as in :class:`ExecuTorchDecoder`."""

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


def is_slot_buffer(ep, node) -> bool:
    """Whether ``node`` of ``ep`` (the forward program) reads a LoRA slot buffer."""
    fqn = ep.graph_signature.inputs_to_buffers.get(node.name) if node.op == "placeholder" else None
    return fqn is not None and fqn.rsplit(".", 1)[-1] in (SLOT_A, SLOT_B)


def slot_partitioner():
    """XNNPACK's partitioner, with the LoRA slot buffers as run-time (dynamic) weights of their Linears.

    XNNPACK takes an fp32 Linear only with a static weight, which it packs into the delegate at
    lowering time; the slots must stay buffers that ``set_slots`` writes. ``force_non_static_weights_for_f32_linear``
    would make *every* fp32 Linear dynamic (the fp32 program's base weights too, re-packed each
    call), so only a Linear whose weight is a slot buffer is taken with its weight as a delegate
    input: the slot matmuls run in the same XNNPACK partitions as the base Linears around them.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class SlotLinearConfig(LinearConfig):
        def _get_weight_deps(self, node, ep, precision):
            if precision == ConfigPrecisionType.FP32 and is_slot_buffer(ep, node.args[self.weight_idx]):
                return True, []  # a delegate input, not packed
            return super()._get_weight_deps(node, ep, precision)

    return XnnpackPartitioner(configs=[SlotLinearConfig if c is LinearConfig else c for c in ALL_PARTITIONER_CONFIGS])


def quantize(model: nn.Module, quant: str) -> None:
    """Quantise the base Linears of ``model`` in place by the recipe ``quant`` (:data:`RECIPES`).

    LoRA factors stay fp32: they are a few percent of the bytes, are already stored in the bank's
    own format, and a second quantisation of a low-rank factor compounds its error (ExecuTorch's
    llama LoRA export excludes them for the same reason). A Linear whose input width is not a
    multiple of the group stays fp32 at 4 bits (the group must divide it).
    """
    recipe = RECIPES[quant]
    if recipe.bits == 32:
        return
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, MappingType, PerAxis, PerGroup, quantize_
    from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm
    from torchao.utils import unwrap_tensor_subclass

    mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if recipe.scales == "no-clip" else MappingType.SYMMETRIC
    algorithm = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if recipe.scales == "hqq" else IntxChooseQParamsAlgorithm.AFFINE
    configs = {
        4: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE),
                                                 weight_mapping_type=mapping, intx_choose_qparams_algorithm=algorithm),
        8: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
    }
    for bits, config in configs.items():
        def filter_fn(m: nn.Module, fqn: str, bits: int = bits) -> bool:
            return (isinstance(m, nn.Linear) and recipe.bits_of(fqn) == bits
                    and (bits == 8 or m.in_features % GROUP_SIZE == 0))

        with torch.no_grad():
            quantize_(model, config, filter_fn=filter_fn)
    unwrap_tensor_subclass(model)


@contextlib.contextmanager
def shallow_provenance() -> Iterator[None]:
    """During lowering, copy a node's ``from_node`` provenance list instead of deep-copying it."""
    from torch.fx.traceback import NodeSource

    original = NodeSource.__init__

    def init(self, node=None, pass_name: str = "", action=None) -> None:
        meta = node.meta if node is not None else None
        chain = meta.pop("from_node", None) if meta is not None else None
        try:
            original(self, node, pass_name, action)  # sees no chain: nothing to deep-copy
        finally:
            if chain is not None:
                meta["from_node"] = chain
        if chain is not None:
            self.from_node = list(chain)

    NodeSource.__init__ = init
    try:
        yield
    finally:
        NodeSource.__init__ = original


def export_program(
    hf_model: nn.Module, slots: dict[str, tuple[int, int]], folder: Path, quant: str, max_cache_len: int,
    phases: dict[str, float], fast: bool = True, attention: str = DEFAULT_ATTENTION,
) -> Path:
    """Lower ``hf_model`` (already wrapped with LoRA slots) to ``folder/model.pte``, adding each
    phase's seconds to ``phases``. ``fast``: lower under :func:`shallow_provenance` and
    :func:`exporters.et_lowering.fast_lowering` (the same program, fewer re-traces and checks).
    ``attention``: :data:`exporters.et_attention.ATTENTIONS`."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

    with phase("quantize"):
        quantize(hf_model, quant)
    decoder = ExecuTorchDecoder(hf_model, list(slots), max_cache_len, attention).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max_cache_len)
    with torch.no_grad(), phase("torch_export"):
        programs = {
            "forward": torch.export.export(
                decoder, (ids, torch.arange(4)), dynamic_shapes=({1: seq}, {0: seq}), strict=True
            )
        }
        if slots:
            example = tuple(torch.zeros(s) for s in slots.values())
            programs["set_slots"] = torch.export.export(SetSlots(slots), example, strict=True)
    with shallow_provenance() if fast else contextlib.nullcontext(), fast_lowering() if fast else contextlib.nullcontext():
        with phase("to_edge_transform_and_lower"):
            edge = to_edge_transform_and_lower(
                programs, partitioner={name: ([slot_partitioner()] if name == "forward" else []) for name in programs}
            )
        with phase("to_executorch"):
            program = edge.to_executorch(
                ExecutorchBackendConfig(
                    # slot buffers start at zero (the base model) instead of uninitialised memory
                    passes=[InitializedMutableBufferPass(["lora_a", "lora_b"])],
                    memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                    emit_mutable_buffer_names=True,
                )
            )
    path = folder / PROGRAM
    with phase("write"), open(path, "wb") as fh:
        program.write_to_file(fh)
    return path


@contextlib.contextmanager
def _native_log_held_back() -> Iterator[None]:
    """Hold back what native code writes to the process's standard error during the block, and
    show it only if the block fails. ExecuTorch's runtime logs its CPU-info probing and thread-pool
    set-up there when a session opens (six lines: "[threadpool.cpp:66] Resetting threadpool to 1
    threads.", ...), which no setting turns off; a failed open still shows them, with its error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ExecuTorchSession(Session):
    """ExecuTorch's Python runtime on ``model.pte``: ``set_task`` runs the program's ``set_slots``
    method with the task's decoded slots. A ``custom-ops`` program (the manifest's
    ``model.attention``) gets ExecuTorch's LLM kernels registered before it loads."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        super().__init__(folder, threads)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        if self.manifest.model.get("attention", "portable") == "custom-ops":
            register_custom_ops()
        with _native_log_held_back():
            _unsafe_reset_threadpool(threads)
            self.program = Runtime.get().load_program(str(verified_program(self.manifest, self.folder)))
            self.forward = self.program.load_method("forward")
            self.setter = self.program.load_method("set_slots") if self.bank is not None else None
        self.loaded: dict[str, list[torch.Tensor]] = {}  # task -> its slots as set_slots takes them (views of ``decoded``)
        self.max_len = self.manifest.model["max_cache_len"]

    def _load(self, task: str, slots: TaskSlots) -> None:
        self.loaded[task] = [torch.from_numpy(a) for a in slots.values()]

    def _unload(self, task: str) -> None:
        self.loaded.pop(task, None)

    def _switch(self, task: str) -> None:
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

    name = FORMAT
    runtime = RUNTIME
    quants = QUANTS
    program_file = PROGRAM

    def export_program(self, model: nn.Module, spec: ProgramSpec, folder: Path, phases: dict[str, float]) -> dict[str, str]:
        return {"program": export_program(model, spec.slots, folder, spec.quant, spec.max_cache_len, phases,
                                          attention=spec.attention or DEFAULT_ATTENTION).name}

    def program_slots(self, model: nn.Module, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], list[list]]:
        """The module slots as they are: one buffer pair per module (stacking q/k/v cost ExecuTorch
        more than it saved: XNNPACK packs a run-time weight per call, benchmarks/results/et_slot_forms.md)."""
        return dict(shapes), []

    def open_session(self, folder: Path, threads: int = 1) -> ExecuTorchSession:
        return ExecuTorchSession(folder, threads)
