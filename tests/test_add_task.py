"""Adding tasks to a merged bank: closed forms against dense least squares, existing files
byte-identical (also when a new task sorts first), refused cases, the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch

from hydraopt_mobile.adapters import AdapterError, LoraFactors, build_adapter_set, load_adapter
from hydraopt_mobile.bank import SHARED, task_file
from hydraopt_mobile.bundle import open_bundle, write_bundle
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.merge.add import NOTHING, OWN_B, OWN_PAIR, RESIDENT, AddError, add_tasks, least_squares_A, least_squares_B, module_options, resident_fit
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def dense_sq(target: LoraFactors, A: torch.Tensor, B: torch.Tensor) -> float:
    return float(((target.dense().double() - B.double() @ A.double()) ** 2).sum())


@pytest.mark.parametrize("r_s", [2, 5, 9])  # fewer, equal-ish and more components than the target
def test_closed_forms_equal_dense_least_squares(r_s):
    target = LoraFactors(rand(4, 40), rand(24, 4))
    dW = target.dense().double()
    A_s, B_s = rand(r_s, 40), rand(24, r_s)
    X_ref = torch.linalg.lstsq(A_s.double().T, dW.T).solution.T  # argmin ||dW - X A_s||
    Y_ref = torch.linalg.lstsq(B_s.double(), dW).solution  # argmin ||dW - B_s Y||
    X, Y = least_squares_B(target, A_s), least_squares_A(target, B_s)
    assert torch.allclose(X.double() @ A_s.double(), X_ref @ A_s.double(), atol=1e-4 * dW.abs().max())
    assert torch.allclose(B_s.double() @ Y.double(), B_s.double() @ Y_ref, atol=1e-4 * dW.abs().max())
    # optimal: every perturbation makes it worse, and the residual is orthogonal to the fixed factor
    assert dense_sq(target, A_s, X) <= dense_sq(target, A_s, X + 1e-3 * rand(*X.shape)) + 1e-9
    assert float(((dW - X.double() @ A_s.double()) @ A_s.double().T).abs().max()) < 1e-3 * float(dW.abs().max())


def test_rank_deficient_shared_factor_uses_the_pseudo_inverse():
    target = LoraFactors(rand(3, 30), rand(20, 3))
    A_s = rand(2, 30)
    A_s = torch.cat([A_s, A_s[:1] * 2])  # rank 2 stored as 3 rows
    X = least_squares_B(target, A_s)
    X_ref = target.dense().double() @ torch.linalg.pinv(A_s.double())
    assert torch.allclose(X.double() @ A_s.double(), X_ref @ A_s.double(), atol=1e-4)


def planted_bank(fmt="fp16", n_tasks=4, noise=0.02, seed=0, extra=1):
    """A hydraopt bank with one shared A per module over ``n_tasks`` planted tasks, and ``extra``
    more planted tasks from the same distribution (as an AdapterSet) to add."""
    shapes = llama_shapes(2, 64, 32)
    facs = planted_factors(shapes, n_tasks + extra, 4, noise, seed)
    return shapes, facs


def adapter_set(root: Path, facs, names, base="synthetic-base"):
    paths = [write_peft_adapter(root / n, f, 4, 8, base_model=base) for n, f in zip(names, facs)]
    return build_adapter_set([load_adapter(p) for p in paths])


@pytest.fixture(params=["fp16", "int4"])
def shared_a_bundle(tmp_path, request):
    shapes, facs = planted_bank()
    old = adapter_set(tmp_path / "ads", facs[:4], ["kappa", "lima", "mike", "november"])
    fmt = NumberFormat(request.param, 32)
    bank = merge(old, MergeConfig("hydraopt", fmt=fmt, params={"k_a": "1", "k_b": "4"}, budget=Budget(fraction=0.6)))
    out = write_bundle(bank, tmp_path / "bundle")
    return out, facs, old


def opened(bundle, tmp_path, name="oscar"):
    """The bundle's manifest and bank, and the planted task left out of it as ``name``."""
    out, facs, _ = bundle
    manifest, bank = open_bundle(out)
    return manifest, bank, adapter_set(tmp_path / "new", facs[4:], [name])


def test_option_errors_are_exact(shared_a_bundle, tmp_path):
    _, bank, new = opened(shared_a_bundle, tmp_path)
    name = new.module_names[0]
    module, target = bank.modules[name], new.tasks[0].modules[name]
    opts = module_options(module, bank.tasks, target, 1.0, 0)
    kinds = {o.kind for o in opts}
    assert kinds == {NOTHING, OWN_B, OWN_PAIR}  # every B is per task: none resident
    for o in opts:
        A = module.A[o.A].values() if isinstance(o.A, int) else o.A.values()
        B = module.B[o.B].values() if isinstance(o.B, int) else o.B.values()
        assert o.error == pytest.approx(dense_sq(target, A, B), rel=1e-3, abs=1e-5 * opts[0].error)  # fp32 noise of ||dW||^2
    own_b = next(o for o in opts if o.kind == OWN_B)
    A_s = module.A[own_b.A].values()
    X = target.dense().double() @ torch.linalg.pinv(A_s.double())  # the dense closed form, then stored as the bank stores B
    stored = StoredFactor.encode(X.float(), module.fmt, transposed=True).values()
    assert own_b.error == pytest.approx(dense_sq(target, A_s, stored), rel=1e-3)
    # planted: the new task's A is the shared A plus 2 % noise, so the fixed A fits it well (int4 adds ~2 %)
    assert own_b.error < 0.05 * opts[0].error


@pytest.mark.parametrize("name", ["alpha", "zulu"])  # sorts before / after every existing task
def test_add_keeps_existing_files_byte_identical(shared_a_bundle, tmp_path, name):
    out, _, old = shared_a_bundle
    manifest, bank, new = opened(shared_a_bundle, tmp_path, name)
    fp16 = new.reference_file_bytes()
    grown, report = add_tasks(bank, new, allowance_bytes=fp16 * 3 // 4)
    out2 = write_bundle(grown, tmp_path / "bundle2", unchanged=manifest["files"])
    manifest2, bank2 = open_bundle(out2)
    assert manifest2["tasks"][0 if name == "alpha" else -1] == name
    for rel, info in manifest["files"].items():
        assert (out2 / rel).read_bytes() == (out / rel).read_bytes()
        assert manifest2["files"][rel] == info
    assert set(manifest2["files"]) - set(manifest["files"]) == {task_file(name)}
    (row,) = report
    assert row.file_bytes == (out2 / task_file(name)).stat().st_size <= fp16 * 3 // 4
    assert row.choices.get(OWN_B, 0) > 0
    # the reported error is the error of what was written, and existing tasks are served as before
    everything = build_adapter_set(sorted(old.tasks + new.tasks, key=lambda t: t.name))  # the bundle's task order
    assert bank2.relative_errors(everything)[name] == pytest.approx(row.rel_error, rel=1e-3)
    assert manifest2["rel_errors"][name] == pytest.approx(row.rel_error)
    for task in bank.tasks:
        for mod, f in bank.task_factors(task).items():
            g2 = bank2.task_factors(task)[mod]
            assert torch.equal(f.A, g2.A) and torch.equal(f.B, g2.B)
    assert row.rel_error < 1.5 * max(bank.rel_errors.values()), (row, bank.rel_errors)  # fits about as well as the merged tasks


def test_report_says_how_well_the_shared_factors_fit(shared_a_bundle, tmp_path):
    """Planted: the new task's A is the shared A plus noise, so a resident A with an own B fits it
    far better than own factors of the same bytes; a task from elsewhere is fitted badly by it."""
    manifest, bank, new = opened(shared_a_bundle, tmp_path)
    _, (row,) = add_tasks(bank, new, allowance_bytes=new.reference_file_bytes())
    assert row.resident_modules == len(bank.modules)
    assert row.resident_rel_error < 0.5 * row.own_rel_error_same_bytes <= 0.5  # int4 itself adds ~10 %
    # the summary is the per-module options' errors, summed
    options = [module_options(m, bank.tasks, new.tasks[0].modules[n], 1.0, i) for i, (n, m) in enumerate(bank.modules.items())]
    best = sum(min(o.error for o in opts if o.kind == OWN_B) for opts in options)
    assert resident_fit(options)[1] == pytest.approx((best / sum(opts[0].error for opts in options)) ** 0.5)
    stranger = adapter_set(tmp_path / "far", planted_bank(seed=7)[1][:1], ["papa"])
    _, (far,) = add_tasks(bank, stranger, allowance_bytes=stranger.reference_file_bytes())
    assert far.resident_rel_error > 0.9  # another task's subspace: the shared A explains little of it
    unshared = merge(new, MergeConfig("none"))
    assert resident_fit([module_options(m, unshared.tasks, new.tasks[0].modules[n], 1.0, i) for i, (n, m) in enumerate(unshared.modules.items())]) == (0, None, None)


def test_a_padded_signature_lets_own_factors_use_its_ranks(tmp_path):
    """A bank at rank 2 deployed in a program with rank-4 slots (export --slots): the new task's own
    factors may use rank 4 and fit better; a signature that cannot hold the bank is refused."""
    shapes, facs = planted_bank(noise=0.5)
    old = adapter_set(tmp_path / "ads", facs[:4], ["kappa", "lima", "mike", "november"])
    bank = merge(old, MergeConfig("hydraopt", fmt=NumberFormat("fp16"), params={"k_a": "4", "k_b": "4", "rank": "2"}, budget=Budget(fraction=1.0)))
    new = adapter_set(tmp_path / "new", facs[4:], ["oscar"])
    allowance = new.reference_file_bytes()
    _, (own,) = add_tasks(bank, new, allowance)
    wide = {name: 4 for name in bank.modules}
    grown, (padded,) = add_tasks(bank, new, allowance, max_ranks=wide)
    assert max(f.A.shape[0] for f in grown.task_factors("oscar").values()) == 4
    assert padded.rel_error < 0.5 * own.rel_error
    # the report says what the bank's slots cost: the same allocation with room is the padded one
    assert own.rel_error_with_room == pytest.approx(padded.rel_error) and own.rank_with_room == 4
    assert padded.rel_error_with_room is None and padded.rank_with_room is None
    first = next(iter(bank.modules))
    with pytest.raises(AddError, match=f"{first!r} has no slot"):
        add_tasks(bank, new, allowance, max_ranks={k: v for k, v in wide.items() if k != first})
    with pytest.raises(AddError, match=f"{first!r} has rank 2, above the signature's 1"):
        add_tasks(bank, new, allowance, max_ranks=wide | {first: 1})
    # a module no task uses has no slot in an exported program: the new task stores nothing there
    from dataclasses import replace

    from hydraopt_mobile.bank import MergedModule
    from hydraopt_mobile.merge.add import _empty

    m = bank.modules[first]
    unused = MergedModule(m.shape, [0] * 4, [0] * 4, [_empty(m.fmt, (0, m.shape[1]), False)], [_empty(m.fmt, (m.shape[0], 0), True)])
    sparse = replace(bank, modules=bank.modules | {first: unused})
    grown, (row,) = add_tasks(sparse, new, allowance, max_ranks={k: v for k, v in wide.items() if k != first})
    assert grown.task_factors("oscar")[first].A.shape[0] == 0 and row.choices[NOTHING] == 1


def test_zero_allowance_uses_resident_factors_only(shared_a_bundle, tmp_path):
    manifest, bank, new = opened(shared_a_bundle, tmp_path)
    grown, (row,) = add_tasks(bank, new, allowance_bytes=0)
    assert row.file_bytes == 0 and set(row.choices) <= {NOTHING, RESIDENT}
    out2 = write_bundle(grown, tmp_path / "b2", unchanged=manifest["files"])
    assert task_file("oscar") not in open_bundle(out2)[0]["files"]
    assert 0 < row.rel_error <= 1.0


def test_unchanged_files_are_asserted_before_anything_is_written(shared_a_bundle, tmp_path):
    out, _, _ = shared_a_bundle
    manifest, bank = open_bundle(out)
    wrong = {SHARED: dict(manifest["files"][SHARED], sha256="0" * 64)}
    with pytest.raises(AssertionError, match="byte-identical"):
        write_bundle(bank, tmp_path / "b2", unchanged=wrong)
    assert not (tmp_path / "b2").exists()


def test_refused_cases_name_the_culprit(shared_a_bundle, tmp_path):
    out, facs, _ = shared_a_bundle
    _, bank = open_bundle(out)
    with pytest.raises(AddError, match="'lima' is already in the bundle"):
        add_tasks(bank, adapter_set(tmp_path / "a", facs[4:], ["lima"]), 10**6)
    with pytest.raises(AddError, match="differ only in case"):
        add_tasks(bank, adapter_set(tmp_path / "b", facs[4:], ["Lima"]), 10**6)
    with pytest.raises(AddError, match="base model 'other-base'"):
        add_tasks(bank, adapter_set(tmp_path / "c", facs[4:], ["oscar"], base="other-base"), 10**6)
    stranger = dict(facs[4]) | {"model.layers.9.self_attn.q_proj": facs[4]["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(AddError, match=r"module 'model\.layers\.9\.self_attn\.q_proj' is not in the bundle"):
        add_tasks(bank, adapter_set(tmp_path / "d", [stranger], ["oscar"]), 10**6)
    wide = {k: (torch.cat([A, A], dim=1), B) for k, (A, B) in facs[4].items()}
    with pytest.raises(AddError, match=r"shape .* another base model"):
        add_tasks(bank, adapter_set(tmp_path / "e", [wide], ["oscar"]), 10**6)
    partial = {k: v for k, v in list(facs[4].items())[1:]}
    with pytest.raises(AdapterError, match="--allow-missing"):
        add_tasks(bank, adapter_set(tmp_path / "f", [partial], ["oscar"]), 10**6)
    grown, (row,) = add_tasks(bank, adapter_set(tmp_path / "g", [partial], ["oscar"]), 10**6, allow_missing=True)
    assert row.choices[NOTHING] >= 1


def test_cli_add_end_to_end(make_adapters, tmp_path):
    from typer.testing import CliRunner

    from hydraopt_mobile.app.cli import app, console

    console.width = 250
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.output

    paths = make_adapters(n_tasks=4)
    bank = tmp_path / "bank"
    code, text = run("merge", *paths[1:], "--format", "int8", "--param", "k_a=1", "--budget", "0.5", "--out", bank)
    assert code == 0, text
    before = {p.relative_to(bank).as_posix(): p.read_bytes() for p in bank.rglob("*.safetensors")}
    out = tmp_path / "bank2"
    code, text = run("add", bank, f"aaa={paths[0]}", "--out", out, "--json")
    assert code == 0, text
    (row,) = json.loads(text)["added"]
    assert row["task"] == "aaa" and 0 <= row["rel_error"] < 0.2 and row["file_bytes"] == (out / "tasks" / "aaa.safetensors").stat().st_size
    for rel, data in before.items():
        assert (out / rel).read_bytes() == data, rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"][0] == "aaa" and manifest["rel_errors"]["aaa"] == pytest.approx(row["rel_error"])
    code, text = run("inspect", out)
    assert code == 0 and "aaa" in text
    assert row["resident_modules"] > 0 and row["resident_rel_error"] is not None  # k_a=1: every A is shared
    code, text = run("add", bank, f"ccc={paths[0]}", "--out", tmp_path / "bank3")  # the table a person reads
    assert code == 0 and f"{row['resident_rel_error']:.3f} vs own {row['own_rel_error_same_bytes']:.3f}" in text, text
    code, text = run("add", bank, f"ddd={paths[0]}", "--out", tmp_path / "bank4", "--slots", "q_proj,k_proj,v_proj,o_proj:8")  # a padded program
    assert code == 0 and "cap the new tasks" not in text, text
    # a bank at rank 2: the new rank-4 task is capped by the bank's slots, and the table says what room would give
    small = tmp_path / "small"
    code, text = run("merge", *paths[1:], "--format", "fp16", "--param", "rank=2", "--param", "k_a=3", "--param", "k_b=3", "--budget", "1.0", "--out", small)
    assert code == 0, text
    code, text = run("add", small, f"fff={paths[0]}", "--out", tmp_path / "small2", "--allowance", "1.0", "--json")
    (capped,) = json.loads(text)["added"]
    assert capped["rank_with_room"] == 4 and capped["rel_error_with_room"] < 0.5 * capped["rel_error"], capped
    code, text = run("add", small, f"fff={paths[0]}", "--out", tmp_path / "small3", "--allowance", "1.0")
    flat = " ".join(text.split())  # the hint wraps at the console's width
    assert code == 0 and "`--slots k_proj,o_proj,q_proj,v_proj:4`" in flat and f"fff {capped['rel_error_with_room']:.4f} (now {capped['rel_error']:.4f})" in flat, text
    code, text = run("add", bank, f"eee={paths[0]}", "--out", tmp_path / "bank5", "--slots", "gate_proj:8")
    assert code == 2 and "no module of the bundle is named 'gate_proj'" in text, text
    code, text = run("add", bank, f"eee={paths[0]}", "--out", tmp_path / "bank5", "--slots", "q_proj:8")
    assert code == 2 and "k_proj' has no slot in the signature" in text and not (tmp_path / "bank5").exists(), text
    # refused: a task already there, an existing output, a bad allowance, another base model
    code, text = run("add", bank, paths[1], "--out", tmp_path / "x")
    assert code == 2 and "'task1' is already in the bundle" in text
    code, text = run("add", bank, f"aaa={paths[0]}", "--out", out)
    assert code == 2 and "--overwrite" in text
    code, text = run("add", bank, f"aaa={paths[0]}", "--out", tmp_path / "y", "--allowance", "2.5")
    assert code == 2 and "--allowance '2.5'" in text
    other = make_adapters(n_tasks=1, root=tmp_path / "other", base_model="another-model")[0]
    code, text = run("add", bank, f"bbb={other}", "--out", tmp_path / "z")
    assert code == 2 and "another-model" in text
    assert not any((tmp_path / n).exists() for n in "xyz")
    # no bytes: every B is per task, so nothing resident serves the new task; the table says so
    code, text = run("add", bank, f"aaa={paths[0]}", "--out", out, "--overwrite", "--allowance", "0B")
    assert code == 0 and "│ aaa  │ 1.0000     │ 0          │ nothing: 8" in text, text
