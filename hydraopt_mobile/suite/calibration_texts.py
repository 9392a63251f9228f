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


def training_example(tokenizer, task: TaskSpec, example) -> tuple[str, str]:
    """One example as the adapter was trained on it: the chat-formatted prompt, and the answer with
    the end-of-turn token."""
    return render_prompt(tokenizer, task, example), example.target + tokenizer.eos_token


def training_sequence(tokenizer, task: TaskSpec, example) -> str:
    return "".join(training_example(tokenizer, task, example))


def calibration_texts(tasks: list[TaskSpec], tokenizer, per_task: int = 16) -> dict[str, list[str]]:
    return {t.name: [training_sequence(tokenizer, t, ex) for ex in t.train[:per_task]] for t in tasks}


def write_calibration_dir(out: Path, tasks: list[TaskSpec], tokenizer, per_task: int = 16, overwrite: bool = False) -> Path:
    """``out/<task>.jsonl`` (one ``{"prompt": ..., "completion": ...}`` per line: calibration reads
    the two as one text, ``hydraopt sweep --texts`` measures the completion) and
    ``out/calibration.json`` saying what they are."""
    with atomic_dir(Path(out), overwrite, kind=CALIBRATION) as tmp:
        for task in tasks:
            rows = [training_example(tokenizer, task, ex) for ex in task.train[:per_task]]
            (tmp / f"{task.name}.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n" for p, c in rows), encoding="utf-8")
        (tmp / "calibration.json").write_text(json.dumps({"format": "hydraopt-calibration-texts", "split": "train", "per_task": per_task, "tasks": sorted(t.name for t in tasks)}))
    return Path(out)
