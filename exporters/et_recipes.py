"""ExecuTorch ``--quant`` recipes: torchao configs that lower to XNNPACK, as small typed records.
It imports no torch, so the command line lists the recipes at once; ``exporters/executorch_backend.py``
applies them (``quantize``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FORMAT = "executorch"  # the back end's --format name
RUNTIME = "executorch"  # what its exports name in their manifest


@dataclass(frozen=True)
class EtQuant:
    """One ``--quant`` value of the ExecuTorch back end: torchao configs that lower to XNNPACK.

    ``bits``: weight width of most base Linears (32: fp32; 4: ``Int8DynamicActivationIntxWeightConfig``
    int4, symmetric, group 32; 8: int8 per output channel, both with int8 dynamic per-token
    activations). ``int8_modules``: module names (a path component, e.g. ``down_proj``) whose Linears
    get the 8-bit config instead. ``scales``: how torchao picks the symmetric 4-bit scales: ``affine``
    (max |w| / 7.5 per group), ``no-clip`` (``SYMMETRIC_NO_CLIPPING_ERR``: the larger of max / 7 and
    min / -8, so the grid's asymmetric ends are used) or ``hqq`` (``HQQ_SCALE_ONLY``: scales fitted to
    minimise the rounding error). All three lower alike (codes + scales). Only symmetric grids: XNNPACK's per-group int4 weights carry a
    (bf16) scale per group and no zero point (``PerChannelGroupQuant`` in the delegate's schema), so
    Q4_1's asymmetric blocks cannot be carried over; weight-only configs do not lower (FIELD_NOTES).
    """

    name: str
    description: str
    bits: int
    int8_modules: tuple[str, ...] = ()
    scales: Literal["affine", "no-clip", "hqq"] = "affine"

    def bits_of(self, module: str) -> int:
        """The weight width of the base Linear at path ``module``."""
        return 8 if set(module.split(".")) & set(self.int8_modules) else self.bits


RECIPES: dict[str, EtQuant] = {r.name: r for r in (
    EtQuant("fp32", "float32 weights", 32),
    EtQuant("8da8w", "torchao int8 weights (per channel) with int8 dynamic activations on the base Linears", 8),
    EtQuant("8da4w", "torchao int4 weights (group 32, symmetric) with int8 dynamic activations on the base Linears", 4),
    EtQuant("8da4w-head8", "as 8da4w but the LM head at int8 (per channel)", 4, int8_modules=("lm_head",)),
    # the ONNX int4-mixed choice (benchmarks/results/quant_sensitivity.md), screened for ExecuTorch in
    # benchmarks/results/et_quant_screen.md
    EtQuant("8da4w-mixed", "as 8da4w but down_proj, v_proj and the LM head at int8 (measured most sensitive)", 4,
            int8_modules=("down_proj", "v_proj", "lm_head")),
    EtQuant("8da4w-noclip", "as 8da4w with scales that use the int4 grid's -8 end", 4, scales="no-clip"),
    EtQuant("8da4w-hqq", "as 8da4w with HQQ-fitted scales (torchao HQQ_SCALE_ONLY)", 4, scales="hqq"),
    EtQuant("8da4w-mixed-hqq", "as 8da4w-mixed with HQQ-fitted 4-bit scales", 4,
            int8_modules=("down_proj", "v_proj", "lm_head"), scales="hqq"),
    # the highest top-1 agreement with fp32 of the first 4-bit screen (8da4w-mixed-hqq's KL is slightly lower)
    EtQuant("8da4w-mixed-noclip", "as 8da4w-mixed with 4-bit scales that use the grid's -8 end", 4,
            int8_modules=("down_proj", "v_proj", "lm_head"), scales="no-clip"),
    # the recommended 4-bit recipe: ONNX int4-mixed's 8-bit set (its q/k/v are one fused weight); the highest suite
    # score of the 4-bit recipes on the real lowered programs (benchmarks/results/quant_recipes_executorch.md)
    EtQuant("8da4w-mixed-qkv-noclip", "recommended 4-bit: as 8da4w-mixed-noclip with q_proj and k_proj at int8 too (ONNX int4-mixed's set)", 4,
            int8_modules=("q_proj", "k_proj", "v_proj", "down_proj", "lm_head"), scales="no-clip"),
    EtQuant("8da4w-mixed-qkv-hqq", "as 8da4w-mixed-hqq with q_proj and k_proj at int8 too", 4,
            int8_modules=("q_proj", "k_proj", "v_proj", "down_proj", "lm_head"), scales="hqq"),
)}
QUANTS = {name: r.description for name, r in RECIPES.items()}
GROUP_SIZE = 32
