"""The ``ethos-u`` target's job on the host: the layer variants to build (a bank's per-task factors
of one decoder layer, switchable or merged), the layer's input from the base model, and the
compile run (``ethos_u_layer.py`` in the target's Python, ``ethos_u.py``) that returns the report
and outputs."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporters.targets.ethos_u import NPUS, QUANTS, SCRIPT, ensure_ready, site
from exporters.targets.ethos_u_layer import SLOTS, LayerConfig
from exporters.targets.protocol import OnStep, run_streaming
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.errors import UserError


@dataclass(frozen=True)
class LayerVariant:
    """One program to build: ``switchable`` (task factors as inputs, run for ``sequence`` in
    order, then with zero factors) or ``merged`` (``tasks[0]`` folded into the weights)."""

    name: str
    method: str  # as in the merge registry ("hydraopt", "none")
    kind: str  # "switchable" | "merged"
    tasks: dict[str, dict[str, torch.Tensor]]  # task -> {"q_proj.A": (r, d_in), "q_proj.B": (d_out, r), ...}
    sequence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) or self.kind not in ("switchable", "merged"):
            raise UserError(f"layer variant {self.name!r} ({self.kind}): names use letters, digits, _ . - (they name files); "
                            "kind is switchable or merged")
        if self.kind == "merged" and len(self.tasks) != 1:
            raise UserError(f"layer variant {self.name!r}: a merged variant folds exactly one task, got {list(self.tasks)}")
        if missing := set(self.sequence) - set(self.tasks):
            raise UserError(f"layer variant {self.name!r}: sequence names tasks it has no factors for: {sorted(missing)}")


def bank_layer_tasks(bank: MergedBank, layer: int, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's dequantised factors of ``layer``'s q_proj and v_proj in ``bank`` (the LoRA scale
    folded into B); a module the bank lacks is a zero update of rank 1."""
    out = {}
    for task in tasks:
        factors = bank.task_factors(task)
        out[task] = {}
        for slot in SLOTS:
            f = factors.get(f"model.layers.{layer}.self_attn.{slot}")
            if f is None:
                raise UserError(f"bank ({bank.method}): no model.layers.{layer}.self_attn.{slot}; the ethos-u layer needs LoRA on q_proj and v_proj")
            out[task][f"{slot}.A"], out[task][f"{slot}.B"] = f.A.float(), f.B.float()
    return out


def switchable_variant(name: str, bank: MergedBank, layer: int, tasks: list[str]) -> LayerVariant:
    """``bank``'s per-task factors of ``layer`` as program inputs, run for ``tasks`` in order and,
    with two or more tasks, back to the first (a switch that leaks state then shows up)."""
    sequence = (*tasks, tasks[0]) if len(tasks) > 1 else tuple(tasks)
    return LayerVariant(name, bank.method, "switchable", bank_layer_tasks(bank, layer, tasks), sequence)


def prompt_ids(tokenizer, text: str, seq: int) -> list[int]:
    """The last ``seq`` token ids of ``text`` (no special tokens added: a chat-formatted text has its own)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < seq:
        raise UserError(f"the layer's prompt has {len(ids)} tokens, fewer than the {seq} the layer is compiled for "
                        "(--tokens): give a longer --prompt or fewer tokens")
    return list(ids[-seq:])


def layer_input(model: torch.nn.Module, ids: list[int], layer: int) -> torch.Tensor:
    """What decoder layer ``layer`` of the base model (no task) receives for ``ids`` at positions
    0..len-1: the token embeddings for layer 0, else the residual stream after the layers below."""
    n_layers = len(model.model.layers)
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer}: the base model has decoder layers 0..{n_layers - 1}")
    with torch.no_grad():
        if layer == 0:
            return model.get_input_embeddings()(torch.tensor(ids)).float()
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].float()


def padded_ranks(tasks: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    return {slot: max(t[f"{slot}.A"].shape[0] for t in tasks.values()) for slot in SLOTS}


def pad(task: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """Zero rows of A / columns of B up to the slot's rank: B A is unchanged."""
    out = {}
    for slot, r in ranks.items():
        a, b = task[f"{slot}.A"], task[f"{slot}.B"]
        out[f"{slot}.A"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])]).contiguous()
        out[f"{slot}.B"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1).contiguous()
    return out


def compile_layer(weights: dict[str, torch.Tensor], x: torch.Tensor, cfg: LayerConfig, variants: list[LayerVariant],
                  npus: tuple[str, ...] = NPUS, quants: tuple[str, ...] = QUANTS, workdir: Path | None = None,
                  threads: int = 1, timeout_s: int = 3600, on_step: OnStep | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Build every variant of the layer (``weights``: a ``LlamaDecoderLayer`` state dict; ``x``:
    the layer's input, (seq, hidden)), compile it for every NPU x quantisation, run the lowered TOSA
    on the reference model; returns ``ethos_u_layer.main``'s report and the outputs by
    ``variant/npu/quant/run/task`` (TOSA) and ``variant/fp32/task``. ``on_step(done, total)`` after
    each compile (variants x NPUs x quants)."""
    from safetensors.torch import load_file, save_file

    folder = ensure_ready()
    with tempfile.TemporaryDirectory(prefix="hydraopt-ethosu-") as tmp:
        job_dir = Path(workdir or tmp)
        job_dir.mkdir(parents=True, exist_ok=True)
        save_file({**{k: v.float().contiguous() for k, v in weights.items()}, "x": x.float().contiguous()}, str(job_dir / "layer.safetensors"))
        specs = []
        for v in variants:
            ranks = padded_ranks(v.tasks)
            for task, tensors in v.tasks.items():
                save_file(pad(tensors, ranks), str(job_dir / f"{v.name}-{task}.safetensors"))
            specs.append({"name": v.name, "method": v.method, "kind": v.kind, "tasks": list(v.tasks),
                          "sequence": list(v.sequence), "ranks": ranks})
        job = {"site": str(site(folder)), "config": asdict(cfg), "variants": specs, "npus": list(npus), "quants": list(quants),
               "threads": threads}
        (job_dir / "job.json").write_text(json.dumps(job, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = run_streaming([sys.executable, str(SCRIPT), str(job_dir)], env=env, timeout=timeout_s, on_step=on_step)
        if r.returncode != 0:
            raise RuntimeError(f"ethos_u_layer.py failed: {r.stderr.strip()[-3000:]}")
        report = json.loads((job_dir / "report.json").read_text())
        report["log"] = [line for line in r.stdout.splitlines() if ": " in line]
        return report, load_file(job_dir / "outputs.safetensors")
