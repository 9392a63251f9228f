"""With calibration texts, which objective's plan to keep: the data-aware one (the default) or,
with ``--choose kl``, whichever of it and the data-free one the model finds closer to the adapters
on the calibration texts (fidelity.py).

``hydraopt merge --calibration DIR`` keeps the data-aware plan. ``--choose kl`` builds the method's
banks under both objectives and keeps, at each budget, the bank whose next-token distributions on
the calibration texts are closer to each task's own adapter (mean over tasks of the KL). Why both:
the data-aware objective weighs each module's error by the base model's inputs one layer at a time,
a proxy; before its per-module scaling its plans were 1.8-4.5x further from the adapters end to end
than the data-free ones, and the KL choice rejected every one that lost. With the scaling they are
0.83-1.23x, and on the suite's validation split (which nothing fits or chooses on) the KL choice
scored 0.65 points below the data-aware plan, CI [-1.29, -0.04] (HydraOpt at 1/T and 1/(2T), both
inits: benchmarks/results/val_check_pooled.md), at about 4x the merge time: so the data-aware plan
is the default and the KL choice a check. Either way the choice uses the calibration texts only,
never a task's test examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.calibration import Text
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.fidelity import MAX_TOKENS, kl_to_adapters, mean_kl
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.method import OnStep, part_of
from hydraopt_mobile.merge.registry import MergeConfig, merge_budgets

Choose = Literal["kl", "data-aware"]
CHOICES: tuple[str, ...] = ("data-aware", "kl")


@dataclass(frozen=True)
class ObjectiveChoice:
    """How a calibrated merge picks its plan: ``data-aware`` (that plan, as is) or ``kl`` (the bank
    closer to the adapters on the calibration texts, of the data-aware and the data-free plan)."""

    by: Choose = "data-aware"
    batch_size: int = 16
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.by not in CHOICES:
            raise UserError(f"--choose {self.by!r}: expected one of {', '.join(CHOICES)}")


def merge_choosing(adapters: AdapterSet, config: MergeConfig, budgets: list[Budget], model, tokenizer, texts: dict[str, list[Text]], choice: ObjectiveChoice = ObjectiveChoice(), on_step: OnStep | None = None, on_task: OnStep | None = None) -> list[MergedBank | InfeasibleBudget]:
    """:func:`merge_budgets` with ``config.calibration`` (required), each budget's bank chosen as
    ``choice`` says. A chosen bank's ``params["choice"]`` records the objective kept and both banks'
    mean KL; an infeasible budget stays in the list (it is infeasible under either objective: the
    smallest layouts do not depend on it). Progress: ``on_step`` over both merges' modules,
    ``on_task`` over the KL pass's tasks."""
    if config.calibration is None:
        raise UserError("choosing an objective needs --calibration")
    kl_choice = choice.by == "kl"
    aware = merge_budgets(adapters, config, budgets, part_of(on_step, 0, 1 + kl_choice), strict=False)
    if not kl_choice:
        return aware
    free = merge_budgets(adapters, dataclasses.replace(config, calibration=None), budgets, part_of(on_step, 1, 2), strict=False)
    pairs = [(a, f) for a, f in zip(aware, free) if isinstance(a, MergedBank) and isinstance(f, MergedBank)]
    kls = iter(kl_to_adapters(model, tokenizer, adapters, [b for pair in pairs for b in pair], texts, choice.batch_size, choice.max_tokens, on_task))
    out: list[MergedBank | InfeasibleBudget] = []
    for a, f in zip(aware, free):
        if not (isinstance(a, MergedBank) and isinstance(f, MergedBank)):
            out.append(a)
            continue
        kl = {"data-aware": mean_kl(next(kls)), "data-free": mean_kl(next(kls))}
        name = kept_objective(kl)
        kept = a if name == "data-aware" else f
        kept.params = kept.params | {"choice": {"by": "kl", "kept": name, "mean_kl": kl, "calibration_tokens": a.params["calibration_tokens"]}}
        out.append(kept)
    return out


def kept_objective(mean_kl: dict[str, float]) -> str:
    """The plan the KL choice keeps given each plan's mean KL (``{"data-aware": .., "data-free": ..}``):
    the lower; a tie keeps the data-free plan."""
    return "data-aware" if mean_kl["data-aware"] < mean_kl["data-free"] else "data-free"

