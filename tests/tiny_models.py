"""Tiny real Llama models and real PEFT adapters for tests (random weights, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, layers: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_peft_adapter(path: Path, seed: int, targets=("q_proj", "v_proj"), r: int = 4, layers: int = 1) -> Path:
    """A real PEFT LoRA folder with non-zero random A and B, saved by PEFT itself."""
    model = tiny_llama(0, layers)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.peft_config["default"].base_model_name_or_path = "tiny-llama"
    peft_model.save_pretrained(str(path))
    return path
