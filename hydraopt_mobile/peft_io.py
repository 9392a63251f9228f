"""Writing an effective adapter back out as a standard PEFT LoRA folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hydraopt_mobile.adapters import SAFETENSORS_FILE, LoraFactors
from hydraopt_mobile.atomic import OutputKind, atomic_dir

MARKER = {"written_by": "hydraopt unpack"}  # in the safetensors header: how --overwrite knows the folder


def _is_unpacked(folder: Path) -> bool:
    path = folder / SAFETENSORS_FILE
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("written_by") == MARKER["written_by"]
    except (SafetensorError, OSError, ValueError):
        return False


PEFT_FOLDER = OutputKind("PEFT adapter folder", f"{SAFETENSORS_FILE} whose header says written_by={MARKER['written_by']!r}", _is_unpacked)


def write_peft_folder(
    factors: dict[str, LoraFactors],
    out: Path,
    base_model: str | None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    inputs: Iterable[Path] = (),
) -> Path:
    """A PEFT folder whose update equals ``B @ A`` per module: scale 1 (lora_alpha = r per module).

    Ranks may differ per module; they go to ``rank_pattern`` / ``alpha_pattern`` keyed by the
    full module name. Modules whose rank is 0 (no update) are left out.
    """
    kept = {name: f for name, f in factors.items() if f.rank > 0}
    if not kept:
        raise ValueError("the effective adapter has no non-zero module to write")
    ranks = {name: f.rank for name, f in kept.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: rk for name, rk in ranks.items() if rk != r}
    tensors = {}
    for name, f in kept.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.B.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(kept),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_dir(Path(out), overwrite, kind=PEFT_FOLDER, inputs=inputs) as tmp:
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt", **MARKER})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)
