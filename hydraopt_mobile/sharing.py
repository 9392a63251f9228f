"""What a plan shares, and how much of its saving sharing bought.

A bank can be small because its factors are shared between tasks, or because every task's own
factors were cut to a lower rank or a coarser number format. Only the first is merging; the second
is what compressing each adapter on its own gives anyone. These functions keep the two apart:

- :func:`layout_summary`: per module kind, how many modules share A, share B, use groups of tasks,
  or share nothing, with their ranks and formats;
- :func:`plan_label`: "no factor shared: per-task rank/format" for a plan that shares nothing, never
  a merge;
- :func:`saving_breakdown`: the payload bytes saved against fp16 one-adapter-per-task, split into
  what rank and format saved (each task keeping its own copy of the factors it uses, at the chosen
  rank and format) and what sharing saved on top (the copies not stored).
"""

from __future__ import annotations

from collections import Counter

from hydraopt_mobile.bank import MergedBank, MergedModule

NO_SHARING = "no factor shared: per-task rank/format"


def module_kind(m: MergedModule) -> str:
    """``share A+B`` (one merged adapter), ``share A``, ``share B``, ``groups`` or ``no sharing``."""
    T = len(m.a_index)
    k_a, k_b = m.layout
    if T > 1 and k_a == 1 and k_b == 1:
        return "share A+B"
    if T > 1 and k_a == 1:
        return "share A"
    if T > 1 and k_b == 1:
        return "share B"
    if m.shares():
        return "groups"
    return "no sharing"


def layout_summary(bank: MergedBank) -> dict:
    """Counts of modules by sharing kind, rank and number format."""
    modules = list(bank.modules.values())
    return {
        "modules": len(modules),
        "sharing": dict(Counter(module_kind(m) for m in modules).most_common()),
        "ranks": {str(r): n for r, n in sorted(Counter(m.rank for m in modules).items())},
        "formats": dict(Counter(m.fmt.label() for m in modules if m.A).most_common()),
        "shares_factors": any(m.shares() for m in modules),
    }


def plan_label(bank: MergedBank) -> str:
    if bank.method == "none":
        return "one adapter per task"
    if not any(m.shares() for m in bank.modules.values()):
        return NO_SHARING
    if all(module_kind(m) == "share A+B" for m in bank.modules.values()):
        return "one merged adapter"
    return "shared factors + per-task tensors"


def unshared_payload_bytes(bank: MergedBank) -> int:
    """Payload bytes if every task stored its own copy of each factor it uses (same rank, format)."""
    total = 0
    for m in bank.modules.values():
        for t in range(len(bank.tasks)):
            total += m.A[m.a_index[t]].nbytes() + m.B[m.b_index[t]].nbytes()
    return total


def saving_breakdown(bank: MergedBank) -> dict:
    """Payload bytes saved against fp16 one-adapter-per-task, by rank/format and by sharing."""
    reference, unshared, stored = bank.reference_payload_bytes, unshared_payload_bytes(bank), bank.payload_bytes()
    saved = reference - stored
    by_rank_format, by_sharing = reference - unshared, unshared - stored
    return {
        "reference_payload_bytes": reference,
        "payload_bytes": stored,
        "saved_by_rank_and_format": by_rank_format,
        "saved_by_sharing": by_sharing,
        "share_of_saving_by_sharing": by_sharing / saved if saved > 0 else 0.0,
    }
