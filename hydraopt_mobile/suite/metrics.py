"""Task metrics, all on a 0..100 scale."""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from scipy.stats import bootstrap

from hydraopt_mobile.suite.tasks import TaskSpec

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


def exact_match_each(predictions: list[str], references: list[str]) -> list[float]:
    """Per example, 100 when the prediction's first line equals the reference after :func:`normalize`."""
    _check(predictions, references)
    return [100.0 * (normalize(first_line(p)) == normalize(r)) for p, r in zip(predictions, references)]


def accuracy_each(predictions: list[str], references: list[str]) -> list[float]:
    """Per example, 100 when the prediction's first word (normalised) is the label."""
    _check(predictions, references)
    out = []
    for p, r in zip(predictions, references):
        words = normalize(first_line(p)).split()
        out.append(100.0 * (bool(words) and words[0] == normalize(r)))
    return out


def rouge_l_each(predictions: list[str], references: list[str]) -> list[float]:
    """Per example, ROUGE-L F1 x 100 (rouge-score, Unicode-aware tokenizer) of the first line."""
    _check(predictions, references)
    return [100.0 * _SCORER.score(r, first_line(p))["rougeL"].fmeasure for p, r in zip(predictions, references)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions whose first line equals the reference after :func:`normalize`."""
    return statistics.fmean(exact_match_each(predictions, references))


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Classification accuracy: the prediction's first word (normalised) must be the label."""
    return statistics.fmean(accuracy_each(predictions, references))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, Unicode-aware tokenizer) of the predictions' first lines."""
    return statistics.fmean(rouge_l_each(predictions, references))


METRICS = {"exact_match": exact_match, "accuracy": accuracy, "rougeL": rouge_l}
PER_EXAMPLE = {"exact_match": exact_match_each, "accuracy": accuracy_each, "rougeL": rouge_l_each}


def score(task: TaskSpec, predictions: list[str], split: str = "test") -> float:
    """``task``'s own metric of ``predictions`` against the targets of ``split`` (test by default)."""
    return METRICS[task.metric](predictions, [e.target for e in task.split(split)])


@dataclass(frozen=True)
class Gain:
    """How much one set of answers beats another on the same examples, with a 95 % bootstrap interval."""

    points: float
    low: float
    high: float

    @property
    def clear(self) -> bool:
        """The whole 95 % interval is above zero."""
        return self.low > 0

    def as_dict(self) -> dict:
        """The JSON form the CLI and the benchmarks write."""
        return {"points": self.points, "ci95": [self.low, self.high], "clear": self.clear}


def paired_gain(task: TaskSpec, predictions: list[str], reference_predictions: list[str], split: str = "test") -> Gain:
    """Score of ``predictions`` minus that of ``reference_predictions`` (e.g. an adapter's answers vs the
    base model's), with a paired percentile bootstrap over the split's examples (10,000 resamples, seeded).

    With 48 examples per task a few points of ROUGE-L can be noise; the interval says whether a gain is.
    """
    targets = [e.target for e in task.split(split)]
    each = PER_EXAMPLE[task.metric]
    diff = np.asarray(each(predictions, targets)) - np.asarray(each(reference_predictions, targets))
    if not diff.any():
        return Gain(0.0, 0.0, 0.0)
    ci = bootstrap((diff,), np.mean, n_resamples=10_000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    return Gain(float(diff.mean()), float(ci.low), float(ci.high))


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


def per_example(task: TaskSpec, predictions: list[str], split: str = "test") -> list[float]:
    """``task``'s metric of each prediction (0..100), in the split's order."""
    return PER_EXAMPLE[task.metric](predictions, [e.target for e in task.split(split)])


def paired_drop(reference: dict[str, list[float]], other: dict[str, list[float]], n_resamples: int = 10_000, seed: int = 0) -> dict:
    """How far ``other``'s task-averaged score falls below ``reference``'s on the same examples:
    points and percent of the reference, each with a 95 % paired percentile bootstrap interval.

    Examples are resampled within each task (the average gives every task the same weight, so each
    resample must too), and the same indices serve both sides: the pairing is what makes small
    differences measurable. A negative drop means ``other`` scored higher.
    """
    tasks = sorted(reference)
    if set(other) != set(tasks):
        raise ValueError(f"paired_drop: tasks differ ({sorted(set(other) ^ set(tasks))})")
    rng = np.random.default_rng(seed)
    ref_avg = np.zeros(n_resamples)
    oth_avg = np.zeros(n_resamples)
    for t in tasks:
        r, o = np.asarray(reference[t], float), np.asarray(other[t], float)
        if r.shape != o.shape:
            raise ValueError(f"paired_drop: task {t} has {r.size} reference and {o.size} other examples")
        idx = rng.integers(0, r.size, size=(n_resamples, r.size))
        ref_avg += r[idx].mean(axis=1) / len(tasks)
        oth_avg += o[idx].mean(axis=1) / len(tasks)
    ref_point = float(np.mean([np.mean(reference[t]) for t in tasks]))
    oth_point = float(np.mean([np.mean(other[t]) for t in tasks]))
    drops = ref_avg - oth_avg
    rel = 100 * drops / np.where(ref_avg == 0, np.nan, ref_avg)
    return {
        "drop_points": ref_point - oth_point,
        "drop_points_ci95": [float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5))],
        "rel_drop_pct": 100 * (ref_point - oth_point) / ref_point if ref_point else float("nan"),
        "rel_drop_pct_ci95": [float(np.nanpercentile(rel, 2.5)), float(np.nanpercentile(rel, 97.5))],
    }


def as_gain(drop: dict) -> dict:
    """A :func:`paired_drop` result (reference minus other) as other minus reference: ``points`` and
    its 95 % interval ``ci95``."""
    return {"points": 0.0 - drop["drop_points"], "ci95": [0.0 - drop["drop_points_ci95"][1], 0.0 - drop["drop_points_ci95"][0]]}


def pooled_paired_drop(pairs: list[tuple[dict[str, list[float]], dict[str, list[float]]]], n_resamples: int = 10_000, seed: int = 0) -> dict:
    """:func:`paired_drop` of the average over ``pairs`` of (reference, other) scores on the same
    examples: each example's score is averaged over the pairs first, so every resample draws the
    same examples in every pair, and one interval covers the mean difference (several banks
    compared on one split)."""
    if not pairs:
        raise ValueError("pooled_paired_drop: no pairs")

    def mean(scores: list[dict[str, list[float]]]) -> dict[str, list[float]]:
        return {t: np.mean([np.asarray(s[t], float) for s in scores], axis=0).tolist() for t in scores[0]}

    return paired_drop(mean([r for r, _ in pairs]), mean([o for _, o in pairs]), n_resamples, seed)
