"""ONNX ``--quant`` recipes: a small typed registry of ONNX Runtime weight quantisation settings.
It imports no ONNX, so the command line lists the recipes at once; ``exporters/onnx_quant.py``
applies them.

Every recipe is a setting of ONNX Runtime's own ``MatMulNBitsQuantizer`` (MatMulNBits for the base
MatMuls, GatherBlockQuantized for the embedding); nothing here quantises by hand. The LoRA MatMuls
are always excluded: quantising them would fold the switchable slot inputs into constants.

Why the recipes differ (the base model is the Q4_1 GGUF dequantised: its linears lie on Q4_1's
asymmetric 32-value blocks, its tied embedding / LM head on Q8_0's symmetric 32-value blocks, see
``hydraopt_mobile/base_model.py``):

- the LM head is the tied embedding: at 4 bits every logit of the 49k vocabulary carries the
  rounding, so the ``*-head8`` recipes keep the head (and, where the quantiser can, the embedding)
  at 8 bits, which reproduces Q8_0's grid almost exactly;
- ``bits`` is the weight width of most base linears (the issue's record field); ``overrides`` lists
  (weight-name regex, bits) pairs, first match wins, for the layers kept at other widths.

The quantiser packs Gather only at 4 bits (FIELD_NOTES): a recipe whose embedding is not 4-bit
keeps the embedding fp32 (a second, quantised copy serves the head MatMul).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FORMAT = "onnx"  # the back end's --format name
RUNTIME = "onnxruntime"  # what its exports name in their manifest

HEAD = r"(lm_head|embed_tokens)\.weight(\.T)?$"  # the tied embedding, read by the head MatMul
# v_proj lost most at 4 bits; in the fused program (exporters/onnx_fuse.py) it is one weight with q and k, so
# the three go to 8 bits together (a MatMulNBits has one width)
SENSITIVE = r"\.(down_proj|qkv_proj)\.weight(\.T)?$"


@dataclass(frozen=True)
class OnnxQuant:
    """One ``--quant`` value of the ONNX back end (fp32 when ``bits`` is 32)."""

    name: str
    description: str
    bits: int  # weight bits of most base linears: 4, 8 or 32
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast); 0 = fp32 compute
    embedding_4bit: bool = False  # pack the embedding Gather (at 4 bits, the only width the quantiser packs)
    overrides: tuple[tuple[str, int], ...] = field(default=())  # (weight-name regex, bits): first match wins

    def bits_of(self, weight: str) -> int:
        """The weight width of the base MatMul reading ``weight``."""
        return next((b for pattern, b in self.overrides if re.search(pattern, weight)), self.bits)


RECIPES: dict[str, OnnxQuant] = {r.name: r for r in (
    OnnxQuant("fp32", "float32 weights", 32),
    OnnxQuant("int8", "MatMulNBits 8-bit weights (block 32, symmetric), fp32 embedding; close to fp32", 8),
    OnnxQuant("int8-acc0", "as int8 but fp32 activations in the 8-bit MatMuls (accuracy_level 0): closer to fp32, slower", 8,
              accuracy_level=0),
    OnnxQuant("int8-b16", "as int8 with 16-value blocks: MatMulNBits quantises the activations per block too, so they round finer", 8,
              block_size=16),
    OnnxQuant("int4", "MatMulNBits 4-bit weights (block 32, symmetric) and a 4-bit embedding; the smallest", 4,
              embedding_4bit=True),
    OnnxQuant("int4-asym", "as int4 but asymmetric; its rounded integer zero point misses Q4_1's block minimum", 4,
              symmetric=False, embedding_4bit=True),
    OnnxQuant("int4-b16", "as int4 with 16-value blocks (finer scales, +1 byte per 16 weights)", 4,
              block_size=16, embedding_4bit=True),
    OnnxQuant("int4-b64", "as int4 with 64-value blocks (coarser, smaller)", 4, block_size=64, embedding_4bit=True),
    OnnxQuant("int4-acc0", "as int4 but fp32 activations in the 4-bit MatMuls (accuracy_level 0)", 4,
              accuracy_level=0, embedding_4bit=True),
    OnnxQuant("int4-head8", "4-bit linears (block 32), 8-bit LM head, 4-bit embedding", 4,
              embedding_4bit=True, overrides=((HEAD, 8),)),
    OnnxQuant("int4-head8-embfp32", "4-bit linears (block 32), 8-bit LM head, fp32 embedding", 4,
              overrides=((HEAD, 8),)),
    # the module types that lost most at 4 bits in benchmarks/results/quant_sensitivity.md (down_proj, v_proj,
    # then the head), at 8 bits, v with q and k (one fused weight): 41 % of the linears' weights, so most stay 4-bit
    OnnxQuant("int4-mixed", "4-bit linears but 8-bit down_proj, q/k/v (one fused weight: v measured most sensitive) and LM head, 4-bit embedding", 4,
              embedding_4bit=True, overrides=((HEAD, 8), (SENSITIVE, 8))),
)}
QUANTS = {name: r.description for name, r in RECIPES.items()}
