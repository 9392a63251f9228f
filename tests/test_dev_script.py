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
    # calibration reads each prompt/completion row as the sequence the adapter trained on
    from transformers import AutoTokenizer

    from hydraopt_mobile.calibration import full_text, read_texts
    from hydraopt_mobile.suite.calibration_texts import calibration_texts
    from hydraopt_mobile.suite.model import base_model_dir
    from hydraopt_mobile.suite.tasks import TASK_NAMES, load_suite

    rows = read_texts(tmp_path / "texts", TASK_NAMES)
    assert all(isinstance(x, tuple) for texts in rows.values() for x in texts)  # the sweep measures the answers
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    assert {t: [full_text(x) for x in texts] for t, texts in rows.items()} == calibration_texts(load_suite(), tokenizer, 1)
