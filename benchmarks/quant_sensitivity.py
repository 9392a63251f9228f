"""Which base linears of SmolLM2-135M lose most when rounded to ONNX Runtime's 4-bit grid: the
measurement behind the ``int4-mixed`` recipe (exporters/onnx_quant.py).

    python benchmarks/quant_sensitivity.py [--per-task 2]

For each group of base Linears alone (one module type across all layers; the LM head, i.e. the
tied embedding), the weights are replaced by ONNX Runtime's own 4-bit
round trip (MLAS ``quantize_matmul_4bits``, block 32, symmetric: the ``int4`` recipe's grid) and
the model is run teacher-forced on train-split examples of every suite task (prompt + target;
never test). The score is the mean KL divergence of the next-token distributions at the target
positions from the fp32 model's; also measured with every linear at 4 bits. Groups rather than
single modules or layers: one forward of the batch takes seconds on one shared core, 210 too many here.
Writes benchmarks/results/quant_sensitivity.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS_DIR  # first: it puts this checkout on sys.path

from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.suite.model import base_model_dir
from hydraopt_mobile.suite.prompts import render_prompt
from hydraopt_mobile.suite.tasks import load_suite

RESULTS = RESULTS_DIR / "quant_sensitivity.json"
BLOCK = 32


def ort_4bit_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) after ONNX Runtime's symmetric 4-bit block-32 quantisation along ``in``
    (what MatMulNBits computes with), decoded back to fp32."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    wt = np.ascontiguousarray(weight.detach().float().numpy().T)  # MatMul layout (K, N)
    k, n = wt.shape
    blocks = (k + BLOCK - 1) // BLOCK
    packed = np.zeros((n, blocks, BLOCK // 2), np.uint8)
    scales = np.zeros(n * blocks, np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, wt, scales, zero_points, BLOCK, n, k, True)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, BLOCK).astype(np.float32) - 8
    return torch.from_numpy((codes * scales.reshape(n, blocks, 1)).reshape(n, -1)[:, :k].copy())


def _batch(tokenizer, per_task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, target mask) of ``per_task`` train examples of every task, right-padded."""
    seqs, targets = [], []
    for spec in load_suite(None):
        for ex in spec.train[:per_task]:
            prompt = tokenizer(render_prompt(tokenizer, spec, ex), add_special_tokens=False).input_ids
            answer = tokenizer(ex.target, add_special_tokens=False).input_ids
            seqs.append(prompt + answer)
            targets.append([0] * (len(prompt) - 1) + [1] * len(answer) + [0])  # positions predicting the answer
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    tmask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, t) in enumerate(zip(seqs, targets)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        tmask[i, : len(t)] = torch.tensor(t, dtype=torch.bool)
    return ids, mask, tmask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=1, help="train examples per task")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model_dir = base_model_dir()
    model = load_causal_lm(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, mask, tmask = _batch(tokenizer, args.per_task)

    @torch.no_grad()
    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[tmask].float(), -1)

    reference = log_probs()

    def kl() -> float:
        got = log_probs()
        return float((reference.exp() * (reference - got)).sum(-1).mean())

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    rounded = {n: ort_4bit_roundtrip(w) for n, w in originals.items()}
    groups: dict[str, list[str]] = {"lm_head = tied embedding": ["lm_head"]}
    for name in linears:
        parts = name.split(".")
        if "layers" in parts:
            groups.setdefault(f"every {parts[-1]}", []).append(name)
    groups["every linear"] = list(linears)

    @torch.no_grad()
    def kl_with(names: list[str]) -> float:
        for n in names:
            linears[n].weight.copy_(rounded[n])
        try:
            return kl()
        finally:
            for n in names:
                linears[n].weight.copy_(originals[n])

    t0 = time.time()
    rows = [{"group": g, "modules": len(names), "params": sum(originals[n].numel() for n in names), "kl": kl_with(names)}
            for g, names in groups.items()]
    rows.sort(key=lambda r: -r["kl"])
    notes = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised), base weights, no adapter",
        "examples": f"{args.per_task} train-split examples per suite task ({ids.shape[0]} sequences, {int(tmask.sum())} target tokens), teacher-forced",
        "grid": "ONNX Runtime MLAS quantize_matmul_4bits, symmetric, block 32 (the int4 recipe)",
        "kl": "mean KL(fp32 || the group at 4 bits, the rest fp32) of next-token distributions at target positions",
        "seconds": round(time.time() - t0, 1),
    }
    md = ["# Per-module 4-bit sensitivity (SmolLM2-135M)", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
    md += markdown_table(["group", "modules", "params", "KL"], [[r["group"], r["modules"], r["params"], r["kl"]] for r in rows], "lrrr")
    write_record(args.results, {"notes": notes, "groups": rows}, "\n".join(md) + "\n")
    print(", ".join(f"{r['group']} {r['kl']:.4f}" for r in rows[:12]))


if __name__ == "__main__":
    main()
