"""The ``./dev`` entry point runs CLI commands in the caller's folder: relative paths given to
``./dev hydraopt`` are the caller's, not the checkout's."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dev_hydraopt_writes_relative_outputs_where_it_is_called(tmp_path):
    result = subprocess.run([str(ROOT / "dev"), "hydraopt", "suite", "calibration", "--out", "texts", "--per-task", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "texts" / "calibration.json").is_file()
    assert not (ROOT / "texts").exists()
