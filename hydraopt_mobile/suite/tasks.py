"""The embedded task suite: 3 applications x 4 languages, built only from data shipped in packages.

- ``country-<lang>``: English country name -> its name in German, Spanish, Italian or Portuguese
  (pycountry's ISO 3166 gettext catalogues), exact match after normalisation.
- ``topic-<lang>``: which topic a chatterbot-corpus question belongs to (label = the corpus file's
  English stem, e.g. ``food``), in English, Italian, Spanish and Portuguese; accuracy.
- ``currency-<lang>``: English currency name -> its name in German, Spanish, Italian or Portuguese
  (pycountry's ISO 4217 catalogues, e.g. "Tanzanian Shilling" -> "Tansanischer Schilling"); ROUGE-L,
  since most answers are several words and a near miss deserves part credit.

``reply-<lang>`` (a short reply to a chatterbot-corpus message, ROUGE-L) can be loaded by name but is
not in the default suite: measured on SmolLM2-135M, a LoRA adapter clearly beat the base model on it
in only 3 of 9 languages (see the adapters' README), and merging results on tasks whose adapters
learned nothing would measure noise.

Splits are fixed by a seeded shuffle of a sorted, de-duplicated list, so they are identical across
runs and machines and disjoint by prompt (no question or name is in two splits).
"""

from __future__ import annotations

import gettext
import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import pycountry
import yaml

from hydraopt_mobile.errors import UserError

TEST_SIZE = 48
VAL_SIZE = 30

TRANSLATION_LANGS = {"de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese"}
# chatterbot-corpus data folder of each language code used below.
CHAT_FOLDERS = {
    "en": "english", "it": "italian", "es": "spanish", "pt": "portuguese",
    "zh": "chinese", "ja": "japanese", "ko": "korean", "nl": "dutch", "uk": "ukrainian",
}
TOPIC_LANGS = ("en", "it", "es", "pt")
REPLY_LANGS = tuple(CHAT_FOLDERS)  # loadable by name; not in the default suite (see the module docstring)
LANGUAGE_NAMES = {
    "en": "English", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "uk": "Ukrainian",
}
# Reply references longer than this (a few multi-paragraph answers) are left out: the task is a short reply.
MAX_REPLY_CHARS = 160
# A topic needs this many distinct questions in a language to be a label there.
MIN_TOPIC_EXAMPLES = 8


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str


@dataclass
class TaskSpec:
    """One task of the suite: what to ask, how to score it, and its three splits."""

    name: str
    app: str
    language: str
    metric: str  # "accuracy" | "exact_match" | "rougeL"
    labels: list[str] | None
    max_new_tokens: int
    instruction: str
    train: list[Example] = field(default_factory=list, repr=False)
    val: list[Example] = field(default_factory=list, repr=False)
    test: list[Example] = field(default_factory=list, repr=False)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "val", "test"):
            raise UserError(f"--split: unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _split(pairs: list[Example], seed: int, key: str) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded disjoint test / val / train split; the key keeps tasks' shuffles independent."""
    items = sorted(pairs, key=lambda e: (e.prompt, e.target))
    random.Random(f"{seed}:{key}").shuffle(items)
    test, val, train = items[:TEST_SIZE], items[TEST_SIZE : TEST_SIZE + VAL_SIZE], items[TEST_SIZE + VAL_SIZE :]
    if len(train) < TEST_SIZE:
        raise ValueError(f"task {key}: only {len(items)} examples, too few for the fixed splits")
    return train, val, test


def _iso_pairs(domain: str, lang: str, names: set[str]) -> list[Example]:
    """(English name, its translation) for every name in ``names`` that one pycountry gettext catalogue
    (``iso3166-1`` countries, ``iso4217`` currencies) translates into ``lang``."""
    mo = _package_dir("pycountry") / "locales" / lang / "LC_MESSAGES" / f"{domain}.mo"
    with mo.open("rb") as f:
        catalog = gettext.GNUTranslations(f)
    # gettext() returns the English name for untranslated entries too; only the catalogue itself tells
    # a translation that keeps the name ("Angola" -> "Angola", a real answer) from a missing one.
    translations: dict[str, str] = catalog._catalog  # type: ignore[attr-defined]
    return [Example(k, v) for k, v in sorted(translations.items()) if k in names and v]


def _chat_conversations(folder: str) -> list[tuple[str, str, str]]:
    """(topic, question, first answer) for every conversation of one chatterbot-corpus language."""
    out = []
    for path in sorted((_package_dir("chatterbot_corpus") / "data" / folder).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in data.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                q, a = conv[0].strip(), conv[1].strip()
                if q and a:
                    out.append((path.stem, q, a))
    return out


def _topic_pairs(folder: str) -> tuple[list[Example], list[str]]:
    by_question: dict[str, set[str]] = {}
    for topic, q, _ in _chat_conversations(folder):
        by_question.setdefault(q, set()).add(topic)
    unique = {q: next(iter(t)) for q, t in by_question.items() if len(t) == 1}  # drop ambiguous questions
    counts: dict[str, int] = {}
    for topic in unique.values():
        counts[topic] = counts.get(topic, 0) + 1
    labels = sorted(t for t, n in counts.items() if n >= MIN_TOPIC_EXAMPLES)
    return [Example(q, t) for q, t in unique.items() if t in labels], labels


def _reply_pairs(folder: str) -> list[Example]:
    first: dict[str, str] = {}
    for _, q, a in _chat_conversations(folder):
        first.setdefault(q, a)  # one reference per question: the first answer in corpus order
    return [Example(q, a) for q, a in first.items() if len(a) <= MAX_REPLY_CHARS]


# translation application -> (pycountry catalogue domain, the database of its English names, metric)
_TRANSLATIONS = {
    "country": ("iso3166-1", pycountry.countries, "exact_match"),
    "currency": ("iso4217", pycountry.currencies, "rougeL"),
}


def _build(name: str, seed: int) -> TaskSpec:
    app, _, lang = name.partition("-")
    if app in _TRANSLATIONS and lang in TRANSLATION_LANGS:
        domain, database, metric = _TRANSLATIONS[app]
        train, val, test = _split(_iso_pairs(domain, lang, {c.name for c in database}), seed, name)
        instruction = f"Translate this {app} name from English to {TRANSLATION_LANGS[lang]}. Answer with the name only."
        return TaskSpec(name, app, lang, metric, None, 24, instruction, train, val, test)
    if app == "topic" and lang in TOPIC_LANGS:
        pairs, labels = _topic_pairs(CHAT_FOLDERS[lang])
        train, val, test = _split(pairs, seed, name)
        instruction = (
            f"Which topic is this {LANGUAGE_NAMES[lang]} message about? "
            f"Answer with one word from: {', '.join(labels)}."
        )
        return TaskSpec(name, "topic", lang, "accuracy", labels, 8, instruction, train, val, test)
    if app == "reply" and lang in REPLY_LANGS:
        train, val, test = _split(_reply_pairs(CHAT_FOLDERS[lang]), seed, name)
        instruction = f"Reply to this message in {LANGUAGE_NAMES[lang]} with one short sentence."
        return TaskSpec(name, "reply", lang, "rougeL", None, 32, instruction, train, val, test)
    raise UserError(f"--tasks: unknown task {name!r}; known: {', '.join(TASK_NAMES + OPTIONAL_TASK_NAMES)}")


TASK_NAMES: list[str] = (
    [f"country-{lang}" for lang in TRANSLATION_LANGS]
    + [f"topic-{lang}" for lang in TOPIC_LANGS]
    + [f"currency-{lang}" for lang in TRANSLATION_LANGS]
)
OPTIONAL_TASK_NAMES: list[str] = [f"reply-{lang}" for lang in REPLY_LANGS]


def load_suite(names: list[str] | None = None, seed: int = 0) -> list[TaskSpec]:
    """The suite's tasks (all of :data:`TASK_NAMES` by default) with their fixed splits."""
    return [_build(name, seed) for name in (names or TASK_NAMES)]
