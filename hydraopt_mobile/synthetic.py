"""Synthetic PEFT adapters with planted structure, for tests and benchmarks.

Planted structure mirrors METHOD.md's observation: the tasks' A matrices share one row space (a
common A plus small noise), while each task has its own B.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hydraopt_mobile.peft_io import lora_config, write_peft_files


def planted_factors(
    shapes: dict[str, tuple[int, int]],
    n_tasks: int,
    rank: int,
    noise: float = 0.0,
    seed: int = 0,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per task, per module (A, B): A = shared A + noise, B independent per task."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(n_tasks)]
    for name, (d_out, d_in) in shapes.items():
        shared = torch.randn(rank, d_in, generator=g) / d_in**0.5
        for t in range(n_tasks):
            A = shared + noise * torch.randn(rank, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, rank, generator=g) / rank**0.5 * 0.1
            out[t][name] = (A, B)
    return out


def write_peft_adapter(
    path: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    base_model: str = "synthetic-base",
    dtype: torch.dtype = torch.float16,
    extra_config: dict | None = None,
) -> Path:
    """Write a PEFT LoRA folder (keys ``base_model.model.<module>.lora_A.weight``) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    targets = sorted({n.rsplit(".", 1)[-1] for n in factors})
    write_peft_files(path, factors, lora_config(targets, rank, alpha, base_model) | (extra_config or {}), dtype)
    return path


def llama_shapes(n_layers: int, hidden: int, kv: int, modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), intermediate: int | None = None) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of a Llama's projections: attention (q, k, v, o) and, with ``intermediate``,
    the MLP (gate, up, down)."""
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    if intermediate is not None:
        dims |= {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    block = {m: "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn" for m in modules}
    return {f"model.layers.{i}.{block[m]}.{m}": dims[m] for i in range(n_layers) for m in modules}


def planted_task_factors(shapes: dict[str, tuple[int, int]], task: int, rank: int, noise: float, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One task's factors with the structure of :func:`planted_factors` (a shared A per module plus
    noise, an independent B), generated from seeds per (module) and (task, module), so any number of
    tasks is written one at a time without holding the others."""
    out = {}
    for m, (name, (d_out, d_in)) in enumerate(shapes.items()):
        shared = torch.randn(rank, d_in, generator=torch.Generator().manual_seed(seed * 1_000_003 + m)) / d_in**0.5
        g = torch.Generator().manual_seed((seed * 1_000_003 + m) * 100_003 + task + 1)
        A = shared + noise * torch.randn(rank, d_in, generator=g) / d_in**0.5
        out[name] = (A, torch.randn(d_out, rank, generator=g) / rank**0.5 * 0.1)
    return out
