"""The one loader of a base model folder (Hugging Face layout): offline, float32 by default, eval mode.

Used by the exporters and the suite alike, so that what is exported is exactly what is evaluated,
and no run reaches the network for a folder that is already on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def offline() -> None:
    """Keep transformers and the Hub client off the network for the rest of the process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_causal_lm(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM in ``model_dir``, in eval mode."""
    from transformers import AutoModelForCausalLM

    offline()
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
