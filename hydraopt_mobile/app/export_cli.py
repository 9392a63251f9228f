"""Typer commands ``export``, ``run`` and ``bench host``; the main ``hydraopt`` app registers them:

    app.command("export")(export_cli.export)
    app.command("run")(export_cli.run)
    app.add_typer(export_cli.bench_app, name="bench")
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from exporters.registry import BACKENDS

from hydraopt_mobile.errors import UserError

from .failures import reported
from .records import OUT_HELP, refuse_existing

console = Console(soft_wrap=True)  # a line of text stays one line in a pipe or a log (tables still fit the width)
FORMAT_HELP = " | ".join(BACKENDS)
# one recipe per line (typer keeps a line break where the help has a blank line)
QUANT_HELP = "the base weights' number format, by --format:\n\n" + "\n\n".join(
    f"{name} [bold]{q}[/]: {desc}" for name, b in BACKENDS.items() for q, desc in b.quants.items())
bench_app = typer.Typer(help="Measure exports on the real runtimes.", no_args_is_help=True)


def export(
    bundle: Path = typer.Argument(..., help="bundle folder written by `hydraopt merge`"),
    model: Optional[Path] = typer.Option(None, "--model", help="Hugging Face model folder (default: the suite's SmolLM2-135M)"),
    fmt: str = typer.Option("executorch", "--format", help=FORMAT_HELP),
    quant: str = typer.Option("fp32", "--quant", help=QUANT_HELP),
    out: Path = typer.Option(..., "--out", help="export folder to create"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    merged_task: Optional[str] = typer.Option(None, "--merged-task", help="fold this task's adapter into the weights instead (reference deployment)"),
    max_cache_len: int = typer.Option(256, "--max-cache-len", help="ExecuTorch static KV cache length (prompt + generated tokens)"),
    slots: Optional[str] = typer.Option(
        None, "--slots",
        help="the program's slot signature, so later banks fit the same program: comma-separated module names, each "
        "optionally ':RANK'; a name without a rank takes the next one's (q_proj,v_proj:16 or q_proj:16,v_proj:8); "
        "default: the bank's own modules and ranks",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="lower the program even if a cached one has the same signature"),
    attention: Optional[str] = typer.Option(
        None, "--attention",
        help="ExecuTorch only: custom-ops (default: ExecuTorch's llama::update_cache and llama::custom_sdpa kernels, "
        "fast decode; the runtime needs ExecuTorch's LLM custom ops) | portable (standard aten ops, any ExecuTorch runtime)",
    ),
) -> None:
    """Export a bundle: one program whose task switches at run time, plus the bank's files.

    The program is cached by base model, quant and slot signature and reused when they match; the
    bank's own files are the data a device loads (shared once, a task's on a switch)."""
    from exporters.export import export_bank

    if model is None:
        from hydraopt_mobile.suite.model import base_model_dir

        model = base_model_dir()
    with reported(console):  # OSError: atomic.OutputError and unreadable inputs, one line
        path = export_bank(bundle, model, fmt, quant, out, overwrite=overwrite, merged_task=merged_task,
                           max_cache_len=max_cache_len, slots=slots, use_cache=not no_cache, attention=attention)
    from exporters.manifest import Manifest

    m = Manifest.read(path)
    console.print(
        f"wrote {path}: {m.runtime}/{m.quant}, {len(m.tasks)} task{'' if len(m.tasks) == 1 else 's'}, program {m.extra['program_source']}, "
        f"resident {m.resident_bytes() / 1e6:.1f} MB, task files {m.bytes_of('task') / 1e3:.1f} KB in all"
    )
    console.print(f"next: hydraopt run {path} \"PROMPT\" (each task's answer), hydraopt bench host {path} (scores, parity, latency), "
                  f"hydraopt inspect {path}", highlight=False)


def run(
    export: Path = typer.Argument(..., help="export folder written by `hydraopt export`"),
    prompt: str = typer.Argument(..., help="the user message (in the model's chat template unless --raw); - reads it from standard input"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="answer with this task (repeatable, in this order; default: every task of the export)"),
    system: Optional[str] = typer.Option(None, "--system", help="a system message before the prompt (the suite's adapters were trained with their task's instruction there)"),
    suite: bool = typer.Option(False, "--suite-instructions", help="each suite task's instruction as its system message, as its adapter was trained (PROMPT: Armenia, Saint Helena Pound, a message to classify)"),
    raw: bool = typer.Option(False, "--raw", help="feed PROMPT as it is, without the chat template"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="stop after this many tokens (or at the end-of-sequence token)"),
    threads: int = typer.Option(1, "--threads", help="runtime threads"),
    as_json: bool = typer.Option(False, "--json", help="print the answers and timings as JSON"),
) -> None:
    """Answer a prompt with an export on its runtime, each task in turn, switching in place.

    One session: the program loads once; each task's file is read, checked and decoded on its
    first use, as in the app. Timings are this machine's, not a phone's."""
    from exporters.runtime import answer_tasks
    from hydraopt_mobile.suite.prompts import suite_instructions

    with reported(console):
        if prompt == "-":
            prompt = sys.stdin.read().strip()
            if not prompt:
                raise UserError("PROMPT -: standard input was empty")
        if suite:
            if system is not None or raw:
                raise UserError("--suite-instructions gives each task's system message in the chat template: not with --system or --raw")
            from exporters.manifest import Manifest

            system = suite_instructions(tasks or Manifest.read(export).tasks)
        records = answer_tasks(export, prompt, tasks, system, raw, max_new_tokens, threads)
    if as_json:
        print(json.dumps(records, indent=1))
        return
    from rich.table import Table

    table = Table("task", "answer", "switch ms", "prefill ms", "decode ms/token",
                  caption="switch: the task's first use (read, check, decode its file); host timings, not a phone's")
    for r in records:
        per_token = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.1f}"
        table.add_row(r["task"], r["answer"], f"{r['switch_ms']:.2f}", f"{r['prefill_ms']:.1f}", per_token)
    console.print(table)


@bench_app.command("host")
def bench_host_cmd(
    exports: list[Path] = typer.Argument(..., help="export folders"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the records as JSON"),
    out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    n_examples: int = typer.Option(20, "--examples", help="test examples per task"),
    model: Optional[Path] = typer.Option(None, "--model", help="base model folder for the PyTorch reference"),
    threads: int = typer.Option(1, "--threads", help="runtime and torch threads"),
) -> None:
    """Bytes, score from the runtime's own outputs, parity vs PyTorch, switch and decode latency, RSS."""
    from .bench import bench_host

    with reported(console):
        refuse_existing(out, overwrite)
        records = bench_host(exports, tasks=tasks, json=out, model_dir=model, n_examples=n_examples, threads=threads)
    if as_json:
        print(json.dumps(records, indent=1))
    else:
        from .bench_report import summary_table
        from .records import print_unwrapped

        print_unwrapped(summary_table(records), console)
