"""ONNX back end: one ``model.onnx`` whose LoRA slots (every slot of the signature, q/k/v's stacked
per attention: ``exporters/onnx_fuse.py``) are fp32 graph inputs with zero defaults; the data are the bank's files, decoded with numpy once per task load
(``exporters/targets/device_runner.py: BankSlots``) and bound to the decoder step once per switch
(``OrtDecoder``: one IOBinding, the KV cache kept in ONNX Runtime's values): decoding the codes
inside ``model.onnx`` instead cost 15 extra nodes per module on every token (+50 % decode time at
int4; onnx_op_profile.md).

The graph takes the KV cache as explicit tensors (``past.{2i}`` keys, ``past.{2i+1}`` values of
layer i, shape (1, kv_heads, past_len, head_dim)) and returns ``logits`` and ``present.*``. A run
without slots is the base model (zero defaults); switching binds another task's decoded slots
without touching the base weights.

Quantised variants: the recipes of ``exporters/onnx_recipes.py`` (ONNX Runtime's MatMulNBits on the
base MatMuls, GatherBlockQuantized on the embedding at 4 bits); the LoRA MatMuls are excluded,
otherwise the quantiser folds the switchable inputs into constants and they stop being switchable
(FIELD_NOTES, ONNX Runtime). Scores and bytes of each: benchmarks/results/quant_recipes.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from exporters.backend import ProgramSpec, Session
from exporters.manifest import verified_program
from exporters.onnx_fuse import fuse_qkv, stacked_layout
from exporters.onnx_quant import quantize
from exporters.onnx_recipes import FORMAT, QUANTS, RECIPES, RUNTIME
from exporters.targets.device_runner import OrtDecoder, TaskSlots, open_ort_session
from exporters.targets.onnx_edit import rename_inputs

PROGRAM = "model.onnx"
PREFIX = "model."  # where the Hugging Face model sits inside OnnxDecoder


class OnnxDecoder(nn.Module):
    """Decoder step with the KV cache in and out as tensors (prefill: past length 0)."""

    def __init__(self, hf_model: nn.Module, n_layers: int) -> None:
        super().__init__()
        self.model = hf_model
        self.n_layers = n_layers

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a Llama-style config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def _make_inputs_with_defaults(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Turn each initializer named in ``renames`` into a graph input of the new name, default zero."""
    kept = []
    for init in model.graph.initializer:
        if init.name in renames:
            arr = numpy_helper.to_array(init)
            zero = numpy_helper.from_array(np.zeros_like(arr), renames[init.name])
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(renames[init.name], init.data_type, list(arr.shape))
            )
            kept.append(zero)
        else:
            kept.append(init)
    missing = set(renames) - {i.name for i in model.graph.initializer}
    if missing:
        raise RuntimeError(f"the ONNX exporter renamed LoRA tensors {sorted(missing)[:3]}; cannot make them inputs")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    rename_inputs(model.graph, renames)


def export_program(hf_model: nn.Module, shapes: dict[str, tuple[int, int]], folder: Path, quant: str, phases: dict[str, float]) -> Path:
    """Export ``hf_model`` (already wrapped with the LoRA slots ``shapes``) to ``model.onnx`` in the
    fused form of ``exporters/onnx_fuse.py``, adding each phase's seconds to ``phases``."""
    t0 = time.perf_counter()
    config = hf_model.config
    n_layers = config.num_hidden_layers
    kv_heads, head_dim = kv_shape(config)
    decoder = OnnxDecoder(hf_model, n_layers).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = tuple(torch.zeros(1, kv_heads, 2, head_dim) for _ in range(2 * n_layers))
    seq, past_len = torch.export.Dim("seq"), torch.export.Dim("past_len")
    with torch.no_grad():
        program = torch.onnx.export(
            decoder,
            (ids, past),
            dynamo=True,
            optimize=False,  # the optimiser renames initializers; the LoRA slots must keep their names
            dynamic_shapes=({1: seq}, tuple({2: past_len} for _ in past)),
            input_names=["input_ids"] + [f"past.{i}" for i in range(2 * n_layers)],
            output_names=["logits"] + [f"present.{i}" for i in range(2 * n_layers)],
            verbose=False,
        )
    t1 = time.perf_counter()
    model = program.model_proto
    for node in model.graph.node:  # per-node stack traces: most of a small graph's bytes
        del node.metadata_props[:]
    _make_inputs_with_defaults(model, {PREFIX + name: name for name in shapes})
    fuse_qkv(model, hf_model, shapes, PREFIX)
    phases.update({"torch_onnx_export": t1 - t0, "slots": time.perf_counter() - t1})
    return _quantized(model, folder, quant, phases)


def _quantized(model: onnx.ModelProto, folder: Path, quant: str, phases: dict[str, float]) -> Path:
    """Write ``model`` (fp32, slots as inputs) with ``quant``'s recipe applied as ``folder/model.onnx``."""
    t0 = time.perf_counter()
    model = quantize(model, RECIPES[quant])
    t1 = time.perf_counter()
    path = folder / PROGRAM
    onnx.save(model, str(path))
    phases.update({"quantize": t1 - t0, "write": time.perf_counter() - t1})
    return path


class OrtSession(Session):
    """ONNX Runtime on ``model.onnx``. ``load_task`` decodes the task's slots once (numpy);
    ``set_task`` then only binds that task's slots to the decoder step (:class:`OrtDecoder`)."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        super().__init__(folder, threads)
        self.session = self._open(verified_program(self.manifest, self.folder))
        self.decoder = OrtDecoder(self.session, self.manifest.model)
        self.values: dict[str, dict] = {}  # task -> its slots as ONNX Runtime values (views of ``decoded``)

    def _open(self, program: Path):
        return open_ort_session(str(program), self.threads)

    def _load(self, task: str, slots: TaskSlots) -> None:
        self.values[task] = OrtDecoder.slot_values(slots)

    def _unload(self, task: str) -> None:
        self.values.pop(task, None)

    def _switch(self, task: str) -> None:
        self.decoder.set_slots(self.values[task])

    def reset(self) -> None:
        super().reset()
        self.decoder.reset()

    def _step(self, ids: list[int]) -> np.ndarray:
        logits = self.decoder.step(ids)
        self.pos += len(ids)
        return logits


class OnnxBackend:
    """The :class:`~exporters.backend.Backend` for ONNX Runtime."""

    name = FORMAT
    runtime = RUNTIME
    quants = QUANTS
    program_file = PROGRAM

    def export_program(self, model: nn.Module, spec: ProgramSpec, folder: Path, phases: dict[str, float]) -> dict[str, str]:
        """``model.onnx`` (its KV cache is dynamic: ``max_cache_len`` does not apply)."""
        return {"program": export_program(model, spec.slots, folder, spec.quant, phases).name}

    def program_slots(self, model: nn.Module, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, tuple[int, int]], list[list]]:
        """The stacked q/k/v slots of the fused form and where each module slot lies in them
        (``exporters/onnx_fuse.py``)."""
        return stacked_layout(model, shapes)

    def derive_program(self, fp32_program: Path, spec: ProgramSpec, folder: Path, phases: dict[str, float]) -> dict[str, str]:
        """The program at ``spec.quant`` from the fp32 program of the same signature: the recipes
        quantise the lowered graph, so a new recipe costs no second ``torch.onnx.export``."""
        t0 = time.perf_counter()
        model = onnx.load(str(fp32_program))
        phases["load_fp32_program"] = time.perf_counter() - t0
        return {"program": _quantized(model, folder, spec.quant, phases).name}

    def open_session(self, folder: Path, threads: int = 1) -> OrtSession:
        return OrtSession(folder, threads)
