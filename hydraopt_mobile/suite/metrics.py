"""Task metrics, all on a 0..100 scale."""

from __future__ import annotations

import re
import unicodedata

from rouge_score import rouge_scorer

from .tasks import TaskSpec

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_WS = re.compile(r"\s+")
# rouge-score's default tokenizer keeps only [a-z0-9] and would drop accented or non-latin letters;
# this one keeps every word character and splits CJK scripts into single characters.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed (accents are kept: they are spelling)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WS.sub(" ", _PUNCT.sub(" ", text)).strip()


def first_line(text: str) -> str:
    """A generation up to its first non-empty line: the answer, without any rambling after it."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class _UnicodeTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score against")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions whose first line equals the reference after :func:`normalize`."""
    _check(predictions, references)
    hits = sum(normalize(first_line(p)) == normalize(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Classification accuracy: the prediction's first word (normalised) must be the label."""
    _check(predictions, references)
    hits = 0
    for p, r in zip(predictions, references):
        words = normalize(first_line(p)).split()
        hits += bool(words) and words[0] == normalize(r)
    return 100.0 * hits / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Unicode-aware tokenizer) of the predictions' first lines."""
    _check(predictions, references)
    total = sum(_SCORER.score(r, first_line(p))["rougeL"].fmeasure for p, r in zip(predictions, references))
    return 100.0 * total / len(references)


METRICS = {"exact_match": exact_match, "accuracy": accuracy, "rougeL": rouge_l}


def score(task: TaskSpec, predictions: list[str], split: str = "test") -> float:
    """``task``'s own metric of ``predictions`` against the targets of ``split`` (test by default)."""
    return METRICS[task.metric](predictions, [e.target for e in task.split(split)])


def average(scores: dict[str, float]) -> float:
    """Unweighted mean over tasks."""
    if not scores:
        raise ValueError("no scores to average")
    return sum(scores.values()) / len(scores)


def drop(scores: dict[str, float], reference: dict[str, float]) -> tuple[float, float]:
    """``(points, percent)`` by which the average of ``scores`` falls below ``reference``'s (same tasks)."""
    if scores.keys() != reference.keys():
        raise ValueError(f"different task sets: {sorted(scores)} vs {sorted(reference)}")
    ref = average(reference)
    points = ref - average(scores)
    return points, (100.0 * points / ref if ref else float("nan"))
