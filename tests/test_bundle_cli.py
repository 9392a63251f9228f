"""Bundles on disk and the CLI contract: inspect bytes, unpack -> PEFT, checksums, no partial output."""

import json
from pathlib import Path

import torch
from peft import PeftModel
from typer.testing import CliRunner

from hydraopt_mobile.bundle import BundleError, load_bundle
from hydraopt_mobile.app.cli import app, console

from tiny_models import tiny_llama, tiny_peft_adapter

runner = CliRunner()
console.width = 250  # tables are not cut to the 80 columns of a non-terminal


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_merge_inspect_bytes_equal_files(make_adapters, tmp_path):
    paths = make_adapters(n_tasks=4)
    out = tmp_path / "bundle"
    code, text = run("merge", *paths, "--budget", "0.4", "--out", out)
    assert code == 0, text
    code, text = run("inspect", out, "--json")
    info = json.loads(text)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert info["bytes"]["shared"] == files["shared.safetensors"]
    assert info["bytes"]["per_task"] == {t: files[f"tasks/{t}.safetensors"] for t in info["tasks"]}
    tensor_files = sum(size for rel, size in files.items() if rel != "manifest.json")
    assert info["file_bytes"] == tensor_files
    assert info["storage_fraction"] == tensor_files / info["reference_file_bytes"] <= 0.4
    assert set(info["rel_errors"]) == {"task0", "task1", "task2", "task3"}
    assert all(0 <= e < 1 for e in info["rel_errors"].values())


def test_existing_output_refused_and_overwrite(make_adapters, tmp_path):
    paths = make_adapters(n_tasks=2)
    out = tmp_path / "b"
    assert run("merge", *paths, "--method", "ties", "--out", out)[0] == 0
    before = (out / "manifest.json").read_text()
    code, text = run("merge", *paths, "--method", "svd", "--out", out)
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert (out / "manifest.json").read_text() == before
    assert run("merge", *paths, "--method", "svd", "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["method"] == "svd"
    assert leftovers(tmp_path) == []


def test_bad_input_leaves_no_partial_output(make_adapters, tmp_path):
    a, b = make_adapters(n_tasks=2)
    (b / "adapter_model.safetensors").write_bytes(b"garbage")
    out = tmp_path / "b"
    code, text = run("merge", a, b, "--out", out)
    assert code == 2 and "adapter_model.safetensors: corrupt or truncated" in " ".join(text.split())
    assert not out.exists() and leftovers(tmp_path) == []
    code, text = run("merge", a, a, "--out", out)
    assert code == 2 and "duplicate task name" in text
    code, text = run("merge", a, "--method", "nope", "--out", out)
    assert code == 2 and "--method 'nope'" in text
    code, text = run("merge", a, "--method", "ties", "--budget", "0.5", "--out", out)
    assert code == 2 and "--budget applies to budgeted methods" in " ".join(text.split())
    code, text = run("merge", a, "--budget", "0.0001", "--out", out)
    assert code == 2 and "smallest feasible budget" in " ".join(text.split())
    assert not out.exists() and leftovers(tmp_path) == []


def test_tampered_bundle_refused(make_adapters, tmp_path):
    out = tmp_path / "b"
    assert run("merge", *make_adapters(n_tasks=3), "--out", out)[0] == 0
    f = out / "tasks" / "task1.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    try:
        load_bundle(out)
        raise AssertionError("tampered bundle loaded")
    except BundleError as e:
        assert "task1.safetensors: checksum mismatch" in str(e)
    code, text = run("unpack", out, "--task", "task0", "--out", tmp_path / "u")
    assert code == 2 and "checksum mismatch" in text and not (tmp_path / "u").exists()


def test_methods_lists_registry():
    code, text = run("methods")
    assert code == 0
    for name in ("hydraopt", "task-arithmetic", "ties", "dare-linear", "dare-ties", "svd", "knots", "cat", "none"):
        assert name in text


def test_analyze_writes_json_and_heatmaps(make_adapters, tmp_path):
    code, text = run("analyze", *make_adapters(n_tasks=3, noise=0.05), "--out", tmp_path / "an")
    assert code == 0, text
    sim = json.loads((tmp_path / "an" / "similarity.json").read_text())
    s = sim["summary"]["q_proj"]
    assert s["cos_A"] > 0.95 and s["subspace_A"] > 0.95  # planted shared A
    assert abs(s["cos_B"]) < 0.3  # independent B's
    assert sorted(p.name for p in (tmp_path / "an").glob("*.png")) == [f"similarity_{m}.png" for m in ("k_proj", "o_proj", "q_proj", "v_proj")]


def test_unpack_loads_in_peft_and_equals_bundle(tmp_path):
    paths = [tiny_peft_adapter(tmp_path / f"t{i}", seed=i, layers=2) for i in range(3)]
    out = tmp_path / "bundle"
    code, text = run("merge", *paths, "--budget", "0.5", "--format", "int8", "--out", out)
    assert code == 0, text
    assert run("unpack", out, "--task", "t2", "--out", tmp_path / "u2")[0] == 0
    ids = torch.randint(0, 128, (2, 12))
    model = PeftModel.from_pretrained(tiny_llama(layers=2), str(tmp_path / "u2")).eval()
    with torch.no_grad():
        got = model(ids).logits
    reference = tiny_llama(layers=2)
    with torch.no_grad():
        for name, f in load_bundle(out).task_factors("t2").items():
            reference.get_submodule(name).weight += f.B @ f.A
        want = reference(ids).logits
        base = tiny_llama(layers=2)(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter does something
    code, text = run("unpack", out, "--task", "nope", "--out", tmp_path / "u3")
    assert code == 2 and "task 'nope' is not in this bank" in text


def test_merge_streams_and_writes_what_the_in_memory_merge_writes(make_adapters, tmp_path):
    """`hydraopt merge` reads each module when the merge reaches it and writes a budgeted bank as it
    is built (registry.merge_to_bundle); the bundle is byte for byte the in-memory merge's, for a
    budgeted method and a baseline alike."""
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter
    from hydraopt_mobile.bundle import write_bundle
    from hydraopt_mobile.merge.budget import Budget
    from hydraopt_mobile.merge.registry import MergeConfig, merge

    paths = make_adapters(n_tasks=3)
    eager = build_adapter_set([load_adapter(p) for p in reversed(paths)])  # tasks given out of order
    for method, args, config in (("hydraopt", ["--budget", "0.3"], MergeConfig("hydraopt", budget=Budget(fraction=0.3))),
                                 ("ties", [], MergeConfig("ties"))):
        cli, memory = tmp_path / f"cli-{method}", tmp_path / f"memory-{method}"
        code, text = run("merge", *reversed(paths), "--method", method, *args, "--out", cli)
        assert code == 0, text
        write_bundle(merge(eager, config), memory)
        files = sorted(p.relative_to(memory) for p in memory.rglob("*") if p.is_file())
        assert len(files) >= 2 and files == sorted(p.relative_to(cli) for p in cli.rglob("*") if p.is_file())
        for rel in files:
            assert (cli / rel).read_bytes() == (memory / rel).read_bytes(), (method, rel)


def test_merge_names_a_bad_value_met_mid_merge_and_leaves_nothing(make_adapters, tmp_path):
    """Values are checked as modules are read: a NaN deep in one adapter stops the merge with its
    file and tensor named, and no output or temporary folder is left."""
    from safetensors.torch import load_file, save_file

    a, b = make_adapters(n_tasks=2)
    st = b / "adapter_model.safetensors"
    tensors = load_file(str(st))
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(st))
    out = tmp_path / "b"
    code, text = run("merge", a, b, "--budget", "0.5", "--out", out)
    assert code == 2 and f"tensor {key!r} contains NaN" in " ".join(text.split()), text
    assert not out.exists() and leftovers(tmp_path) == []
