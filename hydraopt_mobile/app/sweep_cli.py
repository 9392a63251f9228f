"""``hydraopt sweep``: which budget to merge at, judged on the user's own texts (sweep.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hydraopt_mobile.atomic import check_output
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.merge.budget import Budget

from .failures import reported
from .progress import advancing, appearing

console = Console(soft_wrap=True)


def sweep(
    adapters: list[str] = typer.Argument(..., help="adapter folders, PATH or NAME=PATH"),
    texts: Path = typer.Option(..., "--texts", help="a folder of <task>.jsonl texts to measure on, like the app's for each task, no labels: {\"prompt\": ..., \"completion\": ...} per line compares the completion's tokens (an answer), {\"text\": ...} every token; `hydraopt suite calibration` writes the suite's"),
    out: Path = typer.Option(..., "--out", help="folder to write sweep.json, sweep.md and sweep.png into"),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="comma-separated budgets as for merge --budget (0.05, 12MB, ...); default: 0.5, 1, 2 and 4 times one merged adapter's bytes (1/T of the fp16 adapters' files)"),
    method: list[str] = typer.Option([], "--method", help="merge method (repeatable; default: hydraopt and per-task): budgeted ones (hydraopt, per-task, compeft) at every budget, the others (knots, ties, ...: one merged adapter) once at their own storage"),
    fmt: Optional[str] = typer.Option(None, "--format", help="fp16 | int8 | int4 for every bank (default: the planner chooses per module)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="merge under the data-aware objective with these texts (as merge --calibration); other texts than --texts, or the KL is measured on what the merge fitted"),
    model: Optional[Path] = typer.Option(None, "--model", help="base model folder the adapters were trained on (default: the packaged SmolLM2-135M)"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="treat modules an adapter lacks as zero updates"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Merge at several budgets and show how close each bank stays to the adapters on your texts."""
    from hydraopt_mobile.adapters import load_adapter_set, parse_task_spec
    from hydraopt_mobile.calibration import collect, read_texts
    from hydraopt_mobile.formats import NumberFormat
    from hydraopt_mobile.suite.model import load_base_model
    from hydraopt_mobile.sweep import DEFAULT_METHODS, SWEEP, default_budgets, sweep as run_sweep, write_sweep

    with reported(console):
        inputs = [parse_task_spec(spec)[1] for spec in adapters]
        check_output(out, overwrite, SWEEP, inputs)  # before the merges and the passes through the model
        if calibration is not None and calibration.resolve() == texts.resolve():
            raise UserError(f"--calibration and --texts are the same folder ({texts}): the KL would be measured on the texts the merge fitted; give other texts to one of them")
        start = time.perf_counter()
        adapter_set = load_adapter_set(adapters, allow_missing)
        chosen = list(dict.fromkeys(Budget.parse(b, "--budgets") for b in budgets.split(","))) if budgets is not None else default_budgets(len(adapter_set.task_names))
        measured_on = read_texts(texts, adapter_set.task_names, "--texts")
        with console.status("loading the base model"):
            lm, tokenizer = load_base_model(model)
        calib = None
        if calibration is not None:
            calib_texts = read_texts(calibration, adapter_set.task_names)
            with console.status(f"calibration: {sum(map(len, calib_texts.values()))} texts through the base model"):
                calib = collect(lm, tokenizer, adapter_set, calib_texts)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            points = run_sweep(adapter_set, method or DEFAULT_METHODS, chosen, lm, tokenizer, measured_on, NumberFormat(fmt) if fmt is not None else None, calib,  # type: ignore[arg-type]
                               on_step=advancing(bar, bar.add_task("merges: modules", total=None)),
                               on_task=appearing(bar, "closeness to the adapters: tasks"))
        write_sweep(points, adapter_set, measured_on, out, overwrite, inputs, calibrated=calib is not None, seconds=time.perf_counter() - start)
    table = Table(title=f"each task's bank against its own adapter, {sum(map(len, measured_on.values()))} texts", caption="KL: mean over tasks (lower is closer); same token: positions where bank and adapter predict the same next token")
    for column in ("method", "budget", "bytes", "storage", "shares", "KL", "worst task", "same token"):
        table.add_column(column, justify="left" if column in ("method", "budget", "shares", "worst task") else "right")
    for p in points:
        if p.infeasible is not None:
            table.add_row(p.method, p.budget, "", "", "", "[yellow]infeasible[/]", "", "")
            continue
        table.add_row(p.method, p.budget, f"{p.file_bytes:,}", f"{p.storage_fraction:.4f}", "yes" if p.shares_factors else "no", f"{p.mean_kl:.3g}", p.worst_task, f"{p.mean_agreement:.1%}")
    console.print(table)
    for p in points:
        if p.infeasible is not None:
            console.print(f"{p.method} at {p.budget}: {p.infeasible}", highlight=False)
    console.print(f"wrote {out}/sweep.json, sweep.md, sweep.png (each task's KL and agreement) in {time.perf_counter() - start:.0f} s", highlight=False)
    console.print(f"next: hydraopt merge {adapters[0] if len(adapters) == 1 else 'ADAPTERS...'} --method METHOD --budget BUDGET --out BUNDLE (the row you choose)", highlight=False)
