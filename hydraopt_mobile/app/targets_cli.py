"""Typer commands: ``hydraopt targets`` (list), ``hydraopt targets setup NAME`` and one
``hydraopt bench NAME EXPORT`` per target. The main app registers them with :func:`register`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from exporters.targets.registry import TARGETS, get_target

from .failures import reported

console = Console()
targets_app = typer.Typer(help="Device targets: list them, set them up (cached), see `hydraopt bench TARGET`.",
                          invoke_without_command=True)


@targets_app.callback()
def list_targets(ctx: typer.Context) -> None:
    """List every target: ready here or not, why, and the command that makes it ready."""
    if ctx.invoked_subcommand is not None:
        return
    for t in TARGETS.values():
        r = t.readiness()
        console.print(f"[bold]{t.name}[/]  " + ("[green]ready[/]" if r.ready else "[red]not ready[/]"), soft_wrap=True)
        console.print(f"  {t.summary}", soft_wrap=True)
        console.print(f"  {'have' if r.ready else 'why'}: {r.reason}", soft_wrap=True)
        if not r.ready:
            console.print(f"  make it ready: [bold]{r.command}[/]", soft_wrap=True)
        console.print(f"  needs: {t.needs}", soft_wrap=True)
        console.print(f"  latency: {t.latency_kind}; parity: {t.tolerance}", soft_wrap=True)
        console.print(f"  on a phone: {t.on_phone}", soft_wrap=True)
    console.print(f"cache: {next(iter(TARGETS.values())).folder().parent}")


@targets_app.command("setup")
def setup(name: str = typer.Argument(..., help="target name (see `hydraopt targets`)")) -> None:
    """Install what the target needs into its cache folder (idempotent: finished steps are skipped)."""
    try:
        target = get_target(name)
    except ValueError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        steps = target.setup()
    except Exception as e:  # a failed download or unpack: say which and stop
        console.print(f"[bold red]error:[/] setting up {name} failed: {e}")
        raise typer.Exit(1)
    r = target.readiness()
    console.print(f"{name}: {'ready' if r.ready else 'NOT ready'} ({r.reason}); "
                  f"{time.perf_counter() - t0:.1f} s; steps: {steps}; in {target.folder()}")
    if not r.ready:
        raise typer.Exit(1)


def _bench_command(name: str):
    def bench(
        exports: list[Path] = typer.Argument(..., help="export folders (hydraopt export --format onnx|executorch)"),
        tasks: Optional[list[str]] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
        n_examples: int = typer.Option(4, "--examples", help="test examples per task (emulation is slow: keep it small)"),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="cap on generated tokens (default: the suite's per task)"),
        threads: int = typer.Option(1, "--threads", help="ONNX Runtime threads on the target and on the host reference"),
        teacher_forced: bool = typer.Option(False, "--teacher-forced", help="score each reference answer in one pass: exact when "
                                            "every answer token is the argmax (for targets too slow to generate)"),
        as_json: bool = typer.Option(False, "--json", help="print the records as JSON"),
        out: Optional[Path] = typer.Option(None, "--out", help="write OUT.json and OUT.md"),
    ) -> None:
        from .targets_bench import TargetNotReady, bench_target, notes, write_reports
        from exporters.targets.protocol import RunnerError

        with reported(console, also=(TargetNotReady, RunnerError)):
            records = [r for export in exports for r in bench_target(name, export, tasks, n_examples, threads, max_new_tokens=max_new_tokens,
                                                                     teacher_forced=teacher_forced)]
            if out is not None:
                write_reports(records, out, notes(records))
        if as_json:
            print(json.dumps(records, indent=1))
        else:
            for r in records:
                console.print(f"{r['export']}/{r['task']}: tokens identical to host {r['tokens_identical']}, max logit err {r['max_logit_err']}, "
                              f"load {r['task_load_ms']:.1f} ms, switch {r['switch_ms']:.4f} ms ({r['latency_kind']})")

    bench.__doc__ = f"Run an export on {name} ({get_target(name).latency_kind}); parity vs the host, bytes, load and switch time."
    return bench


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """``targets`` on the main app, ``bench <target>`` for every target with a runner."""
    app.add_typer(targets_app, name="targets")
    for name, target in TARGETS.items():
        if target.python is not None:
            bench_app.command(name)(_bench_command(name))
