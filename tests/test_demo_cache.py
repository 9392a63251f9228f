"""The demo reuses adapters only when they were made with the requested settings (real training)."""

from pathlib import Path

import pytest
from rich.console import Console

from hydraopt_mobile.demo import COMMITTED, DemoConfig, ensure_adapters, training_settings

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
