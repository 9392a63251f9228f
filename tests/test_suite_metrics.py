"""Metrics on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from hydraopt_mobile.suite.metrics import accuracy, average, drop, exact_match, normalize, paired_gain, rouge_l, score
from hydraopt_mobile.suite.tasks import load_suite


def test_normalize():
    assert normalize("  Bonaire, Sint Eustatius  und SABA. ") == "bonaire sint eustatius und saba"
    assert normalize("Islândia") == "islândia"  # accents are spelling, not noise
    assert normalize("Islândia") != normalize("Islandia")
    assert normalize("Ｆｕｌｌ") == "full"  # NFKC


def test_exact_match():
    assert exact_match(["Deutschland", "frankreich!\nmore text", "Spanien"], ["Deutschland", "Frankreich", "Italien"]) == pytest.approx(200 / 3)
    assert exact_match(["Kroatien Land"], ["Kroatien"]) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_accuracy_takes_first_word():
    assert accuracy(["food.", "Sports are fun", "ai"], ["food", "sports", "money"]) == pytest.approx(200 / 3)
    assert accuracy(["", "tech_support"], ["food", "tech_support"]) == 50.0


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    # LCS "the cat" = 2 of 3 tokens on both sides -> F1 = 2/3
    assert rouge_l(["the cat ran"], ["the cat sat"]) == pytest.approx(200 / 3)
    assert rouge_l(["nothing"], ["in common"]) == 0.0


def test_rouge_l_keeps_accents_and_cjk():
    # rouge-score's default tokenizer would reduce these to nothing (or to 'perch'), scoring 0 or a false 100.
    assert rouge_l(["perché sì"], ["perché no"]) == pytest.approx(50.0)
    assert rouge_l(["我喜欢猫"], ["我喜欢狗"]) == pytest.approx(75.0)


def test_score_uses_the_tasks_metric_on_its_test_split():
    country, topic = load_suite(["country-de", "topic-en"])
    assert score(country, [e.target for e in country.test]) == 100.0
    # Copying the English name is right exactly where the translation keeps it.
    kept = sum(e.prompt == e.target for e in country.test)
    assert 0 < kept < len(country.test)
    assert score(country, [e.prompt for e in country.test]) == pytest.approx(100 * kept / len(country.test))
    assert score(topic, [e.target for e in topic.val], split="val") == 100.0
    with pytest.raises(ValueError):
        score(topic, [e.target for e in topic.val])  # 30 predictions for 48 test examples


def test_average_and_drop():
    ref = {"a": 60.0, "b": 40.0}
    assert average(ref) == 50.0
    assert drop({"a": 55.0, "b": 40.0}, ref) == pytest.approx((2.5, 5.0))
    assert drop(ref, ref) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different task sets"):
        drop({"a": 1.0}, ref)


def test_paired_gain_separates_a_real_gain_from_noise():
    (country,) = load_suite(["country-de"])
    targets = [e.target for e in country.test]
    wrong = ["?"] * len(targets)
    gain = paired_gain(country, targets, wrong)
    assert gain.points == 100.0 and gain.clear
    same = paired_gain(country, wrong, wrong)
    assert (same.points, same.low, same.high) == (0.0, 0.0, 0.0) and not same.clear
    # one example right out of 48 is a gain of 2.1 points whose interval reaches zero: not a clear gain
    one = paired_gain(country, targets[:1] + wrong[1:], wrong)
    assert one.points == pytest.approx(100 / 48) and one.low == 0.0 and not one.clear
    # a worse set has a negative gain
    assert paired_gain(country, wrong, targets).high < 0


def test_against_base_needs_adapters():
    from typer.testing import CliRunner

    from hydraopt_mobile.app.cli import app

    result = CliRunner().invoke(app, ["suite", "eval", "--against-base", "--tasks", "country-de"], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and "--against-base needs --adapters or --bundle" in result.output


def test_suite_eval_of_a_bundle_names_tasks_outside_the_suite(make_adapters, tmp_path):
    """A bundle of other tasks is refused before the model loads, naming them and the way out (--tasks)."""
    from typer.testing import CliRunner

    from hydraopt_mobile.app.cli import app

    merged = CliRunner().invoke(app, ["merge", *map(str, make_adapters(2)), "--budget", "0.5", "--out", str(tmp_path / "b")])
    assert merged.exit_code == 0, merged.output
    result = CliRunner().invoke(app, ["suite", "eval", "--bundle", str(tmp_path / "b")])
    assert result.exit_code == 2 and "are not suite tasks" in result.output and "--tasks" in result.output, result.output


def test_answer_cache_digest_takes_rank_one_factors():
    """A rank-1 B (d_out x 1) read back from a bundle is a transposed view whose size-1 dimension
    keeps a large stride; its digest must equal that of the same values laid out plainly."""
    import hashlib

    import torch

    from hydraopt_mobile.suite.answer_cache import _update

    view = torch.arange(192, dtype=torch.float32).reshape(1, 192).T.contiguous()
    plain = torch.arange(192, dtype=torch.float32).reshape(192, 1).clone()
    assert view.stride() != plain.stride()
    digests = []
    for t in (view, plain):
        h = hashlib.sha256()
        _update(h, t)
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]
    other = hashlib.sha256()
    _update(other, plain + 1)
    assert other.hexdigest() != digests[0]


def test_pooled_paired_drop_is_the_mean_difference_over_pairs_with_one_interval():
    from hydraopt_mobile.suite.metrics import paired_drop, pooled_paired_drop

    rng = np.random.default_rng(1)
    scores = [{t: (100 * (rng.random(30) < p)).tolist() for t in ("a", "b")} for p in (0.5, 0.6, 0.4, 0.7)]
    one = pooled_paired_drop([(scores[0], scores[1])])
    assert one == paired_drop(scores[0], scores[1])
    pooled = pooled_paired_drop([(scores[0], scores[1]), (scores[2], scores[3])])
    points = [paired_drop(r, o)["drop_points"] for r, o in ((scores[0], scores[1]), (scores[2], scores[3]))]
    assert pooled["drop_points"] == pytest.approx(sum(points) / 2)
    lo, hi = pooled["drop_points_ci95"]
    assert lo < pooled["drop_points"] < hi
    with pytest.raises(ValueError, match="no pairs"):
        pooled_paired_drop([])
