"""The demo's task adapters: the committed ones when they were trained with exactly the requested
:class:`TrainConfig`, otherwise ones trained into a cache folder keyed by the settings' hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rich.console import Console

from hydraopt_mobile.suite.train_config import TrainConfig

from .progress import progress_bar

COMMITTED = Path(__file__).resolve().parents[1] / "suite" / "adapters"


def training_settings(config: TrainConfig, tasks: list[str]) -> dict[str, dict]:
    """Per task, the settings training with ``config`` records (and a reused adapter must match)."""
    from hydraopt_mobile.suite.tasks import load_suite

    return {task.name: config.settings(task) for task in load_suite(tasks)}


def _matches(folder: Path, settings: dict) -> bool:
    meta = folder / "training.json"
    if not (folder / "adapter_model.safetensors").is_file() or not meta.is_file():
        return False
    recorded = json.loads(meta.read_text())
    return all(recorded.get(k) == v for k, v in settings.items())


def ensure_adapters(config: TrainConfig, tasks: list[str], console: Console, cache: Path | None = None) -> dict[str, Path]:
    """Task -> adapter folder: the committed set of ``config.init`` when every adapter matches;
    otherwise a cache folder under ``cache`` (default the model cache) keyed by the settings'
    hash, training there only the adapters that are missing."""
    from hydraopt_mobile.suite.model import cache_root
    from hydraopt_mobile.suite.train import train_suite

    settings = training_settings(config, tasks)
    committed = {t: COMMITTED / config.init / t for t in tasks}
    if all(_matches(p, settings[t]) for t, p in committed.items()):
        console.print(f"adapters: committed {config.init} set ({len(tasks)} tasks) in {COMMITTED / config.init}")
        return committed
    key = hashlib.sha256(json.dumps([config.init, settings], sort_keys=True).encode()).hexdigest()[:12]
    cached = (cache or cache_root() / "adapters") / f"{config.init}-{key}"
    paths = {t: cached / t for t in tasks}
    missing = [t for t, p in paths.items() if not _matches(p, settings[t])]
    if not missing:
        console.print(f"adapters: cached set {cached}")
        return paths
    console.print(f"adapters: settings differ from the committed ones; training into {cached} (about 3 min per task)")
    with progress_bar(f"train {len(missing)} adapters: steps", console) as on_step:
        train_suite(cached, config, missing, on_step=on_step)
    return paths
