"""One Llama/SmolLM2 decoder layer with LoRA task slots on ``q_proj`` and ``v_proj``, compiled for
Arm Ethos-U NPUs by ExecuTorch's Arm backend (TOSA -> Vela), and run on the TOSA reference model.

This file is both a module (the layer, importable anywhere torch is) and the script the ``ethos-u``
target runs in a subprocess (``python ethos_u_layer.py JOB_DIR``) with the target's packages
(Vela, the TOSA tools) appended to ``sys.path``; ``exporters/targets/ethos_u_compile.py`` writes the job.

The layer is written out by hand (not transformers' module) so that every op is one the Arm
backend lowers at a fixed sequence length:
- grouped-query attention without ``repeat_kv``: the ``rep = heads / kv_heads`` query heads that
  share a kv head are stacked along the sequence axis, ``q.view(1, kv, rep * S, d)``, so one batched
  matmul per kv head gives every score (head ``h`` uses kv head ``h // rep``, as in transformers);
- the causal softmax multiplies by a 0/1 mask after ``exp`` instead of adding ``-inf`` before it:
  ``softmax_masked(s)_ij = m_ij exp(s_ij - max_k s_ik) / sum_k m_ik exp(s_ik - max_k s_ik)``,
  which equals softmax over the unmasked entries (the shift cancels in the ratio) and keeps the
  quantised scores' range to what the scores really span (``-inf`` would be quantised as -256);
- LoRA: ``q = W_q h + (h A_q^T) B_q^T`` with the LoRA scale folded into ``B`` (as everywhere in
  the library), ``A`` and ``B`` either runtime inputs (switchable) or folded into ``W`` (merged).
``tests/test_target_ethos_u.py`` checks it against transformers' ``LlamaDecoderLayer``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exporters.targets.device_runner import report_progress

SLOTS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LayerConfig:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    seq: int

    @classmethod
    def from_hf(cls, config, seq: int) -> "LayerConfig":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                   head_dim, float(config.rms_norm_eps), float(theta), seq)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps) * w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LoraDecoderLayer(torch.nn.Module):
    """The decoder layer at batch 1 and sequence ``cfg.seq``, positions 0..seq-1.

    ``merged=None``: ``forward(x, a_q, b_q, a_v, b_v)`` with the task factors as inputs
    (``a``: (1, r, d_in), ``b``: (1, d_out, r)); zero factors give the base layer.
    ``merged={slot: (A, B)}``: ``forward(x)`` with ``W + B A`` as constant weights.
    ``weights``: transformers' ``LlamaDecoderLayer.state_dict()`` keys.
    """

    def __init__(self, weights: dict[str, torch.Tensor], cfg: LayerConfig,
                 merged: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__()
        self.cfg = cfg
        self.switchable = merged is None
        lin = {n: weights[f"self_attn.{n}.weight"].float().clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        lin.update({n: weights[f"mlp.{n}.weight"].float().clone() for n in ("gate_proj", "up_proj", "down_proj")})
        for slot, (a, b) in (merged or {}).items():
            lin[slot] = lin[slot] + b.float() @ a.float()
        for name, w in lin.items():
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            setattr(self, name, layer)
        self.ln_in = torch.nn.Parameter(weights["input_layernorm.weight"].float().clone(), requires_grad=False)
        self.ln_post = torch.nn.Parameter(weights["post_attention_layernorm.weight"].float().clone(), requires_grad=False)
        d = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = torch.arange(cfg.seq, dtype=torch.float64)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().float())
        self.register_buffer("sin", emb.sin().float())
        rep = cfg.heads // cfg.kv_heads
        self.register_buffer("mask", torch.tril(torch.ones(cfg.seq, cfg.seq)).repeat(rep, 1))  # (rep * S, S)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c, s = self.cfg, self.cfg.seq
        q = q.view(1, s, c.heads, c.head_dim).transpose(1, 2)
        k = k.view(1, s, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(1, s, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        rep = c.heads // c.kv_heads
        qg = q.reshape(1, c.kv_heads, rep * s, c.head_dim)
        scores = torch.matmul(qg, k.transpose(2, 3)) * (1.0 / math.sqrt(c.head_dim))
        e = torch.exp(scores - torch.amax(scores, dim=-1, keepdim=True)) * self.mask
        p = e / torch.sum(e, dim=-1, keepdim=True)
        out = torch.matmul(p, v).reshape(1, c.heads, s, c.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(1, s, c.heads * c.head_dim))

    def forward(self, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        h = _rms(x, self.ln_in, self.cfg.eps)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.switchable:
            a_q, b_q, a_v, b_v = factors
            q = q + torch.matmul(torch.matmul(h, a_q.transpose(1, 2)), b_q.transpose(1, 2))
            v = v + torch.matmul(torch.matmul(h, a_v.transpose(1, 2)), b_v.transpose(1, 2))
        x = x + self._attention(q, k, v)
        h = _rms(x, self.ln_post, self.cfg.eps)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def factor_inputs(task: dict[str, torch.Tensor] | None, ranks: dict[str, int], cfg: LayerConfig) -> list[torch.Tensor]:
    """A task's ``[a_q, b_q, a_v, b_v]`` inputs (zeros for ``None``: the base layer).
    ``task`` keys: ``<slot>.A`` (r, d_in), ``<slot>.B`` (d_out, r)."""
    out = []
    kv = cfg.kv_heads * cfg.head_dim
    for slot, d_out in (("q_proj", cfg.heads * cfg.head_dim), ("v_proj", kv)):
        r = ranks[slot]
        a = task[f"{slot}.A"] if task else torch.zeros(r, cfg.hidden)
        b = task[f"{slot}.B"] if task else torch.zeros(d_out, r)
        out += [a.float()[None].contiguous(), b.float()[None].contiguous()]
    return out


def variant_runs(kind: str, tasks: dict[str, dict[str, torch.Tensor]], sequence: list[str], ranks: dict[str, int],
                 weights: dict[str, torch.Tensor], cfg: LayerConfig, x: torch.Tensor) -> tuple[torch.nn.Module, list, list]:
    """The module of a variant, its runs ``[(task, inputs)]`` and its calibration inputs.
    ``switchable``: ``sequence`` in order, then ``"<none>"`` (zero factors), calibrated on all of them
    (one fixed encoding of the task inputs serves every task); ``merged``: the one task, folded in.
    ``tasks`` padded to ``ranks``; ``x``: (1, seq, hidden)."""
    if kind == "switchable":
        module = LoraDecoderLayer(weights, cfg).eval()
        factors = [(t, factor_inputs(tasks[t], ranks, cfg)) for t in sequence] + [("<none>", factor_inputs(None, ranks, cfg))]
        return module, [(t, (x, *f)) for t, f in factors], [(x, *f) for _, f in factors]
    [(t, task)] = tasks.items()
    module = LoraDecoderLayer(weights, cfg, {s: (task[f"{s}.A"], task[f"{s}.B"]) for s in SLOTS}).eval()
    return module, [(t, (x,))], [(x,)]


# ---- everything below runs in the target's environment (Vela and the TOSA tools importable) ----

def _summary(folder: Path) -> dict:
    """Vela's network summary CSV (one row): cycles, memory used (KiB in the file, bytes here)."""
    import csv

    [path] = sorted((folder / "output").glob("out_summary_*.csv"))
    row = next(csv.DictReader(path.open()))
    kib = lambda k: int(round(float(row[k]) * 1024))  # noqa: E731
    return {"accelerator": row["accelerator_configuration"], "system_config": row["system_config"],
            "memory_mode": row["memory_mode"], "clock_hz": float(row["core_clock"]),
            "cycles": int(float(row["cycles_total"])), "cycles_npu": int(float(row["cycles_npu"])),
            "inference_s": float(row["inference_time"]), "macs": int(float(row["nn_macs"])),
            "sram_bytes": kib("sram_memory_used"), "dram_bytes": kib("dram_memory_used"),
            "flash_bytes": kib("on_chip_flash_memory_used") + kib("off_chip_flash_memory_used"),
            "weights_bytes": int(float(row["total_npu_encoded_weights"])),
            "weights_area": row["weights_storage_area"], "passes": int(float(row["passes_after_fusing"]))}


def _io_params(graph) -> tuple[list[tuple[float, int, str]], list[tuple[float, int]], list[str], int]:
    """From the lowered program's top graph: per delegate input its (scale, zero point, dtype), per
    output its (scale, zero point), the ops left outside the delegate (on the CPU), the delegates."""
    delegates = [n for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target)]
    quant = ("quantize_per_tensor", "dequantize_per_tensor", "getitem", "executorch_call_delegate")
    cpu_ops = sorted({str(n.target).split("ops.")[-1] for n in graph.nodes
                      if n.op == "call_function" and not any(q in str(n.target) for q in quant)})
    if len(delegates) != 1:
        return [], [], cpu_ops, len(delegates)
    ins = []
    for arg in delegates[0].args[1:]:
        if "quantize_per_tensor" not in str(getattr(arg, "target", "")):
            raise RuntimeError(f"delegate input {arg} is not quantised on the CPU side")
        ins.append((float(arg.args[1]), int(arg.args[2]), str(arg.args[5]).replace("torch.", "")))
    outs = []
    for user in delegates[0].users:
        [deq] = list(user.users)
        outs.append((int(user.args[1]), float(deq.args[1]), int(deq.args[2])))
    return ins, [(s, z) for _, s, z in sorted(outs)], cpu_ops, 1


def quantize(module: torch.nn.Module, example: tuple, calibration: list[tuple], spec, quant: str) -> torch.nn.Module:
    """PT2E with the Arm quantiser for ``spec`` (an ``EthosUCompileSpec``): A8W8 or A16W8, weights
    per channel, calibrated on ``calibration``. The result runs in PyTorch (fake quantisation)."""
    from executorch.backends.arm import EthosUQuantizer, get_symmetric_a16w8_quantization_config, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = EthosUQuantizer(spec)
    quantizer.set_global(get_symmetric_a16w8_quantization_config() if quant == "a16w8" else get_symmetric_quantization_config())
    prepared = prepare_pt2e(torch.export.export(module, example).module(check_guards=False), quantizer)
    for inputs in calibration:
        prepared(*inputs)
    return convert_pt2e(prepared)


def compile_variant(module: torch.nn.Module, example: tuple, calibration: list[tuple], npu: str, quant: str,
                    folder: Path, extra_flags: tuple[str, ...] = ("--verbose-performance",)) -> dict:
    """PT2E-quantise ``module`` for ``npu`` (calibrated on ``calibration``), lower it with the
    EthosU partitioner (TOSA -> Vela), save the ``.pte``; returns Vela's summary, the IO
    quantisation, what stayed on the CPU, sizes, and the lowered TOSA's path."""
    from executorch.backends.arm import EthosUCompileSpec, EthosUPartitioner
    from executorch.exir import to_edge_transform_and_lower

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spec = EthosUCompileSpec(npu, extra_flags=list(extra_flags)).dump_intermediate_artifacts_to(str(folder))
    converted = quantize(module, example, calibration, spec, quant)
    edge = to_edge_transform_and_lower(torch.export.export(converted, example), partitioner=[EthosUPartitioner(spec)])
    ins, outs, cpu_ops, delegates = _io_params(edge.exported_program().graph_module.graph)
    program = edge.to_executorch()
    (folder / "layer.pte").write_bytes(program.buffer)
    return {"npu": npu, "quant": quant, "compile_s": round(time.perf_counter() - t0, 1), "delegates": delegates,
            "cpu_ops": cpu_ops, "pte_bytes": len(program.buffer), "inputs_q": ins, "outputs_q": outs,
            # several delegates overwrite one another's Vela output in ``folder``: no figure then
            "vela": _summary(folder) if delegates == 1 else None, "tosa": str(folder / "out.tosa")}


def run_tosa(tosa: Path, inputs: list[torch.Tensor], ins: list, outs: list) -> torch.Tensor:
    """The lowered TOSA graph on the TOSA reference model (exact integer numerics): quantise the
    inputs with the program's own input parameters, run, dequantise the output."""
    import numpy as np
    import tosa_reference_model as refmodel

    feeds = []
    for x, (scale, zp, dtype) in zip(inputs, ins):
        info = np.iinfo(dtype)
        q = torch.clamp(torch.round(x / scale) + zp, info.min, info.max)
        feeds.append(q.numpy().astype(dtype))
    result, status = refmodel.run(tosa.read_bytes(), feeds)
    if status != refmodel.GraphStatus.TOSA_VALID:
        raise RuntimeError(f"TOSA reference model: {status} on {tosa}")
    scale, zp = outs[0]
    return (torch.from_numpy(np.asarray(result[0]).astype(np.float32)) - zp) * scale


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def main(job_dir: Path) -> None:
    """Build, compile and run every variant of ``job.json``; write ``report.json`` and ``outputs.pt``
    (a safetensors file: per variant/NPU/quant/run, the int8 model's dequantised output)."""
    from safetensors.torch import load_file, save_file

    job = json.loads((job_dir / "job.json").read_text())
    sys.path.append(job["site"])
    torch.manual_seed(0)
    torch.set_num_threads(job.get("threads", 1))
    cfg = LayerConfig(**job["config"])
    weights = load_file(job_dir / "layer.safetensors")
    x = weights.pop("x")[None]
    report: dict = {"config": asdict(cfg), "variants": []}
    outputs: dict[str, torch.Tensor] = {}
    compiles, compiled = len(job["variants"]) * len(job["npus"]) * len(job["quants"]), 0
    for variant in job["variants"]:
        tasks = {t: load_file(job_dir / f"{variant['name']}-{t}.safetensors") for t in variant["tasks"]}
        ranks = variant["ranks"]
        module, runs, calibration = variant_runs(variant["kind"], tasks, variant["sequence"], ranks, weights, cfg, x)
        with torch.no_grad():
            fp32 = {t: module(*inp) for t, inp in runs}
        base = fp32.get("<none>")
        for npu in job["npus"]:
            for quant in job["quants"]:
                key = f"{variant['name']}/{npu}/{quant}"
                try:
                    rec = compile_variant(module, runs[0][1], calibration, npu, quant, job_dir / key.replace("/", "_"))
                except Exception as e:  # recorded, not hidden: a config the backend refuses is a result
                    compiled += 1
                    report_progress(compiled, compiles)
                    report["variants"].append({"variant": variant["name"], "kind": variant["kind"], "npu": npu, "quant": quant,
                                               "error": f"{type(e).__name__}: {str(e)[:800]}"})
                    print(f"{key}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rec.update(variant=variant["name"], kind=variant["kind"], method=variant["method"], ranks=ranks, runs=[])
                if rec["delegates"] == 1:
                    got = {}
                    for i, (t, inp) in enumerate(runs):
                        got[(i, t)] = y = run_tosa(Path(rec["tosa"]), list(inp), rec["inputs_q"], rec["outputs_q"])
                        outputs[f"{key}/{i}/{t}"] = y.contiguous()
                        rec["runs"].append({"task": t, "max_abs_err": float((y - fp32[t]).abs().max()),
                                            "fp32_max_abs": float(fp32[t].abs().max())})
                    none_out = next(v for (_, n), v in got.items() if n == "<none>") if base is not None else None
                    for (i, t), y in got.items():
                        if none_out is not None and t != "<none>":
                            eff, ref = y - none_out, fp32[t] - base
                            rec["runs"][i].update(effect_cosine=_cos(eff, ref), effect_fp32_norm=float(ref.norm()),
                                                  effect_int_norm=float(eff.norm()))
                report["variants"].append(rec)
                print(f"{key}: {rec['delegates']} delegate(s), vela {rec['vela']}, {rec['compile_s']} s, cpu ops {rec['cpu_ops']}", flush=True)
                compiled += 1
                report_progress(compiled, compiles)
        for t, y in fp32.items():
            outputs[f"{variant['name']}/fp32/{t}"] = y.contiguous()
    save_file(outputs, str(job_dir / "outputs.safetensors"))
    (job_dir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
