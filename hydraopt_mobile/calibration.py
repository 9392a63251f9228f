"""Calibration for the data-aware objective: each task's input second moments at the adapted Linears,
projected into the factored space.

The data-aware merge minimises ``sum_t w_t ||(dW_t - dW^_t) X_t^T||^2`` where ``X_t`` (n_t x d_in)
holds the inputs that task ``t``'s prompts give the module (METHOD.md). The solver keeps every
shared A inside ``span(Q)``, the orthonormal row basis of the stacked A's (factored.py), so with
``dW_t - dW^_t = E_t Q^T`` the objective is ``tr(E_t (Q^T S_t Q) E_t^T)``, ``S_t = X_t^T X_t``: only
the q x q matrix ``Q^T S_t Q`` per task is needed, never a d_in x d_in one. The part of a stored
(quantised) A outside ``span(Q)`` is priced with ``S_t``'s mean eigenvalue outside ``span(Q)``
(``outside``), its coupling to ``span(Q)`` neglected: it is quantisation noise, small and
unstructured. Moments are means over tokens (``S_t / n_t``), so a task's number of prompts or
their length does not weigh it; ``w_t`` (1 / the task's ``||dW_t X_t^T||^2`` summed over modules)
then makes every task count the same.

Each task's moment at a module is then scaled to mean eigenvalue 1 (trace ``d_in``, as ``X_t = I``
has): the inputs say which *directions* matter within a module, not how much a module matters
against the others. Why: the adapted Linears read RMSNorm outputs whose scale grows with depth
(SmolLM2's q/v inputs: median squared norm per token 1.4 at layer 0, 21 at layer 1, 86 at layer 29;
benchmarks/results/input_scale.md), so raw moments weighed modules up to 52x apart and the planner
starved the shallow ones; the
banks it gave were 1.8-4.5x further from their adapters end to end (mean KL of next-token
distributions, fidelity.py) than the data-free ones on the suite, and with the scaling 0.83-1.23x
(benchmarks/RESULTS.md, "Storage vs score"). The scale factor depends only on the full trace, so
:func:`restrict` keeps it.

Inputs are collected with forward pre-hooks on the *base* model's target Linears (one pass over a
few prompts per task; padding positions are left out). Texts come from ``DIR/<task>.jsonl``, one
``{"text": ...}`` (or ``{"prompt": ..., "completion": ...}``, read as one text) object per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hydraopt_mobile.adapter_weights import check_fits
from hydraopt_mobile.adapters import AdapterSet
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.factored import DTYPE, factor_space


@dataclass
class ModuleMoments:
    """One module's projected second moments, per task."""

    S: torch.Tensor  # (T, q, q): Q^T (X_t^T X_t / n_t) Q
    outside: torch.Tensor  # (T,): mean eigenvalue of X_t^T X_t / n_t on the complement of span(Q)


@dataclass
class Calibration:
    tasks: list[str]
    tokens: dict[str, int]  # calibration tokens per task
    modules: dict[str, ModuleMoments]

    def update_sq_norms(self, adapters: AdapterSet) -> torch.Tensor:
        """Per task, ``sum over modules ||dW_t X_t^T||^2 / n_t`` (the inverse of its weight)."""
        totals = torch.zeros(len(adapters.tasks), dtype=torch.float64)
        for name in adapters.module_names:
            fm = factor_space(adapters.factors(name), self.modules[name])
            totals += fm.sq_norms.double()
        return totals


def relative_errors(bank: MergedBank, adapters: AdapterSet, calibration: Calibration, modules: list[str] | None = None) -> dict[str, float]:
    """Per task ``sqrt(sum_m ||(dW_t - dW^_t) X_t^T||^2 / sum_m ||dW_t X_t^T||^2)`` over ``modules``
    (default all): the data-aware counterpart of :meth:`MergedBank.relative_errors`."""
    from hydraopt_mobile.merge.solver import stored_error

    T = len(adapters.tasks)
    err, ref = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for name in modules or adapters.module_names:
        fm = factor_space(adapters.factors(name), calibration.modules[name])
        err += stored_error(fm, torch.ones(T, dtype=DTYPE), bank.modules[name]).double()
        ref += fm.sq_norms.double()
    return {task: float((err[t] / ref[t]).sqrt()) if ref[t] > 0 else 0.0 for t, task in enumerate(adapters.task_names)}


Text = str | tuple[str, str]
"""A text, or a ``(prompt, completion)`` pair: calibration reads the two as one text; the fidelity
measure (fidelity.py) compares the next tokens of the completion only, given the prompt."""


def full_text(text: Text) -> str:
    return text if isinstance(text, str) else text[0] + text[1]


def read_texts(folder: Path, tasks: list[str], option: str = "--calibration") -> dict[str, list[Text]]:
    """``folder/<task>.jsonl`` for every task, at least one row: ``{"text": "..."}`` or
    ``{"prompt": "...", "completion": "..."}`` per line. ``option``: the command-line option that
    named ``folder``, for the errors."""
    out = {}
    for task in tasks:
        path = Path(folder) / f"{task}.jsonl"
        if not path.is_file():
            raise UserError(f"{option} {folder}: no {path.name} for task {task!r} (one JSONL file of texts per task)")
        texts: list[Text] = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
            keys = set(row) & {"text", "prompt", "completion"} if isinstance(row, dict) else set()
            if keys == {"text"} and isinstance(row["text"], str) and row["text"]:
                texts.append(row["text"])
            elif keys == {"prompt", "completion"} and isinstance(row["prompt"], str) and isinstance(row["completion"], str) and row["completion"]:
                texts.append((row["prompt"], row["completion"]))
            else:
                raise UserError(f'{path}:{n}: expected {{"text": non-empty string}} or {{"prompt": string, "completion": non-empty string}}')
        if not texts:
            raise UserError(f"{path}: no texts")
        out[task] = texts
    return out


@torch.no_grad()
def collect(model: torch.nn.Module, tokenizer, adapters: AdapterSet, texts: dict[str, list[Text]], batch_size: int = 16, max_tokens: int = 256) -> Calibration:
    """Run each task's texts through the base ``model`` and project the target Linears' input
    second moments onto each module's ``span(Q)`` (the same Q the solver builds)."""
    check_fits(model, adapters, "calibration")
    names = adapters.module_names
    bases = {name: factor_space(adapters.factors(name)).basis() for name in names}
    T = len(adapters.tasks)
    S = {name: torch.zeros(T, Q.shape[1], Q.shape[1], dtype=torch.float64) for name, Q in bases.items()}
    trace = {name: torch.zeros(T, dtype=torch.float64) for name in names}
    tokens = torch.zeros(T, dtype=torch.float64)
    state: dict = {}

    def hook(name: str):
        def pre(_module, args):
            x = args[0][state["mask"]].to(torch.float64)  # (tokens, d_in), padding left out
            xq = x @ bases[name].to(torch.float64)
            S[name][state["t"]] += xq.T @ xq
            trace[name][state["t"]] += (x * x).sum()

        return pre

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for t, task in enumerate(adapters.task_names):
            state["t"] = t
            for i in range(0, len(texts[task]), batch_size):
                enc = tokenizer([full_text(x) for x in texts[task][i : i + batch_size]], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens, add_special_tokens=False)
                state["mask"] = enc.attention_mask.bool()
                model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
                tokens[t] += float(enc.attention_mask.sum())
    finally:
        for h in handles:
            h.remove()
    modules = {}
    for name, Q in bases.items():
        d_in, q = Q.shape
        inside = torch.diagonal(S[name], dim1=1, dim2=2).sum(1)
        outside = ((trace[name] - inside) / max(d_in - q, 1)).clamp_min(0) if d_in > q else torch.zeros(T, dtype=torch.float64)
        total = inside + outside * (d_in - q)  # the trace of X_t^T X_t
        scale = torch.where(total > 0, d_in / total.clamp_min(1e-300), torch.ones_like(total))  # mean eigenvalue 1 (module docstring)
        modules[name] = ModuleMoments(S=(S[name] * scale.view(-1, 1, 1)).to(DTYPE), outside=(outside * scale).to(DTYPE))
    return Calibration(tasks=list(adapters.task_names), tokens={task: int(tokens[t]) for t, task in enumerate(adapters.task_names)}, modules=modules)


def restrict(calibration: Calibration, adapters: AdapterSet, subset: AdapterSet) -> Calibration:
    """``calibration`` (collected for ``adapters``) for ``subset``, some of its tasks, without another
    pass through the model. The subset's row basis ``Q'`` lies in ``span(Q)`` (its A's are some of
    the stacked rows), so ``Q' = Q P`` with ``P = Q^T Q'`` and ``Q'^T S Q' = P^T (Q^T S Q) P``; the
    trace of ``S`` is what ``span(Q)`` holds plus ``outside`` times its complement's dimension, and
    ``outside'`` spreads what ``span(Q')`` does not hold over the complement of ``span(Q')``. Exact,
    up to rounding, as collecting the subset's moments directly (tests/test_calibration.py)."""
    index = {task: t for t, task in enumerate(calibration.tasks)}
    if calibration.tasks != adapters.task_names or any(task not in index for task in subset.task_names):
        raise ValueError(f"restrict: moments of {calibration.tasks}, adapters {adapters.task_names}, subset {subset.task_names}")
    rows = torch.tensor([index[task] for task in subset.task_names])
    modules = {}
    for name in subset.module_names:
        Q, Qs = (factor_space(s.factors(name)).basis().to(torch.float64) for s in (adapters, subset))
        P = Q.T @ Qs
        if not torch.allclose(Q @ P, Qs, atol=1e-4):  # bases from float32 QRs
            raise ValueError(f"restrict: {name}: the subset's row space is not inside the set's (rank-deficient A's)")
        d_in, q, qs = Q.shape[0], Q.shape[1], Qs.shape[1]
        m = calibration.modules[name]
        S = m.S[rows].to(torch.float64)
        inner = P.T @ S @ P
        total = torch.diagonal(S, dim1=1, dim2=2).sum(1) + m.outside[rows].to(torch.float64) * (d_in - q)
        outside = ((total - torch.diagonal(inner, dim1=1, dim2=2).sum(1)) / max(d_in - qs, 1)).clamp_min(0) if d_in > qs else torch.zeros(len(rows), dtype=torch.float64)
        modules[name] = ModuleMoments(S=inner.to(DTYPE), outside=outside.to(DTYPE))
    return Calibration(tasks=list(subset.task_names), tokens={task: calibration.tokens[task] for task in subset.task_names}, modules=modules)


def identity(adapters: AdapterSet) -> Calibration:
    """``X_t^T X_t / n_t = I`` for every task and module: the data-aware objective then equals the data-free one."""
    modules = {}
    for name in adapters.module_names:
        q = factor_space(adapters.factors(name)).q
        T = len(adapters.tasks)
        modules[name] = ModuleMoments(S=torch.eye(q, dtype=DTYPE).expand(T, q, q).clone(), outside=torch.ones(T, dtype=DTYPE))
    return Calibration(tasks=list(adapters.task_names), tokens={t: 0 for t in adapters.task_names}, modules=modules)
