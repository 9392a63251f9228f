"""The end-to-end KL of a bank to its adapters (fidelity.py) against PEFT's own forward, and the
choice between the data-aware and the data-free plan (objective_choice.py), in the library and in
`hydraopt merge --calibration` (a tiny real Llama, real PEFT adapters, a real tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hydraopt_mobile.adapters import build_adapter_set, load_adapter
from hydraopt_mobile.calibration import collect, identity
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.fidelity import kl_to_adapters, mean_kl
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge_budgets
from hydraopt_mobile.objective_choice import ObjectiveChoice, merge_choosing
from hydraopt_mobile.peft_io import write_peft_folder
from tests.test_calibration import word_tokenizer
from tests.tiny_models import tiny_llama, tiny_peft_adapter

TEXTS = {
    "t0": ["the cat sat on the mat", "a dog ran under the tree quickly"],
    "t1": ["the tree", "a cat sat under the tree slowly", "dog ran"],
    "t2": ["the mat", "a dog sat on the cat"],
}


@pytest.fixture
def setup(tmp_path):
    folders = {f"t{i}": tiny_peft_adapter(tmp_path / f"t{i}", seed=i + 1) for i in range(3)}
    aset = build_adapter_set([load_adapter(path, name) for name, path in folders.items()])
    return aset, folders, tiny_llama(0), word_tokenizer()


def on_disk(tmp_path, model, tokenizer) -> tuple[Path, Path]:
    """The model folder and the texts folder (``<task>.jsonl`` of :data:`TEXTS`) a command reads."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    texts = tmp_path / "texts"
    texts.mkdir()
    for task, rows in TEXTS.items():
        (texts / f"{task}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return model_dir, texts


def peft_log_probs(folder, tokenizer, text: str) -> torch.Tensor:
    """Next-token log-probabilities from PEFT's LoRA forward of ``folder`` on a fresh base model."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(0), str(folder)).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)


def test_kl_equals_peft_reference(setup, tmp_path):
    """KL(adapter || bank) from weight-added factors, batched and padded, equals the KL of PEFT's own
    forward of the adapter folder and of the bank's task written as a PEFT folder."""
    aset, folders, model, tokenizer = setup
    [bank] = merge_budgets(aset, MergeConfig("hydraopt"), [Budget(fraction=0.3)])
    [got] = kl_to_adapters(model, tokenizer, aset, [bank], TEXTS, batch_size=2)
    for task in ("t1", "t2"):
        write_peft_folder(bank.task_factors(task), tmp_path / f"bank-{task}", "tiny-llama")
        total, n = 0.0, 0
        for text in TEXTS[task]:
            ref, mine = peft_log_probs(folders[task], tokenizer, text), peft_log_probs(tmp_path / f"bank-{task}", tokenizer, text)
            total += float((ref.exp() * (ref - mine)).sum())
            n += ref.shape[0]
        assert got[task] == pytest.approx(total / n, rel=1e-3, abs=1e-7)
    assert mean_kl(got) > 1e-5  # the budget loses something: the comparison above is not of zeros


def test_a_bank_of_the_adapters_themselves_has_no_kl(setup):
    aset, _, model, tokenizer = setup
    [bank] = merge_budgets(aset, MergeConfig("per-task"), [Budget(fraction=1.0)])  # room for every adapter as it is
    [kl] = kl_to_adapters(model, tokenizer, aset, [bank], TEXTS)
    assert max(kl.values()) < 1e-6


def test_the_choice_keeps_the_bank_closer_to_the_adapters(setup):
    aset, _, model, tokenizer = setup
    cal = collect(model, tokenizer, aset, TEXTS)
    budgets = [Budget(fraction=0.2), Budget(fraction=0.4)]
    aware = merge_budgets(aset, MergeConfig("hydraopt", calibration=cal), budgets)
    free = merge_budgets(aset, MergeConfig("hydraopt"), budgets)
    kls = kl_to_adapters(model, tokenizer, aset, [*aware, *free], TEXTS)
    chosen = merge_choosing(aset, MergeConfig("hydraopt", calibration=cal), budgets, model, tokenizer, TEXTS, ObjectiveChoice("kl"))
    for i, bank in enumerate(chosen):
        want = {"data-aware": mean_kl(kls[i]), "data-free": mean_kl(kls[len(budgets) + i])}
        record = bank.params["choice"]
        assert record["mean_kl"] == pytest.approx(want, rel=1e-6)
        assert record["kept"] == min(want, key=lambda k: (want[k], k != "data-free"))
        source = aware[i] if record["kept"] == "data-aware" else free[i]
        assert bank.total_file_bytes() == source.total_file_bytes()
        assert all(torch.equal(bank.task_factors("t1")[m].B, source.task_factors("t1")[m].B) for m in aset.module_names)
    aware_only = merge_choosing(aset, MergeConfig("hydraopt", calibration=cal), budgets, model, tokenizer, TEXTS)  # the default: the data-aware plan
    assert [b.total_file_bytes() for b in aware_only] == [b.total_file_bytes() for b in aware] and "choice" not in aware_only[0].params


def test_identical_plans_keep_the_data_free_one(setup):
    """With X_t = I the data-aware plan is the data-free one: equal KL, and the tie keeps data-free."""
    aset, _, model, tokenizer = setup
    [bank] = merge_choosing(aset, MergeConfig("hydraopt", calibration=identity(aset)), [Budget(fraction=0.3)], model, tokenizer, TEXTS, ObjectiveChoice("kl"))
    kl = bank.params["choice"]["mean_kl"]
    assert kl["data-aware"] == kl["data-free"] and bank.params["choice"]["kept"] == "data-free"


def test_choice_needs_calibration_and_a_known_rule(setup):
    aset, _, model, tokenizer = setup
    with pytest.raises(UserError, match="--calibration"):
        merge_choosing(aset, MergeConfig("hydraopt"), [Budget(fraction=0.3)], model, tokenizer, TEXTS)
    with pytest.raises(UserError, match="--choose 'best'"):
        ObjectiveChoice("best")  # type: ignore[arg-type]


def test_cli_merge_with_calibration_chooses_and_says_so(setup, tmp_path):
    from hydraopt_mobile.app.cli import app

    aset, folders, model, tokenizer = setup
    model_dir, texts = on_disk(tmp_path, model, tokenizer)
    adapters = [f"{name}={path}" for name, path in folders.items()]
    common = ["merge", *adapters, "--budget", "0.3", "--calibration", str(texts), "--model", str(model_dir)]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--choose", "kl", "--out", str(tmp_path / "kl")])
    assert result.exit_code == 0, result.output
    assert "plan: mean KL to the adapters" in result.output
    choice = json.loads((tmp_path / "kl" / "manifest.json").read_text())["params"]["choice"]
    assert choice["by"] == "kl" and choice["kept"] in ("data-aware", "data-free") and set(choice["mean_kl"]) == {"data-aware", "data-free"}
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "aware")])  # the default: the data-aware plan, no KL pass
    assert result.exit_code == 0, result.output
    assert "mean KL" not in result.output
    params = json.loads((tmp_path / "aware" / "manifest.json").read_text())["params"]
    assert "choice" not in params and "calibration_tokens" in params
    result = runner.invoke(app, ["merge", *adapters, "--budget", "0.3", "--choose", "data-aware", "--out", str(tmp_path / "none")])
    assert result.exit_code != 0 and "--choose applies with --calibration" in result.output
    assert not (tmp_path / "none").exists()
