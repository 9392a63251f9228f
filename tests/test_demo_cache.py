"""The demo reuses adapters only when they were made with the requested settings (real training)."""

from pathlib import Path

import pytest
from rich.console import Console

from hydraopt_mobile.app.demo import COMMITTED, DemoConfig, ensure_adapters, training_settings

pytestmark = pytest.mark.slow


def test_committed_settings_are_recorded():
    settings = training_settings("shared-seed", ["country-de"], {})
    assert settings["country-de"]["rank"] == 8 and settings["country-de"]["target_modules"] == ["q_proj", "v_proj"]
    assert training_settings("independent-seeds", ["country-de"], {})["country-de"]["seed"] != settings["country-de"]["seed"]


def test_changed_setting_retrains_and_same_setting_reuses(tmp_path: Path):
    console = Console(quiet=True)
    cfg = DemoConfig(tasks=("country-de",), train_overrides={"steps": 2})
    first = ensure_adapters(cfg, console, cache=tmp_path)["country-de"]
    assert first.is_relative_to(tmp_path) and not first.is_relative_to(COMMITTED)
    weights = first / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = ensure_adapters(cfg, console, cache=tmp_path)["country-de"]
    assert again == first and weights.stat().st_mtime_ns == stamp  # reused, not retrained
    changed = ensure_adapters(DemoConfig(tasks=("country-de",), train_overrides={"steps": 2, "lr": 1e-3}), console, cache=tmp_path)["country-de"]
    assert changed != first and (changed / "adapter_model.safetensors").is_file()


def test_export_is_cached_by_bank_and_linked_into_the_output(tmp_path: Path, monkeypatch):
    from hydraopt_mobile.app.demo import _cached_export, _link_tree
    from test_export_runtimes import make_bank, make_tiny_model

    monkeypatch.setenv("HYDRAOPT_CACHE", str(tmp_path / "cache"))
    console = Console(quiet=True)
    model_dir = make_tiny_model(tmp_path / "model")
    first = _cached_export(make_bank(1), model_dir, "onnx", "fp32", console)
    assert first.is_relative_to(tmp_path / "cache") and (first / "manifest.json").is_file()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert _cached_export(make_bank(1), model_dir, "onnx", "fp32", console) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # reused, not exported again
    assert _cached_export(make_bank(2), model_dir, "onnx", "fp32", console) != first  # other factors: new export
    _link_tree(first, tmp_path / "out" / "export")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "out" / "export") for p in (tmp_path / "out" / "export").rglob("*") if p.is_file())
    assert all((tmp_path / "out" / "export" / f).samefile(first / f) for f in files)
