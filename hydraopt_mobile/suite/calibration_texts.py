"""Calibration texts for the data-aware merge (``hydraopt merge --calibration DIR``) from the suite:
the first few examples of each task's *train* split (never val or test), each as the sequence the
adapter was trained on: the chat-formatted prompt, the answer and the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.suite.prompts import render_prompt
from hydraopt_mobile.suite.tasks import TaskSpec

CALIBRATION = json_marker("calibration folder", "calibration.json", "format", "hydraopt-calibration-texts")


def training_sequence(tokenizer, task: TaskSpec, example) -> str:
    """One example as the adapter was trained on it: chat-formatted prompt, answer, end of turn."""
    return render_prompt(tokenizer, task, example) + example.target + tokenizer.eos_token


def calibration_texts(tasks: list[TaskSpec], tokenizer, per_task: int = 16) -> dict[str, list[str]]:
    return {t.name: [training_sequence(tokenizer, t, ex) for ex in t.train[:per_task]] for t in tasks}


def write_calibration_dir(out: Path, tasks: list[TaskSpec], tokenizer, per_task: int = 16, overwrite: bool = False) -> Path:
    """``out/<task>.jsonl`` (one ``{"text": ...}`` per line) and ``out/calibration.json`` saying what they are."""
    texts = calibration_texts(tasks, tokenizer, per_task)
    with atomic_dir(Path(out), overwrite, kind=CALIBRATION) as tmp:
        for task, rows in texts.items():
            (tmp / f"{task}.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
        (tmp / "calibration.json").write_text(json.dumps({"format": "hydraopt-calibration-texts", "split": "train", "per_task": per_task, "tasks": sorted(texts)}))
    return Path(out)
