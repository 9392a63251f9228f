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
from hydraopt_mobile.errors import UserError

from .failures import report_error, reported
from .records import OUT_HELP, refuse_existing

console = Console(soft_wrap=True)  # a line of text stays one line in a pipe or a log (tables still fit the width)
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
        report_error(console, str(e))
        raise typer.Exit(2)
    t0 = time.perf_counter()
    try:
        steps = target.setup()
    except Exception as e:  # a failed download or unpack: say which and stop
        report_error(console, f"setting up {name} failed: {e}")
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
        out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    ) -> None:
        from .targets_bench import TargetNotReady, bench_target, notes, write_reports
        from exporters.targets.protocol import RunnerError

        with reported(console, also=(TargetNotReady, RunnerError)):
            refuse_existing(out, overwrite)
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


def bench_ethos_u_cmd(
    bundle: Path = typer.Argument(..., help="bundle folder written by `hydraopt merge`"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="only these tasks, run in this order (repeatable; default: every task)"),
    npus: Optional[list[str]] = typer.Option(None, "--npu", help="ethos-u55-128 | ethos-u85-256 (repeatable; default: both)"),
    quants: Optional[list[str]] = typer.Option(None, "--quant", help="a8w8 | a16w8 (repeatable; default: a8w8)"),
    layer: int = typer.Option(0, "--layer", help="which decoder layer of the base model"),
    tokens: int = typer.Option(16, "--tokens", help="sequence length the layer is compiled for"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text whose last --tokens tokens feed the layer "
                                         "(default: the first task's first test prompt for a suite task, else a fixed prompt)"),
    merged_reference: bool = typer.Option(False, "--merged-reference", help="also compile the first task folded into the weights "
                                          "(the cost reference; one more compile per NPU x quant)"),
    model: Optional[Path] = typer.Option(None, "--model", help="base model folder (default: the suite's SmolLM2-135M)"),
    threads: int = typer.Option(1, "--threads", help="torch threads for quantising and lowering"),
    as_json: bool = typer.Option(False, "--json", help="print the records as JSON"),
    out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """One decoder layer with switchable task factors on Ethos-U NPUs: an estimate, not a model.

    The layer takes the bundle's task factors as inputs and is compiled for each NPU and quant:
    Vela's cycle / SRAM / flash ESTIMATE, and per task the TOSA reference model's integer outputs
    against fp32. One layer and an estimate: no whole-model figure."""
    from .ethos_u_bench import bench_ethos_u, summary_lines, write_reports

    with reported(console):
        refuse_existing(out, overwrite)
        records, meta = bench_ethos_u(bundle, model, tasks, npus, quants, layer, tokens, prompt, merged_reference, threads)
        if out is not None:
            write_reports(records, meta, out)
    if as_json:
        print(json.dumps(records, indent=1))
    else:
        for line in summary_lines(records, meta):
            console.print(line, soft_wrap=True, markup=False, highlight=False)


def bench_qnn_htp_cmd(
    exports: list[Path] = typer.Argument(..., help="ONNX export folders (hydraopt export --format onnx); with a bank and "
                                         "one-adapter-per-task (--method none) the records carry the drop between them"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="only these tasks (repeatable; default: every task of the first export)"),
    n_examples: int = typer.Option(4, "--examples", help="test examples per task: the first whose prompt and answer fit --past and --seq"),
    past: int = typer.Option(120, "--past", help="static KV cache: prompts up to past + 1 tokens"),
    seq: int = typer.Option(8, "--seq", help="static step: answers with their end-of-turn token up to seq tokens"),
    quants: Optional[list[str]] = typer.Option(None, "--quant", help="a16w8 | a8w8 (repeatable; default: a16w8)"),
    archs: Optional[list[str]] = typer.Option(None, "--arch", help="htp_arch to compile an offline context binary for, e.g. 73, 75, 79 "
                                              "(repeatable; first export only; default: none)"),
    minutes: float = typer.Option(60.0, "--minutes", help="per export, start no new example after this many minutes (one step of a "
                                  "135M model takes 1-2 minutes on the emulator)"),
    jobs: int = typer.Option(1, "--jobs", help="exports run side by side"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="where the QDQ graphs and checkpoints go (default: a temporary folder)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the exports' base model folder, for its RoPE base (default: the suite's SmolLM2-135M)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    out: Optional[Path] = typer.Option(None, "--out", help=OUT_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Task scores of ONNX exports on the emulated Hexagon NPU (QDQ A16W8), teacher-forced.

    Every node runs on HTP: each example's prompt cache is prefilled on the CPU (labelled), its
    answer rows on HTP; parity with the host's fp32 export on the same examples, bytes, task load.
    Emulated: no phone latency."""
    import sys
    import tempfile

    from .qnn_bench import HtpRun, bench_qnn_htp, rope_theta, write_reports

    with reported(console):
        refuse_existing(out, overwrite)
        target = get_target("qnn-htp")
        if not (ready := target.readiness()).ready:
            raise UserError(f"qnn-htp: not ready ({ready.reason}); run: {ready.command}")
        run = HtpRun(examples=n_examples, past=past, seq=seq, quants=tuple(quants or ("a16w8",)), archs=tuple(archs or ()),
                     minutes=minutes, jobs=jobs)
        with tempfile.TemporaryDirectory(prefix="hydraopt-qnn-bench-") as tmp:
            result = bench_qnn_htp(exports, run, workdir or Path(tmp), tasks, theta=rope_theta(model))
        result["notes"]["command"] = " ".join(["hydraopt bench qnn-htp", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "qnn-htp"] else "hydraopt bench qnn-htp"
        if out is not None:
            write_reports(result, out, "qnn-htp: exports on the emulated Hexagon NPU (whole model, every node on HTP), task scores")
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        for r in result["records"]:
            drop = r.get("drop_points")
            console.print(f"{r['export']} ({r['method']}, {r['quant']}): score {r['score']:.1f} on HTP, {r['score_host']:.1f} on the host's fp32 "
                          f"export ({r['n_examples']} examples, {r['tasks']} tasks); max logit err {r['max_logit_err']:.3g}, top-1 agreement "
                          f"{r['token_agreement']:.3f}" + (f"; drop vs one-per-task {drop['drop_points']:+.2f} on HTP, "
                                                           f"{r['host_drop_points']['drop_points']:+.2f} on the host" if drop else "")
                          + " (emulated)", soft_wrap=True, markup=False, highlight=False)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """``targets`` on the main app, ``bench <target>`` for every target with a runner, ``bench qnn-htp``
    (teacher-forced on static shapes: no protocol runner) and ``bench ethos-u`` (no runner: it compiles
    one layer of a bundle and reads Vela's estimate)."""
    app.add_typer(targets_app, name="targets")
    for name, target in TARGETS.items():
        if target.python is not None:
            bench_app.command(name)(_bench_command(name))
    bench_app.command("qnn-htp")(bench_qnn_htp_cmd)
    bench_app.command("ethos-u")(bench_ethos_u_cmd)
