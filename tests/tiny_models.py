"""Tiny real Llama models, real PEFT adapters and a bank with every kind of slot, for tests (random
weights, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from exporters.slots import merge_into
from hydraopt_mobile.bank import MergedBank, grouped_module
from hydraopt_mobile.formats import NumberFormat

HIDDEN, KV, LAYERS, VOCAB, RANK = 64, 32, 2, 256, 4
TASKS = ["alpha", "beta", "gamma"]
PROMPT = [5, 17, 200, 33, 9, 121, 64, 3, 250, 77]


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def make_tiny_chat_model(folder: Path) -> Path:
    """One-layer Llama with the real model's vocabulary, special tokens and tokenizer files (so the
    suite's prompts and a chat template render), random weights."""
    import json
    import shutil

    from hydraopt_mobile.suite.model import base_model_dir

    real = base_model_dir()
    spec = json.loads((real / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=spec["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=spec["bos_token_id"], eos_token_id=spec["eos_token_id"], pad_token_id=spec["pad_token_id"])
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (real / name).is_file():
            shutil.copy(real / name, folder / name)
    return folder


def peft_adapter_of(model_dir: Path, path: Path, seed: int) -> Path:
    """A PEFT LoRA folder (q/v, r 4, random non-zero) for the model in ``model_dir``, naming it by
    its local folder as PEFT does."""
    model = LlamaForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)  # as PEFT writes it for a model loaded from a local folder
    peft_model.save_pretrained(str(path))
    return path


def make_tiny_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def make_bank(seed: int = 1, formats: tuple[str, str, str] = ("fp16", "fp16", "fp16")) -> MergedBank:
    """Every kind of slot: q (shared A, B per task), v (A in 2 groups, shared B), o (both per task)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.4

    q_fmt, v_fmt, o_fmt = (NumberFormat.parse(f) for f in formats)
    modules = {}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.self_attn."
        modules[p + "q_proj"] = grouped_module((HIDDEN, HIDDEN), [0, 0, 0], [0, 1, 2], [rnd(RANK, HIDDEN)],
                                               [rnd(HIDDEN, RANK) for _ in TASKS], q_fmt)
        modules[p + "v_proj"] = grouped_module((KV, HIDDEN), [0, 1, 0], [0, 0, 0], [rnd(RANK, HIDDEN) for _ in range(2)],
                                               [rnd(KV, RANK)], v_fmt)
        modules[p + "o_proj"] = grouped_module((HIDDEN, HIDDEN), [0, 1, 2], [0, 1, 2], [rnd(RANK, HIDDEN) for _ in TASKS],
                                               [rnd(HIDDEN, RANK) for _ in TASKS], o_fmt)
    return MergedBank(list(TASKS), modules, "test-grouped")


def reference_logits(model_dir: Path, bank: MergedBank | None, task: str | None, seq: list[int]) -> np.ndarray:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    if task is not None:
        merge_into(model, bank.task_factors(task))
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].numpy()


def run_logits(session, prompt: list[int], n_new: int = 6) -> tuple[list[int], np.ndarray]:
    """Greedy on the runtime; returns the full sequence and the logits of every position."""
    from exporters.runtime import greedy

    gen = greedy(session, prompt, n_new, keep_logits=True)
    rows = np.concatenate([gen.logits[0]] + [row[None] for row in gen.logits[1:]])
    return prompt + gen.tokens, rows


class TinyExports(dict):
    """The tiny model (``"model"``), its bank (``"bank"``) and its exports by key, each made the
    first time it is asked for: ``"fp32"``, ``"int4"``, ``"int8"`` (ONNX), ``"et-fp32"``,
    ``"et-8da4w"`` (ExecuTorch); KV cache of 64."""

    def __init__(self, root: Path) -> None:
        super().__init__(model=make_tiny_model(root / "model"), bank=make_bank())
        self.root = root

    def __missing__(self, key: str) -> Path:
        from exporters.export import export_bank

        fmt, quant = ("executorch", key[3:]) if key.startswith("et-") else ("onnx", key)
        self[key] = export_bank(self["bank"], self["model"], fmt, quant, self.root / f"{fmt}-{quant}", max_cache_len=64)
        return self[key]


def task_errors(session, refs, task: str) -> tuple[list[int], np.ndarray, float, float]:
    """Switch ``session`` to ``task`` and decode PROMPT: (sequence, logits, max error to the task's own
    reference, smallest max error to another task's) with ``refs(task, seq)`` the references."""
    session.set_task(task)
    seq, got = run_logits(session, PROMPT)
    own = float(np.abs(got - refs(task, seq)[: len(got)]).max())
    others = min(float(np.abs(got - refs(t, seq)[: len(got)]).max()) for t in TASKS if t != task)
    return seq, got, own, others
