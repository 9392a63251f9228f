"""Reading PEFT adapters: scales, key forms, and a clear error for every bad input."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraopt_mobile.adapters import AdapterError, build_adapter_set, load_adapter, load_adapter_folders, load_adapter_set


def _rewrite_config(path: Path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(path: Path, fn):
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    save_file(fn(tensors), str(f))


def test_scale_folded_and_patterns(make_adapters):
    (p,) = make_adapters(n_tasks=1, rank=4)
    raw = load_file(str(p / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a = load_adapter(p)
    f = a.modules["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(f.B, raw[f"{key}.lora_B.weight"].float() * 2.0)  # alpha 8 / r 4
    _rewrite_config(p, use_rslora=True)
    assert torch.allclose(load_adapter(p).modules["model.layers.0.self_attn.q_proj"].B, raw[f"{key}.lora_B.weight"].float() * 4.0)
    _rewrite_config(p, use_rslora=False, alpha_pattern={"q_proj": 4})
    a = load_adapter(p)
    assert torch.allclose(a.modules["model.layers.0.self_attn.q_proj"].B, raw[f"{key}.lora_B.weight"].float() * 1.0)
    assert torch.allclose(a.modules["model.layers.0.self_attn.k_proj"].B, raw[key.replace("q_proj", "k_proj") + ".lora_B.weight"].float() * 2.0)


def test_adapter_name_in_keys_and_rank_pattern(make_adapters):
    (p,) = make_adapters(n_tasks=1, rank=4)

    def rename(t):
        return {k.replace(".weight", ".default.weight"): v for k, v in t.items()}

    _rewrite_tensors(p, rename)
    assert len(load_adapter(p).modules) == 8
    _rewrite_config(p, rank_pattern={"q_proj": 2})
    with pytest.raises(AdapterError, match=r"q_proj'.*rank 4 but the config says 2"):
        load_adapter(p)


def test_fan_in_fan_out_transposes(make_adapters):
    (p,) = make_adapters(n_tasks=1, rank=4)
    before = load_adapter(p).modules["model.layers.0.self_attn.k_proj"].dense()
    _rewrite_tensors(p, lambda t: {k.replace("lora_A", "X").replace("lora_B", "lora_A").replace("X", "lora_B"): v.T.contiguous() for k, v in t.items()})
    _rewrite_config(p, fan_in_fan_out=True)
    after = load_adapter(p).modules["model.layers.0.self_attn.k_proj"].dense()
    assert torch.allclose(before, after)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"use_dora": True}, "use_dora=true"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
    ],
)
def test_unsupported_configs_named(make_adapters, change, match):
    (p,) = make_adapters(n_tasks=1)
    _rewrite_config(p, **change)
    with pytest.raises(AdapterError, match=match) as e:
        load_adapter(p)
    assert "adapter_config.json" in str(e.value)


def test_finite_check_by_sum_agrees_with_isfinite():
    """adapters._all_finite: a finite sum settles it; an overflowing sum of finite values does not
    make it refuse them; any NaN or infinity (of either sign, or both) is caught."""
    from hydraopt_mobile.adapters import _all_finite

    big = torch.full((4, 8), 3e38)  # finite, but the sum overflows to inf
    assert _all_finite(torch.randn(16, 300)) and _all_finite(big) and _all_finite(torch.zeros(0, 5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(16, 300)
        x[3, 7] = bad
        assert not _all_finite(x)
    both = torch.randn(5, 5)
    both[0, 0], both[1, 1] = float("inf"), float("-inf")
    assert not _all_finite(both) and not _all_finite(big.neg().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(float("nan"))))


def test_bad_tensors_named(make_adapters):
    paths = make_adapters(n_tasks=3)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def nan(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
        return t

    _rewrite_tensors(paths[0], nan)
    with pytest.raises(AdapterError, match=rf"adapter_model.safetensors: tensor '{key}' contains NaN"):
        load_adapter(paths[0])

    def bias(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        return t

    _rewrite_tensors(paths[1], bias)
    with pytest.raises(AdapterError, match="q_proj.bias' is a bias weight"):
        load_adapter(paths[1])

    def inf_dora(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
        return t

    _rewrite_tensors(paths[2], inf_dora)
    with pytest.raises(AdapterError, match="lora_magnitude_vector' is a non-LoRA weight"):
        load_adapter(paths[2])


def test_corrupt_and_truncated_safetensors(make_adapters):
    a, b = make_adapters(n_tasks=2)
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AdapterError, match=f"{f}: corrupt or truncated"):
        load_adapter(a)
    g = b / "adapter_model.safetensors"
    g.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(b)


def test_bin_read_weights_only_and_pickles_refused(make_adapters, tmp_path):
    (p,) = make_adapters(n_tasks=1)
    tensors = load_file(str(p / "adapter_model.safetensors"))
    os.remove(p / "adapter_model.safetensors")
    torch.save(tensors, p / "adapter_model.bin")
    assert len(load_adapter(p).modules) == 8

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    (p / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(AdapterError, match="weights_only=True"):
        load_adapter(p)
    assert not (tmp_path / "pwned").exists()


def test_set_level_errors(make_adapters, tmp_path):
    a, b = make_adapters(n_tasks=2)
    with pytest.raises(AdapterError, match="duplicate task name 'x'"):
        load_adapter_set([f"x={a}", f"x={b}"])
    other = make_adapters(n_tasks=1, hidden=32, kv=16, root=tmp_path / "small")[0]
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.(k|o|q|v)_proj': shape"):
        load_adapter_set([str(a), f"small={other}"])
    _rewrite_config(b, base_model_name_or_path="another/model")
    with pytest.raises(AdapterError, match="different base models"):
        load_adapter_set([str(a), str(b)])


@pytest.mark.parametrize("given, kept", [("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                          ("/home/me/models/SmolLM2-135M/", "SmolLM2-135M"), ("~/models/x", "x"), ("./x", "x"),
                                          ("C:\\Users\\me\\llama", "llama"), (None, None)])
def test_a_local_base_model_folder_is_kept_by_its_name_only(make_adapters, given, kept):
    """PEFT writes the folder a base model was loaded from; bundles and exports record what the
    adapter set says, so the machine's folders stay out of them. Two adapters from one folder still agree."""
    a, b = make_adapters(n_tasks=2)
    for folder in (a, b):
        _rewrite_config(folder, base_model_name_or_path=given)
    assert load_adapter_set([str(a), str(b)]).base_model == kept


@pytest.mark.parametrize("lazy", [False, True])
def test_missing_modules_error_or_zero(make_adapters, lazy):
    a, b = make_adapters(n_tasks=2)
    _rewrite_tensors(b, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.o_proj" not in k})
    with pytest.raises(AdapterError, match=r"task 'task1' lacks modules \['model.layers.1.self_attn.o_proj'\].*--allow-missing"):
        load_adapter_set([str(a), str(b)], lazy=lazy)
    s = load_adapter_set([str(a), str(b)], allow_missing=True, lazy=lazy)
    assert s.factors("model.layers.1.self_attn.o_proj")[1].rank == 0
    assert s.factors("model.layers.1.self_attn.o_proj")[0].rank > 0


def test_missing_files_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_adapter(tmp_path / "empty")
    with pytest.raises(AdapterError, match="not a folder"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError, match="no adapters given"):
        build_adapter_set([])


def test_adapter_folders_loads_each_peft_subfolder_by_name(make_adapters, tmp_path):
    """A trained suite's layout (<init>/<task>/): every sub-folder holding an adapter config, named
    after it, in name order; other entries are passed over; none at all is an error naming the folder."""
    paths = make_adapters(n_tasks=3)
    root = paths[0].parent
    (root / "README.md").write_text("not an adapter")
    (root / "notes").mkdir()
    got = load_adapter_folders(root)
    want = load_adapter_set([f"{p.name}={p}" for p in sorted(paths)])
    assert got.task_names == want.task_names == ["task0", "task1", "task2"]
    for a, b in zip(got.tasks, want.tasks):
        assert a.path == b.path and all(torch.equal(a.modules[m].B, b.modules[m].B) for m in b.modules)
    with pytest.raises(AdapterError, match=f"{tmp_path / 'empty'}: no adapter folders"):
        (tmp_path / "empty").mkdir()
        load_adapter_folders(tmp_path / "empty")
