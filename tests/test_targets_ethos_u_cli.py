"""``hydraopt bench ethos-u BUNDLE`` as a user runs it: a bundle written by ``hydraopt merge`` from
real PEFT adapters, a tiny Llama (with a word-level tokenizer made here, so the layer's prompt is
real tokens), one decoder layer compiled for Ethos-U85 at A8W8 by the real Arm backend and Vela,
run on the TOSA reference model alpha -> beta -> alpha -> no task.

Nothing is mocked: the set-up installs Vela and the TOSA tools (cached in ``$HYDRAOPT_CACHE``). One
Arm lowering of the tiny layer is the cost (~1-4 min on 2 shared cores); the refusals run no compile.
Tolerances (tiny random layer 1, A8W8; seen values beside the constants): each task's error relative
to the fp32 output's norm, the LoRA effect's cosine with fp32's and its norm. A task mix-up fails the
cosine (the two tasks' effects point elsewhere); switching back must be bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exporters.targets.registry import get_target
from hydraopt_mobile.app.cli import app
from hydraopt_mobile.app.ethos_u_bench import DEFAULT_PROMPT, bundle_variants, summary_lines
from hydraopt_mobile.bundle import load_bundle
from tiny_models import make_tiny_model, tiny_peft_adapter

ROOT = Path(__file__).resolve().parent.parent
NPU = "ethos-u85-256"
REL_ERR = 0.06  # |out - fp32| / |fp32| per task; seen 0.032 (layer 1 of the tiny model, A8W8)
EFFECT_COS = 0.95  # cosine of the LoRA effect out(task) - out(no task) with fp32's; seen 0.999


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.output


def _word_tokenizer(folder: Path, text: str) -> None:
    """A word-level tokenizer over ``text``'s words (ids below the tiny model's vocabulary), saved
    into the model folder the way a Hugging Face tokenizer is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ethosu-cli")
    model = make_tiny_model(root / "model")
    _word_tokenizer(model, DEFAULT_PROMPT)
    adapters = [f"{name}={tiny_peft_adapter(root / name, seed=i, layers=2)}" for i, name in enumerate(("alpha", "beta"))]
    code, _, text = run("merge", *adapters, "--method", "hydraopt", "--budget", "0.75", "--out", root / "bundle")
    assert code == 0, text
    q_only = [f"{name}={tiny_peft_adapter(root / f'q-{name}', seed=i, targets=('q_proj',), layers=2)}" for i, name in enumerate(("alpha", "beta"))]
    code, _, text = run("merge", *q_only, "--method", "none", "--out", root / "q-bundle")
    assert code == 0, text
    return {"root": root, "model": model, "bundle": root / "bundle", "q_bundle": root / "q-bundle"}


@pytest.fixture(scope="module")
def ready() -> None:
    target = get_target("ethos-u")
    target.setup(progress=False)  # cached after the first run
    assert target.readiness().ready, f"ethos-u could not be made ready: {target.readiness().reason}"


def test_not_ready_gives_reason_and_command(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAOPT_CACHE", str(tmp_path / "empty-cache"))
    code, _, text = run("bench", "ethos-u", case["bundle"], "--model", case["model"])
    assert code == 2 and "not ready" in text and "hydraopt targets setup ethos-u" in text, text


def test_bad_bundles_and_options_are_refused(case, ready, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(case["bundle"], corrupt)
    rel = sorted(json.loads((corrupt / "manifest.json").read_text())["files"])[-1]
    (corrupt / rel).write_bytes((corrupt / rel).read_bytes()[:-8])
    code, _, text = run("bench", "ethos-u", corrupt, "--model", case["model"])
    assert code == 2 and rel in text, text

    code, _, text = run("bench", "ethos-u", case["q_bundle"], "--model", case["model"])
    assert code == 2 and str(case["q_bundle"]) in text and "v_proj" in text, text

    other = tmp_path / "other-model"  # same module names, another width: the bundle was merged for another model
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(other)
    code, _, text = run("bench", "ethos-u", case["bundle"], "--model", other)
    assert code == 2 and str(case["bundle"]) in text and "another model" in text, text

    code, _, text = run("bench", "ethos-u", case["bundle"], "--model", case["model"], "--npu", "ethos-u65-512")
    assert code == 2 and "--npu ethos-u65-512" in text, text
    code, _, text = run("bench", "ethos-u", case["bundle"], "--model", case["model"], "--layer", "7")
    assert code == 2 and "--layer 7" in text, text


def test_variants_hold_the_bundles_factors(case):
    bank = load_bundle(case["bundle"])
    switchable, merged = bundle_variants(bank, case["bundle"], 1, ["beta", "alpha"], merged_reference=True)
    assert (switchable.name, switchable.kind, switchable.sequence) == ("hydraopt", "switchable", ("beta", "alpha", "beta"))
    assert (merged.kind, list(merged.tasks)) == ("merged", ["beta"])  # the first task run is the one folded in
    for task in ("alpha", "beta"):
        for slot in ("q_proj", "v_proj"):
            f = bank.task_factors(task)[f"model.layers.1.self_attn.{slot}"]
            assert torch.equal(switchable.tasks[task][f"{slot}.B"] @ switchable.tasks[task][f"{slot}.A"], f.B.float() @ f.A.float())
    assert torch.equal(merged.tasks["beta"]["q_proj.A"], switchable.tasks["beta"]["q_proj.A"])
    assert not torch.equal(switchable.tasks["alpha"]["v_proj.B"], switchable.tasks["beta"]["v_proj.B"])


def test_bench_ethos_u_on_a_merged_bundle(case, ready):
    out = case["root"] / "ethos.json"
    code, stdout, text = run("bench", "ethos-u", case["bundle"], "--model", case["model"], "--task", "alpha", "--task", "beta",
                             "--npu", NPU, "--quant", "a8w8", "--layer", "1", "--json", "--out", out)
    assert code == 0, text
    [rec] = json.loads(stdout)
    assert rec["compiled"] and rec["all_on_npu"], rec.get("error") or rec["cpu_ops"]
    assert rec["cycles"] > 0 and rec["sram_bytes"] > 0 and rec["flash_bytes"] > 0 and rec["pte_bytes"] > 0
    assert (rec["target"], rec["latency_kind"], rec["method"], rec["npu"], rec["quant"], rec["layer"], rec["scope"]) == \
        ("ethos-u", "estimated", "hydraopt", NPU, "a8w8", 1, "one decoder layer")
    assert [r["task"] for r in rec["runs"]] == ["alpha", "beta", "alpha", "<none>"]
    assert rec["switch_back_identical"] and rec["tasks_differ"]
    for run_ in rec["runs"][:2]:
        print(f"{run_['task']}: rel. err {run_['rel_err']:.4f}, max abs err {run_['max_abs_err']:.4f} of {run_['fp32_max_abs']:.3f}, "
              f"LoRA effect cos {run_['effect_cosine']:.4f}, |effect| {run_['effect_int_norm']:.3f} vs fp32 {run_['effect_fp32_norm']:.3f}")
        assert run_["rel_err"] < REL_ERR and run_["max_abs_err"] < run_["fp32_max_abs"] / 10
        assert run_["effect_cosine"] > EFFECT_COS and abs(run_["effect_int_norm"] / run_["effect_fp32_norm"] - 1) < 0.2
    # the benchmark's records and the command's carry the same field names
    committed = json.loads((ROOT / "benchmarks" / "results" / "device_ethos-u.json").read_text())["records"]
    bench_rec = next(r for r in committed if r["compiled"] and r["kind"] == "switchable")
    assert set(bench_rec) <= set(rec), set(bench_rec) - set(rec)
    saved = json.loads(out.read_text())
    assert saved["records"] == [rec] and out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0
    text = "\n".join(summary_lines(saved["records"], saved["meta"]))
    assert "ONE decoder layer" in text and "ESTIMATE" in text and f"{rec['cycles']:,} cycles" in text
    assert "alpha: max abs err" in text and "LoRA effect cosine" in text
    before = out.read_bytes()
    code, _, text = run("bench", "ethos-u", case["bundle"], "--model", case["model"], "--out", out)
    assert code == 2 and "already exists" in text and out.read_bytes() == before  # no silent overwrite, refused before any work
