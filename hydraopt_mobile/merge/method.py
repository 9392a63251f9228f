"""What a merge method is made of: typed parameters, a build function, and the progress it reports.

A method's parameters are a frozen dataclass derived from :class:`MethodParams`: typed fields with
defaults, help text in ``field(metadata={"help": ...})`` and optional bounds (``"min"``, ``"max"``,
inclusive). :meth:`MethodParams.parse` turns the CLI's ``--param KEY=VALUE`` strings into an
instance by each field's type; a build function (:class:`Build`) turns adapters and parameters into
modules. The registry (registry.py) pairs the two per method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, TypeVar

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.bank import MergedModule
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.parallel import map_in_order

OnStep = Callable[[int, int], None]


def part_of(on_step: OnStep | None, index: int, parts: int) -> OnStep | None:
    """``on_step`` for the ``index``-th of ``parts`` passes of equal length, reported as one."""
    if on_step is None:
        return None
    return lambda done, total: on_step(index * total + done, parts * total)
"""Progress callback: ``on_step(done, total)`` after each step (a module, or a module's candidates)."""

P = TypeVar("P", bound="MethodParams")


def param(default: Any, help: str, **bounds: float) -> Any:
    """A parameter field: its default, its help text (``hydraopt methods``), optional ``min``/``max``."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameter dataclass; checks the fields' bounds on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, str):
                continue
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                span = f"at least {low}" if high is None else f"between {low} and {high}"
                raise UserError(f"--param {f.name}={value}: must be {span}")

    @classmethod
    def parse(cls: type[P], given: Mapping[str, object]) -> P:
        """An instance from ``given`` (strings as typed on the command line, or typed values),
        each converted by its field's type; ``none`` or an empty string gives None where allowed."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise UserError(f"--param {unknown[0]}: no such parameter (this method has: {', '.join(fields) or 'none'})")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _convert(name, hints[name], raw) for name, raw in given.items()})


def _convert(name: str, hint: Any, raw: object) -> Any:
    text = raw if isinstance(raw, str) else str(raw)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.strip().lower() in ("", "none"):
        return None
    (kind,) = [o for o in options if o is not type(None)]
    if typing.get_origin(kind) is Literal:
        if text not in typing.get_args(kind):
            raise UserError(f"--param {name}={text!r}: expected one of {', '.join(typing.get_args(kind))}")
        return text
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--param {name}={text!r}: expected {'an integer' if kind is int else 'a number' if kind is float else kind.__name__}") from None


@dataclass(frozen=True)
class NoParams(MethodParams):
    """A method without parameters."""


ModuleSink = Callable[[int, str, list[LoraFactors], MergedModule], MergedModule]
"""``sink(budget index, module name, the module's input factors, the built module)`` -> what the
bank keeps of it: a budgeted build hands each module over as soon as it is built (a streaming
bundle writer keeps only its layout and sizes)."""


@dataclass(frozen=True)
class Storage:
    """How the built modules are stored: the number formats a build may use (fixed-storage methods
    get exactly one), for budgeted methods the budgets (one result per budget), and where built
    modules go (``sink``; budgeted methods only)."""

    formats: tuple[NumberFormat, ...]
    budgets: tuple[Budget, ...] = ()
    sink: ModuleSink | None = None

    def keep(self, budget: int, name: str, factors: list[LoraFactors], module: MergedModule) -> MergedModule:
        """What a budgeted build keeps of ``module`` built for ``storage.budgets[budget]``: the
        module itself, or what ``sink`` returns once it has taken it."""
        return module if self.sink is None else self.sink(budget, name, factors, module)


Modules = dict[str, MergedModule]


class Build(Protocol):
    """A method's work: the modules of each budget in ``storage.budgets`` (an InfeasibleBudget in
    place of one that no layout fits), or one set of modules for a fixed-storage method."""

    def __call__(self, adapters: AdapterSet, params: Any, storage: Storage, on_step: OnStep | None) -> list[Modules | InfeasibleBudget]: ...


def each_module(adapters: AdapterSet, work: Callable[[int, str, list[LoraFactors]], Any], on_step: OnStep | None, passes: int = 1, done: int = 0, then: Callable[[int, str, list[LoraFactors], Any], Any] | None = None) -> dict[str, Any]:
    """``work(index, name, factors)`` for every module, on as many threads as the caller gave torch
    (one module per thread, parallel.py), and ``then(index, name, factors, result)`` (what is kept;
    default the result) in the calling thread in module order, reporting progress to ``on_step``
    out of ``passes`` such loops (``done`` steps already reported by the earlier ones)."""
    names = adapters.module_names
    out: dict[str, Any] = {}

    def finish(m: int, name: str, factors: list[LoraFactors], result: Any) -> None:
        out[name] = result if then is None else then(m, name, factors, result)
        if on_step is not None:
            on_step(done + m + 1, passes * len(names))

    map_in_order(names, adapters.factors, work, finish)
    return out
