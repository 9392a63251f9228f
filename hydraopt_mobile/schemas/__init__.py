"""JSON Schemas of the files this tool reads from outside, and the one way to read and check them.

The ``*.schema.json`` files are package data, so another reader (the Android app) can apply the
same rules. What a schema cannot say (index bounds, files that exist inside the folder) is checked
by the reader right after :func:`validate`.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Callable, Mapping, cast

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

MAX_JSON_BYTES = 64 << 20  # a manifest or config is kilobytes; refuse to parse a huge file


def schema(name: str) -> dict:
    """The parsed schema ``name`` (e.g. ``"bundle-manifest"``)."""
    return json.loads(files(__package__).joinpath(f"{name}.schema.json").read_text())


# JSON Schema counts 1.0 as an integer; the readers index lists with these values, so here an
# integer is a JSON number written without a fraction or exponent (a Python int).
_Validator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)),
)


@cache
def _validator(name: str) -> Draft202012Validator:
    return _Validator(schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER)


def _reject_constant(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


def read_json(path: Path, error: type[Exception]) -> object:
    """Parse ``path`` as strict JSON (no NaN/Infinity), raising ``error`` naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= MAX_JSON_BYTES else None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from e
    if data is None:
        raise error(f"{path}: {size} bytes, too large for a JSON manifest")
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: not valid JSON ({_short(str(e), 200)})") from e


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean", type(None): "null"}


def _describe(e: ValidationError) -> str:
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".") or "top level"
    if e.validator == "type":
        shown = "" if e.instance is None else " " + _short(e.instance)
        return f"{where}: is {_JSON_TYPES.get(type(e.instance), 'a value')}{shown}, expected {e.validator_value}"
    return f"{where}: {_short(e.message, 200)}"


def _short(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(instance: object, name: str, source: object, error: type[Exception]) -> None:
    """Check ``instance`` against schema ``name``; raise ``error`` naming ``source`` and the field."""
    problem = best_match(_validator(name).iter_errors(instance))
    if problem is not None:
        raise error(f"{source}: {_describe(problem)}")


def read_document(path: Path, name: str, error: type[Exception], missing: str,
                  identity: Mapping[str, object] | None = None, foreign: str | Callable[[object], str] = "") -> dict:
    """The JSON file ``path`` parsed and checked against schema ``name``: the one reading of a
    manifest or config. ``error(missing)`` when it is not a file; when ``identity`` is given, a
    document whose fields differ from it (e.g. another format's manifest) is refused as
    ``error(foreign)`` (``foreign(document)`` when callable, so the message can say what the file
    is instead) before the schema is applied, so the message says what the file is not rather than
    which field of another format it lacks."""
    if not path.is_file():
        raise error(missing)
    doc = read_json(path, error)
    if identity is not None and (not isinstance(doc, dict) or any(doc.get(k) != v for k, v in identity.items())):
        raise error(foreign(doc) if callable(foreign) else foreign)
    validate(doc, name, path, error)
    return cast(dict, doc)  # every schema read this way has an object at its top level
