"""The suite's data loaders against the real packaged data (pycountry, chatterbot-corpus; their
versions are pinned in pyproject.toml, which fixes the example counts below)."""

from __future__ import annotations

import pytest

from hydraopt_mobile.errors import UserError
from hydraopt_mobile.suite.tasks import TASK_NAMES, TEST_SIZE, VAL_SIZE, load_suite

# Sizes (train, val, test) of each task, fixed by the packaged data and the split seed 0.
EXPECTED_SIZES = {
    "country-de": (171, 30, 48),
    "country-es": (171, 30, 48),
    "country-it": (171, 30, 48),
    "country-pt": (171, 30, 48),
    "topic-en": (658, 30, 48),
    "topic-it": (305, 30, 48),
    "topic-es": (166, 30, 48),
    "topic-pt": (204, 30, 48),
    "currency-de": (99, 30, 48),
    "currency-es": (98, 30, 48),
    "currency-it": (88, 30, 48),
    "currency-pt": (82, 30, 48),
}


@pytest.fixture(scope="module")
def suite():
    return load_suite()


def test_suite_covers_three_apps_by_four_languages(suite):
    assert [t.name for t in suite] == TASK_NAMES
    apps = {t.app for t in suite}
    assert apps == {"country", "topic", "currency"}
    for app in apps:
        assert len({t.language for t in suite if t.app == app}) == 4
    assert {t.metric for t in suite} == {"exact_match", "accuracy", "rougeL"}
    assert not any(t.app == "reply" for t in suite)  # reply tasks exist but are not in the default suite


def test_sizes_match_the_packaged_data(suite):
    assert {t.name: (len(t.train), len(t.val), len(t.test)) for t in suite} == EXPECTED_SIZES
    assert all(len(t.test) == TEST_SIZE and len(t.val) == VAL_SIZE for t in suite)


def test_splits_are_disjoint_by_prompt(suite):
    for t in suite:
        tr, va, te = ({e.prompt for e in s} for s in (t.train, t.val, t.test))
        assert len(tr) == len(t.train) and len(va) == len(t.val) and len(te) == len(t.test), t.name
        assert not (tr & va) and not (tr & te) and not (va & te), t.name


def test_splits_are_stable_across_loads_and_change_with_seed(suite):
    again = load_suite()
    for a, b in zip(suite, again):
        assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    other = load_suite(["country-de"], seed=1)[0]
    assert other.test != suite[0].test
    assert sorted(other.train + other.val + other.test, key=repr) == sorted(
        suite[0].train + suite[0].val + suite[0].test, key=repr
    )


def test_country_examples_are_real_translations(suite):
    de = next(t for t in suite if t.name == "country-de")
    pairs = {e.prompt: e.target for e in de.train + de.val + de.test}
    assert pairs["Germany"] == "Deutschland"
    assert pairs["France"] == "Frankreich"
    assert pairs["Angola"] == "Angola"  # a translation that keeps the name is a real answer
    assert len(pairs) == 249  # every ISO 3166 country has a German entry


def test_topic_labels_are_the_answers(suite):
    for t in (t for t in suite if t.app == "topic"):
        assert t.labels and len(t.labels) >= 8
        assert {e.target for e in t.train + t.val + t.test} <= set(t.labels)
        assert all(label in t.instruction for label in t.labels)
    en = next(t for t in suite if t.name == "topic-en")
    assert "food" in en.labels and "sports" in en.labels


def test_currency_examples_are_real_translations(suite):
    de = next(t for t in suite if t.name == "currency-de")
    pairs = {e.prompt: e.target for e in de.train + de.val + de.test}
    assert pairs["Tanzanian Shilling"] == "Tansanischer Schilling"
    assert all(p != "" and t != "" for p, t in pairs.items())


def test_reply_tasks_load_outside_the_default_suite():
    tasks = load_suite(["reply-en", "reply-zh"])
    assert [(len(t.train), len(t.val), len(t.test)) for t in tasks] == [(605, 30, 48), (290, 30, 48)]
    for t in tasks:
        assert t.metric == "rougeL" and all(0 < len(e.target) <= 160 for e in t.train + t.val + t.test)


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="unknown task 'country-xx'"):
        load_suite(["country-xx"])
