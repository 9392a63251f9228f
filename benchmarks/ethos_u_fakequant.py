"""Where the Ethos-U layer's error comes from: the same PT2E-quantised layer run in PyTorch (fake
quantisation, before any lowering) against fp32, beside the TOSA reference model's error of the
lowered program from ``device_ethos-u.json`` (same layer, inputs, tasks, calibration).

If the two agree, the loss is the quantisation scheme's; if the lowered program is much further
from fp32, the loss is in the lowering (TOSA rescales, lookup tables), not in the scheme.

    python benchmarks/ethos_u_fakequant.py      # ~3 min; needs `hydraopt targets setup ethos-u`

Writes benchmarks/results/device_ethos-u_fakequant.{json,md}.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import common  # noqa: F401  first: it puts this checkout on sys.path

from benchmarks.device_ethos_u import RESULTS, build_case
from exporters.targets.ethos_u import ensure_ready, site
from exporters.targets.ethos_u_compile import pad, padded_ranks
from exporters.targets.ethos_u_layer import quantize, variant_runs
from hydraopt_mobile.app.records import markdown_table, write_record


def block_errors(case: dict, spec_cls) -> list[dict]:
    """RMSNorm, attention and MLP of the layer each compiled alone (A16W8, U85) and run on the TOSA
    reference model, against their fp32 outputs and their PT2E fake quantisation."""
    import torch.nn.functional as F

    from exporters.targets.ethos_u_layer import LoraDecoderLayer, _rms, compile_variant, run_tosa

    cfg, x = case["cfg"], case["x"][None]
    layer = LoraDecoderLayer(case["weights"], cfg).eval()

    class Block(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *inputs):
            return self.fn(*inputs)

    with torch.no_grad():
        h = _rms(x, layer.ln_in, cfg.eps)
        q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
        h2 = _rms(x + layer._attention(q, k, v), layer.ln_post, cfg.eps)
    cases = [("rmsnorm", lambda t: _rms(t, layer.ln_in, cfg.eps), (x,)),
             ("attention (after the projections, before o_proj)", layer._attention, (q, k, v)),
             ("mlp", lambda t: layer.down_proj(F.silu(layer.gate_proj(t)) * layer.up_proj(t)), (h2,))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, inputs in cases:
            block = Block(fn).eval()
            with torch.no_grad():
                ref = block(*inputs)
                fq = quantize(block, inputs, [inputs], spec_cls("ethos-u85-256"), "a16w8")(*inputs)
            rec = compile_variant(block, inputs, [inputs], "ethos-u85-256", "a16w8", Path(tmp) / name.split()[0])
            got = run_tosa(Path(rec["tosa"]), list(inputs), rec["inputs_q"], rec["outputs_q"]) if rec["delegates"] == 1 else None
            out.append({"block": name, "fake_quant_rel_err": float((fq - ref).norm() / ref.norm()),
                        "tosa_rel_err": None if got is None else float((got - ref).norm() / ref.norm()),
                        "delegates": rec["delegates"], "cpu_ops": rec["cpu_ops"]})
            print(out[-1], flush=True)
    return out


def main() -> None:
    out = RESULTS.with_name("device_ethos-u_fakequant.json")
    torch.set_num_threads(1)
    sys.path.append(str(site(ensure_ready())))
    from executorch.backends.arm import EthosUCompileSpec

    case = build_case()
    tosa = {(r["variant"], r["npu"], r["quant"]): r for r in json.loads(RESULTS.read_text())["records"]}
    rows = []
    for v in case["variants"]:
        ranks = padded_ranks(v.tasks)
        tasks = {t: pad(f, ranks) for t, f in v.tasks.items()}
        module, runs, calibration = variant_runs(v.kind, tasks, list(v.sequence), ranks, case["weights"], case["cfg"], case["x"][None])
        with torch.no_grad():
            fp32 = [module(*inp) for _, inp in runs]
        for quant in ("a8w8", "a16w8"):
            q = quantize(module, runs[0][1], calibration, EthosUCompileSpec("ethos-u85-256"), quant)
            with torch.no_grad():
                errs = [float((q(*inp) - f).norm() / f.norm()) for (_, inp), f in zip(runs, fp32)]
            lowered = tosa.get((v.name, "ethos-u85-256", quant), {})
            rows.append({"variant": v.name, "quant": quant, "tasks": [t for t, _ in runs],
                         "fake_quant_rel_err": errs, "fake_quant_rel_err_max": max(errs),
                         "tosa_rel_err": [r.get("rel_err") for r in lowered.get("runs", [])],
                         "tosa_rel_err_max": max((r["rel_err"] for r in lowered.get("runs", []) if "rel_err" in r), default=None)})
            print(rows[-1], flush=True)
    blocks = block_errors(case, EthosUCompileSpec)
    meta = {"note": "relative error ||y - y_fp32|| / ||y_fp32|| of one SmolLM2-135M layer (16 tokens): PT2E fake quantisation in "
                    "PyTorch (Arm quantiser for ethos-u85-256) vs the lowered program on the TOSA reference model (ethos-u85-256; "
                    "from device_ethos-u.json). Max over the runs (tasks, and no task for switchable variants).",
            "threads": 1}
    meta["blocks_note"] = ("each block of the layer alone at A16W8 on ethos-u85-256, fed the fp32 layer's own intermediate values: "
                           "fake quantisation vs the lowered program on the TOSA reference model")
    table = markdown_table(["variant", "quant", "fake-quant rel. err (max)", "lowered TOSA rel. err (max)"],
                           [[r["variant"], r["quant"], r["fake_quant_rel_err_max"], r["tosa_rel_err_max"]] for r in rows])
    block_table = markdown_table(["block", "fake-quant rel. err", "lowered TOSA rel. err", "delegates", "CPU ops"],
                                 [[b["block"], b["fake_quant_rel_err"], b["tosa_rel_err"], b["delegates"], len(b["cpu_ops"])] for b in blocks])
    write_record(out, {"meta": meta, "records": rows, "blocks": blocks},
                 "\n".join(["# Ethos-U layer: quantisation scheme vs lowering", "", meta["note"], "", *table, "",
                            meta["blocks_note"], "", *block_table, ""]))


if __name__ == "__main__":
    main()
