"""Choosing, per module, the layout, shared rank and number format that buy the most error
reduction per byte within a storage budget (METHOD.md, "A storage budget ...").

Each module gets a list of candidates (file bytes, weighted squared error). A candidate's bytes are
its parts' payload: a bundle file is one flat blob whose header does not depend on the parts in it
(storage.py), so the caller sets each file's fixed overhead aside from the budget and a plan's
files never exceed it. Only the lower convex hull
of each list matters; its successive points are upgrades with decreasing error-per-byte gains.
All upgrades of all modules are sorted by gain and the longest prefix that fits the budget is
taken. Taking a prefix (rather than skipping an upgrade that does not fit and trying smaller ones)
makes the plan monotone: a larger budget never gives a larger error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from hydraopt_mobile.merge.budget import InfeasibleBudget


@dataclass(frozen=True)
class Candidate:
    k_a: int
    k_b: int
    rank: int
    fmt: str  # NumberFormat label
    nbytes: int  # payload bytes
    error: float  # weighted squared reconstruction error of the stored factors
    groups: tuple[tuple[int, ...], tuple[int, ...]] | None = field(default=None, compare=False)  # (a_index, b_index) it was solved with
    a_rows: int = field(default=0, compare=False)  # a closed form's A's were encoded at this rank and cut to ``rank`` (candidates.py)

    @property
    def spec(self) -> tuple[int, int, int, str]:
        return (self.k_a, self.k_b, self.rank, self.fmt)


def lower_hull(cands: list[Candidate]) -> list[Candidate]:
    """Candidates on the lower convex hull of (bytes, error), cheapest first, error decreasing."""
    pts = sorted(cands, key=lambda c: (c.nbytes, c.error))
    front: list[Candidate] = []
    for c in pts:  # Pareto front: strictly decreasing error
        if not front or c.error < front[-1].error:
            if front and front[-1].nbytes == c.nbytes:
                front.pop()
            front.append(c)
    hull: list[Candidate] = []
    for c in front:
        while len(hull) >= 2:
            p, q = hull[-2], hull[-1]
            # drop q if it lies on or above the segment p -> c
            if (q.error - p.error) * (c.nbytes - p.nbytes) >= (c.error - p.error) * (q.nbytes - p.nbytes):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def allocate(candidates: dict[str, list[Candidate]], budget_bytes: int) -> dict[str, Candidate]:
    """Per module, the chosen candidate for ``budget_bytes``; raises InfeasibleBudget naming the minimum."""
    hulls = {m: lower_hull(cands) for m, cands in candidates.items()}
    choice = {m: h[0] for m, h in hulls.items()}
    total = sum(c.nbytes for c in choice.values())
    if total > budget_bytes:
        raise InfeasibleBudget(
            f"budget of {budget_bytes:,} bytes is infeasible: the smallest feasible budget is {total:,} bytes"
        )
    upgrades = []
    for m, h in hulls.items():
        for prev, nxt in zip(h, h[1:]):
            gain = (prev.error - nxt.error) / max(nxt.nbytes - prev.nbytes, 1)
            upgrades.append((gain, m, nxt, nxt.nbytes - prev.nbytes))
    upgrades.sort(key=lambda u: -u[0])
    for _, m, nxt, extra in upgrades:
        if total + extra > budget_bytes:
            break
        choice[m] = nxt
        total += extra
    return choice


def allocate_best(candidates: dict[str, list[Candidate]], budget_bytes: int, subsets: Sequence[Callable[[Candidate], bool]]) -> dict[str, Candidate]:
    """The plan of least total error among :func:`allocate` on each subset of every module's
    candidates (``subsets``: which candidates each option keeps; a subset that leaves a module none
    is skipped; the earlier subset wins a tie); raises the InfeasibleBudget of the last subset when
    no subset fits.

    :func:`allocate` takes a prefix of upgrades sorted by gain, which is not the best plan of its
    candidates: with more candidates the prefix can stop earlier and the plan be worse than that of
    a subset of them (measured on the suite's adapters: 0.4 % more error with the shared layouts
    than without them, at 1/(2T)). Comparing the options' objectives makes a plan from the larger
    set never worse than one from a subset it is compared with. Each option is monotone in the
    budget (a prefix), so the least of them is too."""
    best: dict[str, Candidate] | None = None
    error: InfeasibleBudget | None = None
    for keep in subsets:
        kept = {m: [c for c in cands if keep(c)] for m, cands in candidates.items()}
        if not all(kept.values()):
            continue
        try:
            plan = allocate(kept, budget_bytes)
        except InfeasibleBudget as e:
            error = e
            continue
        if best is None or sum(c.error for c in plan.values()) < sum(c.error for c in best.values()):
            best = plan
    if best is None:
        raise error if error is not None else InfeasibleBudget(f"budget of {budget_bytes:,} bytes: no candidates")
    return best


def minimum_bytes(candidates: dict[str, list[Candidate]]) -> int:
    return sum(min(c.nbytes for c in cands) for cands in candidates.values())
