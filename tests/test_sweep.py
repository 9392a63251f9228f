"""Choosing a budget on your own texts (sweep.py, `hydraopt sweep`): every point is the bank
merge_budgets gives at that budget, measured end to end against the adapters (fidelity.py) on a
tiny real Llama with real PEFT adapters and a real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hydraopt_mobile.adapter_weights import applied
from hydraopt_mobile.adapters import build_adapter_set, load_adapter
from hydraopt_mobile.calibration import collect
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.fidelity import _log_probs, _measured, fidelity_to_adapters
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge, merge_budgets
from hydraopt_mobile.sweep import default_budgets, sweep
from tests.test_objective_choice import TEXTS, on_disk
from tests.test_calibration import word_tokenizer
from tests.tiny_models import tiny_llama, tiny_peft_adapter


@pytest.fixture
def setup(tmp_path):
    folders = {f"t{i}": tiny_peft_adapter(tmp_path / f"t{i}", seed=i + 1) for i in range(3)}
    aset = build_adapter_set([load_adapter(path, name) for name, path in folders.items()])
    return aset, folders, tiny_llama(0), word_tokenizer()


def test_agreement_is_the_share_of_positions_predicting_the_same_token(setup):
    aset, _, model, tokenizer = setup
    [bank] = merge_budgets(aset, MergeConfig("hydraopt"), [Budget(fraction=0.2)])
    [got] = fidelity_to_adapters(model, tokenizer, aset, [bank], TEXTS, batch_size=2)
    for t, task in enumerate(aset.task_names):
        with applied(model, {m: aset.factors(m)[t] for m in aset.module_names}):
            ref = _log_probs(model, tokenizer, [_measured(tokenizer, x, 256) for x in TEXTS[task]])
        with applied(model, bank.task_factors(task)):
            mine = _log_probs(model, tokenizer, [_measured(tokenizer, x, 256) for x in TEXTS[task]])
        same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, mine))
        positions = sum(r.shape[0] for r in ref)
        assert got[task].positions == positions and got[task].agreement == same / positions
    assert min(f.agreement for f in got.values()) < 1  # the budget changes some prediction: the check above is not of ones


def test_a_prompt_and_completion_is_measured_on_the_completion(setup):
    """A ``(prompt, completion)`` row compares the completion's next tokens only, given the prompt:
    the last positions of the same sequence run whole; a plain text compares every position."""
    aset, _, model, tokenizer = setup
    [bank] = merge_budgets(aset, MergeConfig("hydraopt"), [Budget(fraction=0.2)])
    prompt, completion = "the cat sat on", " the mat under a tree"
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    n_completion = len(tokenizer(completion, add_special_tokens=False).input_ids)
    pair, whole = ({t: [x] for t in aset.task_names} for x in ((prompt, completion), prompt + completion))
    [got_pair], [got_whole] = (fidelity_to_adapters(model, tokenizer, aset, [bank], texts) for texts in (pair, whole))
    t = 0
    task = aset.task_names[t]
    with applied(model, {m: aset.factors(m)[t] for m in aset.module_names}):
        [ref] = _log_probs(model, tokenizer, [_measured(tokenizer, x, 256) for x in whole[task]])
    with applied(model, bank.task_factors(task)):
        [mine] = _log_probs(model, tokenizer, [_measured(tokenizer, x, 256) for x in whole[task]])
    tail = slice(n_prompt - 1, None)
    assert got_pair[task].positions == n_completion and got_whole[task].positions == n_prompt + n_completion - 1
    assert got_pair[task].kl == pytest.approx(float((ref[tail].exp() * (ref[tail] - mine[tail])).sum()) / n_completion, rel=1e-5)
    assert got_pair[task].kl != pytest.approx(got_whole[task].kl, rel=1e-3)  # the prompt's positions count in one and not the other


def test_texts_files_hold_texts_or_prompt_completion_rows(tmp_path):
    from hydraopt_mobile.calibration import full_text, read_texts

    (tmp_path / "a.jsonl").write_text('{"text": "the cat", "id": 3}\n\n{"prompt": "the", "completion": " dog"}\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "the", "completion": ""}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "a", "completion": "b"}\n')
    assert read_texts(tmp_path, ["a"], "--texts") == {"a": ["the cat", ("the", " dog")]}
    assert [full_text(x) for x in read_texts(tmp_path, ["a"])["a"]] == ["the cat", "the dog"]
    for bad in ("b", "c"):
        with pytest.raises(UserError, match=f"{bad}.jsonl:1: expected"):
            read_texts(tmp_path, [bad], "--texts")


def test_an_equal_bank_is_measured_once(setup):
    """A bank repeated in the list gets the same values from one pass: the model runs once per batch
    for the adapter and once per distinct bank."""
    aset, _, model, tokenizer = setup
    a, b = merge_budgets(aset, MergeConfig("hydraopt"), [Budget(fraction=0.2), Budget(fraction=0.5)])
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = fidelity_to_adapters(model, tokenizer, aset, [a, b, a], TEXTS, batch_size=16)
    finally:
        handle.remove()
    assert len(calls) == len(aset.task_names) * 3  # one batch per task: the adapter, a, b
    assert got[0] == got[2] and got[0] != got[1]



def test_content_digest_is_what_a_bank_stores(setup, tmp_path):
    """The key of "measured once": a bank written and read back has the digest it had; another
    budget's bank has another; the method's name does not enter it."""
    from hydraopt_mobile.bundle import load_bundle, write_bundle

    aset, *_ = setup
    a, b = merge_budgets(aset, MergeConfig("hydraopt"), [Budget(fraction=0.2), Budget(fraction=0.5)])
    again = load_bundle(write_bundle(a, tmp_path / "a"))
    assert again.content_digest() == a.content_digest() != b.content_digest()
    again.method = "per-task"
    assert again.content_digest() == a.content_digest()


def test_each_point_is_the_bank_of_its_budget(setup):
    aset, _, model, tokenizer = setup
    budgets = [Budget(nbytes=64), Budget(fraction=0.2), Budget(fraction=1.0)]
    points = sweep(aset, ["hydraopt", "per-task"], budgets, model, tokenizer, TEXTS)
    assert [(p.method, p.budget) for p in points] == [(m, b.label()) for m in ("hydraopt", "per-task") for b in budgets]
    for method in ("hydraopt", "per-task"):
        mine = [p for p in points if p.method == method]
        assert mine[0].infeasible is not None and "smallest" in mine[0].infeasible and mine[0].tasks == {}
        banks = merge_budgets(aset, MergeConfig(method), budgets[1:])
        want = fidelity_to_adapters(model, tokenizer, aset, banks, TEXTS)
        for p, bank, fid in zip(mine[1:], banks, want):
            assert p.file_bytes == bank.total_file_bytes() and p.tasks == fid
        assert mine[1].mean_kl > 1e-5 and mine[2].mean_kl < 1e-6 and mine[2].mean_agreement == 1.0  # the whole budget keeps the adapters


def test_calibrated_points_are_the_data_aware_banks(setup):
    """With a calibration, the data-aware methods' points are the banks of the data-aware objective
    (calibration.py); compeft takes no data and gives its data-free bank."""
    aset, _, model, tokenizer = setup
    cal = collect(model, tokenizer, aset, TEXTS)
    budgets = [Budget(fraction=0.2), Budget(fraction=0.4)]
    points = sweep(aset, ["hydraopt", "compeft"], budgets, model, tokenizer, TEXTS, calibration=cal)
    aware = merge_budgets(aset, MergeConfig("hydraopt", calibration=cal), budgets)
    free = merge_budgets(aset, MergeConfig("hydraopt"), budgets)
    want = fidelity_to_adapters(model, tokenizer, aset, [*aware, *merge_budgets(aset, MergeConfig("compeft"), budgets)], TEXTS)
    assert [p.tasks for p in points] == want
    assert [p.file_bytes for p in points[:2]] == [b.total_file_bytes() for b in aware]
    assert [b.rel_errors for b in aware] != [b.rel_errors for b in free]  # the objectives differ here: the check above can fail


def test_a_one_merged_adapter_method_is_one_point_at_its_own_storage(setup):
    aset, _, model, tokenizer = setup
    [point] = sweep(aset, ["ties"], [Budget(fraction=0.2)], model, tokenizer, TEXTS)
    bank = merge(aset, MergeConfig("ties"))
    [want] = fidelity_to_adapters(model, tokenizer, aset, [bank], TEXTS)
    assert (point.method, point.budget, point.plan) == ("ties", "fixed", "one merged adapter")
    assert point.file_bytes == bank.total_file_bytes() and point.tasks == want and point.mean_kl > 1e-4


def test_only_infeasible_budgets_run_no_model_pass(setup):
    aset, _, model, tokenizer = setup
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        [point] = sweep(aset, ["hydraopt"], [Budget(nbytes=64)], model, tokenizer, TEXTS)
    finally:
        handle.remove()
    assert point.infeasible is not None and calls == []


def test_sweep_refuses_missing_texts(setup):
    aset, _, model, tokenizer = setup
    with pytest.raises(UserError, match="t2"):
        sweep(aset, ["hydraopt"], [Budget(fraction=0.2)], model, tokenizer, {k: v for k, v in TEXTS.items() if k != "t2"})
    with pytest.raises(UserError, match="task 't1': none has a next token to compare"):
        sweep(aset, ["hydraopt"], [Budget(fraction=0.2)], model, tokenizer, {**TEXTS, "t1": ["cat", "dog"]})


def test_adapters_of_another_model_are_refused_before_any_merge(setup):
    """A module missing from the base model, or of another shape, is named before the merges and
    the passes through the model (sweep) or the calibration's first batch (collect)."""
    aset, _, model, tokenizer = setup
    name = aset.module_names[0]
    with pytest.raises(UserError, match=f"sweep: adapter module '{name}' is not in the base model"):
        sweep(aset, ["hydraopt"], [Budget(fraction=0.2)], torch.nn.Sequential(), tokenizer, TEXTS)
    parent, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, torch.nn.Linear(3, 5))
    with pytest.raises(UserError, match=f"calibration: module '{name}' of the base model is not a Linear of the adapters' shape"):
        collect(model, tokenizer, aset, TEXTS)


def test_default_budgets_are_multiples_of_one_merged_adapter():
    assert [b.fraction for b in default_budgets(12)] == [0.0417, 0.0833, 0.1667, 0.3333]
    assert [b.fraction for b in default_budgets(2)] == [0.25, 0.5, 1.0]


def test_cli_sweep_writes_the_table_and_refuses_what_it_should(setup, tmp_path):
    from hydraopt_mobile.app.cli import app

    _, folders, model, tokenizer = setup
    model_dir, texts = on_disk(tmp_path, model, tokenizer)
    adapters = [f"{name}={path}" for name, path in folders.items()]
    out = tmp_path / "sweep"
    args = ["sweep", *adapters, "--texts", str(texts), "--model", str(model_dir), "--budgets", "0.2,0.5", "--out", str(out)]
    runner = CliRunner()
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads((out / "sweep.json").read_text())
    assert record["seconds"] > 0 and record["calibration"] is False and record["texts"] == {"t0": 2, "t1": 3, "t2": 2}
    assert [(p["method"], p["budget"]) for p in record["points"]] == [("hydraopt", "0.2"), ("hydraopt", "0.5"), ("per-task", "0.2"), ("per-task", "0.5")]
    assert all(set(p["tasks"]) == {"t0", "t1", "t2"} and 0 <= p["mean_agreement"] <= 1 for p in record["points"])
    assert (out / "sweep.png").stat().st_size > 1000 and "| hydraopt | 0.2 |" in (out / "sweep.md").read_text()
    assert "same token" in result.output and "next: hydraopt merge" in result.output

    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code != 0 and "--overwrite" in again.output
    same = runner.invoke(app, [*args[:-1], str(tmp_path / "other"), "--calibration", str(texts)], env={"COLUMNS": "200"})
    assert same.exit_code != 0 and "--calibration and --texts are the same folder" in same.output
    (texts / "t1.jsonl").unlink()
    missing = runner.invoke(app, [*args[:-1], str(tmp_path / "other")], env={"COLUMNS": "200"})
    assert missing.exit_code != 0 and "--texts" in missing.output and "t1.jsonl" in missing.output
    assert not (tmp_path / "other").exists()
