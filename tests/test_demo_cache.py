"""The demo reuses adapters only when they were made with the requested settings (real training)."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from hydraopt_mobile.app.demo_adapters import COMMITTED, ensure_adapters, training_settings
from hydraopt_mobile.suite.train_config import TrainConfig
from tiny_models import make_bank, make_tiny_model

pytestmark = pytest.mark.slow


def test_default_config_reuses_the_committed_adapters(tmp_path: Path):
    """The default TrainConfig is what made the committed (shared-seed) adapters: nothing is trained or cached."""
    tasks = ["country-de", "topic-en"]
    folders = ensure_adapters(TrainConfig(), tasks, Console(quiet=True), cache=tmp_path)
    assert folders == {t: COMMITTED / "shared-seed" / t for t in tasks} and not any(tmp_path.iterdir())


def test_independent_seeds_give_each_task_its_own_seed():
    shared = training_settings(TrainConfig(), ["country-de", "topic-en"])
    independent = training_settings(TrainConfig(init="independent-seeds"), ["country-de", "topic-en"])
    assert shared["country-de"]["seed"] == shared["topic-en"]["seed"]
    assert len({independent[t]["seed"] for t in independent} | {shared["country-de"]["seed"]}) == 3


def test_changed_setting_retrains_and_same_setting_reuses(tmp_path: Path):
    console = Console(quiet=True)
    cfg = TrainConfig(steps=2)
    first = ensure_adapters(cfg, ["country-de"], console, cache=tmp_path)["country-de"]
    assert first.is_relative_to(tmp_path) and not first.is_relative_to(COMMITTED)
    weights = first / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = ensure_adapters(cfg, ["country-de"], console, cache=tmp_path)["country-de"]
    assert again == first and weights.stat().st_mtime_ns == stamp  # reused, not retrained
    changed = ensure_adapters(TrainConfig(steps=2, lr=1e-3), ["country-de"], console, cache=tmp_path)["country-de"]
    assert changed != first and (changed / "adapter_model.safetensors").is_file()


def test_export_is_cached_by_bank_and_linked_into_the_output(tmp_path: Path, monkeypatch):
    from hydraopt_mobile.app.export_cache import cached_export, link_tree

    monkeypatch.setenv("HYDRAOPT_CACHE", str(tmp_path / "cache"))
    console = Console(quiet=True)
    model_dir = make_tiny_model(tmp_path / "model")
    first = cached_export(make_bank(1), model_dir, "onnx", "fp32", console)
    assert first.is_relative_to(tmp_path / "cache") and (first / "manifest.json").is_file()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert cached_export(make_bank(1), model_dir, "onnx", "fp32", console) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # reused, not exported again
    assert cached_export(make_bank(2), model_dir, "onnx", "fp32", console) != first  # other factors: new export
    manifest = json.loads((first / "manifest.json").read_text())
    (first / "manifest.json").write_text(json.dumps({**manifest, "schema": "hydraopt-export/1"}))  # an older exporter's
    assert cached_export(make_bank(1), model_dir, "onnx", "fp32", console) == first
    assert json.loads((first / "manifest.json").read_text())["schema"] == manifest["schema"]  # made again, not reused
    link_tree(first, tmp_path / "out" / "export")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path / "out" / "export") for p in (tmp_path / "out" / "export").rglob("*") if p.is_file())
    assert all((tmp_path / "out" / "export" / f).samefile(first / f) for f in files)
