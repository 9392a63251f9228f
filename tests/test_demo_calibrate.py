"""``hydraopt demo --calibrate``: HydraOpt and per-task compression under the data-aware objective,
calibrated on the suite's train split through the real base model."""

from rich.console import Console

from hydraopt_mobile.adapters import build_adapter_set, load_adapter
from hydraopt_mobile.app.demo import DemoConfig, compared_banks, suite_calibration
from hydraopt_mobile.app.demo_adapters import ensure_adapters
from hydraopt_mobile.app.demo_report import REFERENCE
from hydraopt_mobile.suite.model import base_model_dir
from hydraopt_mobile.suite.train_config import TrainConfig


def test_calibrated_demo_banks_use_the_train_split_moments():
    folders = ensure_adapters(TrainConfig(), ["country-de", "topic-en"], Console(quiet=True))
    adapters = build_adapter_set([load_adapter(p, t) for t, p in folders.items()])
    calibration = suite_calibration(adapters, base_model_dir(), per_task=1)
    assert calibration.tasks == adapters.task_names and all(n > 0 for n in calibration.tokens.values())
    cfg = DemoConfig(calibrate=True, baseline="ties")
    banks = compared_banks(adapters, cfg, calibration=calibration)
    free = compared_banks(adapters, cfg)
    aware = {label: bank for label, bank in banks.items() if label.endswith("(data-aware)")}
    assert sorted(b.method for b in aware.values()) == ["hydraopt", "per-task"]
    assert all(b.params["calibration_tokens"] == calibration.tokens for b in aware.values())
    assert "calibration_tokens" not in banks[REFERENCE].params and "calibration_tokens" not in banks["ties (one merged adapter)"].params
    hydraopt_free = next(b for b in free.values() if b.method == "hydraopt")
    hydraopt_aware = next(b for b in aware.values() if b.method == "hydraopt")
    assert hydraopt_aware.rel_errors != hydraopt_free.rel_errors  # the inputs' moments moved the plan or its factors
