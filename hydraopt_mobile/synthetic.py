"""Synthetic PEFT adapters with planted structure, for tests and benchmarks.

Planted structure mirrors METHOD.md's observation: the tasks' A matrices share one row space (a
common A plus small noise), while each task has its own B.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


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
    """Write a PEFT LoRA folder (keys ``base_model.model.<module>.lora_A.weight``)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    targets = sorted({n.rsplit(".", 1)[-1] for n in factors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    config.update(extra_config or {})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def llama_shapes(n_layers: int, hidden: int, kv: int, modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of a Llama's attention projections."""
    dims = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    return {f"model.layers.{i}.self_attn.{m}": dims[m] for i in range(n_layers) for m in modules}
