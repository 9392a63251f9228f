"""The one writer of standard PEFT LoRA folders (``adapter_model.safetensors`` + ``adapter_config.json``):
the unpacked effective adapters, the synthetic test adapters and the suite's trained adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hydraopt_mobile.adapters import ADAPTER_CONFIG, SAFETENSORS_FILE, LoraFactors
from hydraopt_mobile.atomic import OutputKind, atomic_dir
from hydraopt_mobile.errors import UserError

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


def lora_config(target_modules: list[str], r: int, alpha: float, base_model: str | None, **extra: Any) -> dict:
    """A PEFT ``LoraConfig`` as JSON (no dropout, no bias, plain LoRA); ``extra`` overrides any field."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    } | extra


def write_peft_files(folder: Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: dict, dtype: torch.dtype, metadata: dict[str, str] | None = None) -> None:
    """Write ``(A, B)`` per module (keys ``base_model.model.<module>.lora_A.weight``) and ``config``
    into the existing ``folder``. Callers that replace an output wrap this in :func:`atomic.atomic_dir`."""
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to(dtype).contiguous()
    save_file(tensors, str(folder / SAFETENSORS_FILE), metadata={"format": "pt", **(metadata or {})})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
        raise UserError("the effective adapter has no non-zero module to write")
    ranks = {name: f.rank for name, f in kept.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: rk for name, rk in ranks.items() if rk != r}
    config = lora_config(sorted(kept), r, r, base_model, rank_pattern=pattern, alpha_pattern=dict(pattern), inference_mode=True)
    with atomic_dir(Path(out), overwrite, kind=PEFT_FOLDER, inputs=inputs) as tmp:
        write_peft_files(tmp, {name: (f.A, f.B) for name, f in kept.items()}, config, dtype, MARKER)
    return Path(out)
