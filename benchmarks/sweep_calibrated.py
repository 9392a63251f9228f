"""`hydraopt sweep --calibration` on the suite's shared-seed adapters, as a user would run it with two
sets of texts: the data-aware objective fitted on 16 train examples per task (`hydraopt suite
calibration`'s), closeness to the adapters measured on 16 other examples per task, the val split's
(nothing fits on val), each as the prompt and answer the adapter was trained on: measured on the
answer's tokens.

    python benchmarks/sweep_calibrated.py [--lock /work/runs/cpu.lock]

Writes benchmarks/results/sweep_suite_calibrated/ (the command's own sweep.json, sweep.md, sweep.png).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS_DIR, ROOT, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from hydraopt_mobile.suite.calibration_texts import training_example, write_calibration_dir
from hydraopt_mobile.suite.model import base_model_dir
from hydraopt_mobile.suite.tasks import load_suite

PER_TASK = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "sweep_suite_calibrated")
    ap.add_argument("--lock", type=Path, help="CPU lock file, held exclusive for the sweep")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    tasks = load_suite()
    with tempfile.TemporaryDirectory() as tmp:
        calibration = write_calibration_dir(Path(tmp) / "train", tasks, tokenizer, PER_TASK)
        val = Path(tmp) / "val"
        val.mkdir()
        for task in tasks:
            rows = [training_example(tokenizer, task, ex) for ex in task.val[:PER_TASK]]
            (val / f"{task.name}.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n" for p, c in rows), encoding="utf-8")
        adapters = sorted(str(p) for p in (SUITE_ADAPTERS / "shared-seed").iterdir() if p.is_dir())
        command = [sys.executable, "-m", "hydraopt_mobile.app.cli", "sweep", *adapters, "--texts", str(val), "--calibration", str(calibration),
                   "--method", "hydraopt", "--method", "per-task", "--out", str(args.out), "--overwrite"]
        if args.lock is not None:
            command = ["flock", "-x", str(args.lock), *command]
        subprocess.run(command, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
