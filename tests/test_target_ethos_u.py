"""The ``ethos-u`` target on the real tools: ExecuTorch's Arm backend lowers a tiny decoder layer
with LoRA task inputs to TOSA, Vela compiles it for Ethos-U55 and Ethos-U85, and the TOSA reference
model runs it (the NPU's integer numerics) for task alpha, then beta, then alpha again.

Nothing is mocked or skipped: the set-up really installs Vela and the TOSA tools (PyPI, ~30 s on a
clean machine, cached in ``$HYDRAOPT_CACHE/targets``); a target that cannot be set up fails here
with its reason.

Tolerance (A8W8, the tiny random layer): the NPU output of task t is closer to fp32 task t than to
fp32 of the other task (observed 0.43 vs 10.2, so a wrong task cannot pass), its max abs error is
under 0.05 x the fp32 output's max (observed 0.044-0.053 of ~3.5, i.e. ~1.5 %), and the LoRA effect
``out(t) - out(no task)`` has cosine > 0.95 with fp32's (observed 0.998). On the real layer int8
activations cost much more (benchmarks/results/device_ethos-u.md: LoRA effect cosine 0.51-0.90).
"""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from exporters.targets.registry import get_target
from exporters.slots import merge_into
from exporters.targets.ethos_u import NPUS
from exporters.targets.ethos_u_compile import LayerVariant, bank_layer_tasks, compile_layer
from exporters.targets.ethos_u_layer import LayerConfig, LoraDecoderLayer, factor_inputs
from hydraopt_mobile.app.cli import app
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.errors import UserError
from tiny_models import make_bank, make_tiny_model

SEQ = 16
REL_TOL = 0.05
EFFECT_COS = 0.95


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    folder = make_tiny_model(tmp_path_factory.mktemp("ethosu") / "model")
    model = load_causal_lm(folder)
    bank = make_bank()
    cfg = LayerConfig.from_hf(model.config, SEQ)
    x = torch.randn(SEQ, cfg.hidden, generator=torch.Generator().manual_seed(3))
    return {"folder": folder, "model": model, "bank": bank, "cfg": cfg, "x": x,
            "weights": model.model.layers[0].state_dict(), "tasks": bank_layer_tasks(bank, 0, ["alpha", "beta"])}


def _hf_layer_output(model, x: torch.Tensor) -> torch.Tensor:
    """transformers' own layer 0 (causal, positions 0..S-1): the dense reference."""
    layer = model.model.layers[0]
    pos = torch.arange(x.shape[0])[None]
    mask = torch.full((x.shape[0],) * 2, float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out = layer(x[None], attention_mask=mask, position_ids=pos, position_embeddings=model.model.rotary_emb(x[None], pos))
    return out[0] if isinstance(out, tuple) else out


def test_layer_equals_transformers_with_and_without_a_task(tiny):
    cfg, x = tiny["cfg"], tiny["x"]
    ranks = {"q_proj": 4, "v_proj": 4}
    layer = LoraDecoderLayer(tiny["weights"], cfg).eval()
    with torch.no_grad():
        base = layer(x[None], *factor_inputs(None, ranks, cfg))
        alpha = layer(x[None], *factor_inputs(tiny["tasks"]["alpha"], ranks, cfg))
        folded = LoraDecoderLayer(tiny["weights"], cfg, {s: (tiny["tasks"]["alpha"][f"{s}.A"], tiny["tasks"]["alpha"][f"{s}.B"])
                                                         for s in ("q_proj", "v_proj")}).eval()(x[None])
    assert torch.allclose(base, _hf_layer_output(tiny["model"], x), atol=1e-5)
    merged_model = load_causal_lm(tiny["folder"])
    slots = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")  # the bank also has o_proj: not a slot here
    merge_into(merged_model, {k: v for k, v in tiny["bank"].task_factors("alpha").items() if k in slots})
    assert torch.allclose(alpha, _hf_layer_output(merged_model, x), atol=1e-5)
    assert torch.allclose(folded, alpha, atol=1e-5)
    assert (alpha - base).abs().max() > 0.05  # the task changes the output: the checks above can fail


def test_variants_are_checked():
    with pytest.raises(UserError, match="names use letters"):
        LayerVariant("a/b", "none", "switchable", {})
    with pytest.raises(UserError, match="exactly one task"):
        LayerVariant("m", "none", "merged", {"a": {}, "b": {}})
    with pytest.raises(UserError, match="no factors for"):
        LayerVariant("s", "none", "switchable", {"a": {}}, ("a", "b"))


def test_not_ready_gives_reason_and_command(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("HYDRAOPT_CACHE", str(tmp_path / "empty-cache"))
    r = get_target("ethos-u").readiness()
    assert not r.ready and "not set up" in r.reason and "ethos-u-vela==" in r.reason
    assert r.command == "hydraopt targets setup ethos-u"
    out = CliRunner().invoke(app, ["targets"])
    assert out.exit_code == 0 and "ethos-u" in out.output and "hydraopt targets setup ethos-u" in out.output
    with pytest.raises(UserError, match="not ready.*hydraopt targets setup ethos-u"):
        compile_layer(tiny["weights"], tiny["x"], tiny["cfg"], [])


@pytest.fixture(scope="module")
def compiled(tiny) -> tuple[dict, dict]:
    target = get_target("ethos-u")
    t0 = time.perf_counter()
    steps = target.setup(progress=False)  # cached after the first run
    ready = target.readiness()
    assert ready.ready, f"ethos-u could not be made ready: {ready.reason}"
    print(f"ethos-u set-up {time.perf_counter() - t0:.1f} s {steps}")
    variant = LayerVariant("bank", "test-grouped", "switchable", tiny["tasks"], ("alpha", "beta", "alpha"))
    steps: list[tuple[int, int]] = []
    out = compile_layer(tiny["weights"], tiny["x"], tiny["cfg"], [variant], NPUS, ("a8w8",), on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(i, len(NPUS)) for i in range(1, len(NPUS) + 1)]  # one progress line per compile, as it finishes
    assert out[0]["log"], "the script's stdout log came back"
    return out


@pytest.mark.parametrize("npu", NPUS)
def test_compiles_runs_and_switches_on_the_npu(compiled, npu):
    report, outputs = compiled
    [rec] = [v for v in report["variants"] if v["npu"] == npu]
    assert "error" not in rec, rec.get("error")
    assert rec["delegates"] == 1 and rec["cpu_ops"] == [], f"{npu}: not all on the NPU: {rec['cpu_ops']}"
    vela = rec["vela"]
    assert vela["cycles"] > 0 and vela["sram_bytes"] > 0 and vela["macs"] > 0 and rec["pte_bytes"] > 0
    assert npu.split("-")[1].upper() in vela["accelerator"].upper()
    key = f"bank/{npu}/a8w8"
    a0, b1, a2, none = (outputs[f"{key}/{i}/{t}"] for i, t in enumerate(("alpha", "beta", "alpha", "<none>")))
    fp = {t: outputs[f"bank/fp32/{t}"] for t in ("alpha", "beta", "<none>")}
    assert torch.equal(a0, a2), "switching back to alpha did not give alpha's output again"
    assert not torch.equal(a0, b1)
    for got, task, other in ((a0, "alpha", "beta"), (b1, "beta", "alpha")):
        assert (got - fp[task]).norm() < (got - fp[other]).norm(), f"{npu}: {task}'s output is nearer fp32 {other}"
        assert (got - fp[task]).abs().max() < REL_TOL * fp[task].abs().max()
        cos = torch.nn.functional.cosine_similarity((got - none).flatten(), (fp[task] - fp["<none>"]).flatten(), dim=0)
        print(f"{npu} {task}: max abs err {(got - fp[task]).abs().max():.4f} (fp32 max {fp[task].abs().max():.3f}), "
              f"to the other task {(got - fp[other]).norm():.3f} vs own {(got - fp[task]).norm():.3f}, LoRA effect cos {cos:.4f}")
        assert cos > EFFECT_COS, f"{npu} {task}: LoRA effect cosine {cos:.3f}"
    assert [r["task"] for r in rec["runs"]] == ["alpha", "beta", "alpha", "<none>"]
