"""The ``hydraopt`` command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from hydraopt_mobile.atomic import check_output
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.merge.budget import Budget

from .failures import reported
from .progress import progress_bar
from .sweep_cli import sweep

# The library (torch, safetensors) loads inside the commands that use it, so `hydraopt --help` and
# every command's --help answer at once (tests/test_cli_startup.py).
if TYPE_CHECKING:
    from hydraopt_mobile.merge.registry import MergeConfig
    from hydraopt_mobile.objective_choice import ObjectiveChoice


class _HelpAwareGroup(TyperGroup):
    """Notes whether the command line asks for a help page anywhere: click runs the app's callback
    (which sets torch's threads, importing torch) before a subcommand reads its own --help."""

    ASKS_HELP = "hydraopt.asks_help"

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[self.ASKS_HELP] = any(arg in ctx.help_option_names for arg in args)
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_HelpAwareGroup, help="Merge many LoRA task adapters of one LLM into shared factors + switchable per-task tensors.", no_args_is_help=True)
console = Console(soft_wrap=True)  # a line of text stays one line in a pipe or a log (tables still fit the width)


# what a bug report needs beside our version: the libraries that lower, run and load the programs
RUNTIME_PACKAGES = ("torch", "torchao", "executorch", "onnx", "onnxruntime", "transformers", "peft", "safetensors")


def _print_version(asked: bool) -> None:
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version
    from platform import python_version

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    print(f"hydraopt-mobile {version('hydraopt-mobile')} (Python {python_version()}; {', '.join(map(installed, RUNTIME_PACKAGES))})")
    raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the versions of hydraopt-mobile and the libraries it runs on, then exit"),
    threads: int = typer.Option(0, "--threads", envvar="HYDRAOPT_THREADS", help="torch CPU threads; 0: the cores not already busy (oversubscribed cores run many times slower)"),
    verbose: bool = typer.Option(False, "--verbose", help="also show third-party warnings and log messages"),
) -> None:
    if not verbose:
        from .quiet import silence_third_party

        silence_third_party()
    if ctx.meta.get(_HelpAwareGroup.ASKS_HELP):
        return  # a help page needs no torch
    from .threads import torch_threads

    ctx.with_resource(torch_threads(threads))  # for the command's duration



@app.command()
def methods() -> None:
    """List the merge methods in the registry, with parameters and references."""
    from hydraopt_mobile.merge.registry import METHODS

    table = Table("method", "what it does", "parameters (default)", "storage", "reference")
    for m in METHODS.values():
        params = ", ".join(f"{p.name}={p.default}" for p in m.parameters()) or "-"
        table.add_row(m.name, m.summary, params, "--budget" if m.budgeted else "fixed", m.reference)
    console.print(table)


@app.command()
def analyze(
    adapters: list[str] = typer.Argument(..., help="adapter folders, PATH or NAME=PATH"),
    out: Path = typer.Option(..., "--out", help="output folder (similarity.json + heatmap PNGs)"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="treat modules an adapter lacks as zero updates"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Similarity of the adapters' A's and B's, raw and rotation-invariant, per module and layer type."""
    from hydraopt_mobile.adapters import load_adapter_set
    from hydraopt_mobile.analysis import METRICS, write_analysis

    with reported(console), progress_bar("similarity: modules", console) as on_step:
        result = write_analysis(load_adapter_set(adapters, allow_missing), out, overwrite, on_step)
    table = Table("layer type", *METRICS, title="mean off-diagonal similarity between tasks")
    for lt, vals in result["summary"].items():
        table.add_row(lt, *(f"{vals[m]:.3f}" for m in METRICS))
    console.print(table)
    console.print(f"wrote {out}/similarity.json and heatmaps")


def _parse_params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--param {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


@app.command("merge")
def merge_cmd(
    adapters: list[str] = typer.Argument(..., help="adapter folders, PATH or NAME=PATH"),
    method: str = typer.Option("hydraopt", "--method", help="see `hydraopt methods`"),
    budget: Optional[str] = typer.Option(None, "--budget", help="hydraopt / per-task: 0.5 = half the file bytes of all adapters in fp16; or 12MB (file bytes, headers included)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="fp16 | int8 | int4 (hydraopt: default lets the planner choose)"),
    group_size: int = typer.Option(32, "--group-size", help="int4 group size: 32, 64 or 128"),
    param: list[str] = typer.Option([], "--param", help="method parameter KEY=VALUE (repeatable)"),
    out: Path = typer.Option(..., "--out", help="bundle folder to write"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="hydraopt / per-task: a folder of <task>.jsonl texts ({\"text\": ...} or {\"prompt\": ..., \"completion\": ...} per line; `hydraopt suite calibration` writes the suite's): the data-aware objective"),
    model: Optional[Path] = typer.Option(None, "--model", help="base model folder for --calibration (default: the packaged SmolLM2-135M)"),
    choose: Optional[str] = typer.Option(None, "--choose", help="with --calibration: data-aware (default) = the data-aware plan as is; kl = build the data-aware and the data-free plan and keep the bank closer to the adapters on the texts (KL of next-token distributions; about 4x the time)"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="treat modules an adapter lacks as zero updates"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Merge adapters into a bundle."""
    from hydraopt_mobile.adapters import load_adapter_set, parse_task_spec
    from hydraopt_mobile.bundle import BUNDLE
    from hydraopt_mobile.formats import NumberFormat
    from hydraopt_mobile.merge.registry import MergeConfig, merge_to_bundle

    with reported(console):
        inputs = [parse_task_spec(spec)[1] for spec in adapters]
        check_output(out, overwrite, BUNDLE, inputs)  # before the merge work
        config = MergeConfig(
            method=method,
            fmt=NumberFormat(fmt, group_size) if fmt is not None else None,  # type: ignore[arg-type]
            budget=Budget.parse(budget) if budget is not None else None,
            group_size=group_size,
            params=_parse_params(param),
        )
        adapter_set = load_adapter_set(adapters, allow_missing, lazy=True)  # modules read as the merge reaches them
        if calibration is None:
            if choose is not None:
                raise UserError("--choose applies with --calibration (it picks between the data-aware and the data-free plan)")
            with progress_bar(f"{method}: modules", console) as on_step:
                merge_to_bundle(adapter_set, config, out, on_step, overwrite, inputs)
        else:
            from hydraopt_mobile.objective_choice import ObjectiveChoice

            _merge_calibrated(adapter_set, config, calibration, model, ObjectiveChoice(choose) if choose is not None else ObjectiveChoice(), out, overwrite, inputs)  # type: ignore[arg-type]
    _print_inspect(out)
    console.print(f"next: hydraopt export {out} --format onnx|executorch --out EXPORT (a program whose task switches at run time), "
                  f"hydraopt unpack {out} --task TASK --out DIR (one task as a PEFT adapter)", highlight=False)


app.command("sweep")(sweep)


def _merge_calibrated(adapter_set, config: "MergeConfig", folder: Path, model_dir: Optional[Path], choice: "ObjectiveChoice", out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """The tasks' input moments from ``folder``'s texts (calibration.py), the merge, and the plan
    kept as ``choice`` says (objective_choice.py)."""
    from hydraopt_mobile.bundle import write_bundle
    from hydraopt_mobile.calibration import collect, full_text, read_texts
    from hydraopt_mobile.merge.registry import DEFAULT_BUDGET, METHODS, get_method
    from hydraopt_mobile.objective_choice import merge_choosing
    from hydraopt_mobile.suite.model import load_base_model

    if not get_method(config.method).data_aware:  # before the pass through the model, which takes minutes
        raise UserError(f"--calibration applies to {', '.join(m.name for m in METHODS.values() if m.data_aware)}; {config.method!r} does not use data")
    texts = {task: [full_text(x) for x in rows] for task, rows in read_texts(folder, adapter_set.task_names).items()}  # one text per row, as the frontier's KL choice measured
    with console.status(f"calibration: {sum(map(len, texts.values()))} texts through the base model"):
        lm, tokenizer = load_base_model(model_dir)
        config = dataclasses.replace(config, calibration=collect(lm, tokenizer, adapter_set, texts))
    what = "modules under both objectives, then tasks' KL to their adapters" if choice.by == "kl" else "modules"
    with progress_bar(f"{config.method}: {what}", console) as on_step:  # one bar: rich shows one live display at a time
        [bank] = merge_choosing(adapter_set, config, [config.budget or DEFAULT_BUDGET], lm, tokenizer, texts, choice, on_step, on_step)
    if isinstance(bank, Exception):
        raise bank
    kept = bank.params.get("choice")
    if kept:
        kl = kept["mean_kl"]
        console.print(f"kept the {kept['kept']} plan: mean KL to the adapters on the calibration texts {kl['data-aware']:.4g} (data-aware) vs {kl['data-free']:.4g} (data-free)")
    write_bundle(bank, out, overwrite, inputs)


def _print_inspect(path: Path) -> None:
    from .inspect_bundle import inspect_bundle

    info = inspect_bundle(path)
    b, s = info["bytes"], info["saving"]
    params = "".join(f"; {k} {', '.join(map(str, v)) if isinstance(v, list) else json.dumps(v) if isinstance(v, dict) else v}" for k, v in info["params"].items())
    console.print(f"[bold]{info['bundle']}[/]: method {info['method']}{params}; {len(info['tasks'])} tasks, {info['n_modules']} modules", highlight=False)
    console.print(f"plan: [bold]{info['plan']}[/]; " + ", ".join(f"{k} x{v}" for k, v in info["layout_summary"]["sharing"].items()))
    console.print("layouts: " + "; ".join(f"{k} x{v}" for k, v in info["layouts"].items()))
    fraction = "-" if info["storage_fraction"] is None else f"{info['storage_fraction']:.4f}"  # no reference recorded
    console.print(
        f"storage: {info['file_bytes']:,} file bytes (shared {b['shared']:,}, per task {sum(b['per_task'].values()):,} in all) = "
        f"{fraction} of fp16 one-adapter-per-task ({info['reference_file_bytes']:,} file bytes); manifest {b['manifest']:,} bytes"
    )
    saved = s["saved_by_rank_and_format"] + s["saved_by_sharing"]
    if saved > 0:
        console.print(
            f"saved {saved:,} payload bytes: {s['saved_by_rank_and_format']:,} by rank/format, {s['saved_by_sharing']:,} by sharing "
            f"({100 * s['share_of_saving_by_sharing']:.1f} % of the saving)"
        )
    table = Table("task", "task file bytes", "rel. error ||dW-dW^||/||dW||")
    for t in info["tasks"]:
        err = info["rel_errors"].get(t)
        table.add_row(t, f"{b['per_task'][t]:,}", "-" if err is None else f"{err:.4f}")
    console.print(table)


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="a bundle (hydraopt merge) or an export (hydraopt export)"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Show a bundle's tasks, layouts, bytes on disk and per-task error, or an export's.

    For a bundle: its tasks, layouts, exact bytes on disk and each task's reconstruction error. For
    an export: its program and files first, then the same of the bundle inside it."""
    from .inspect_bundle import inspect_bundle, inspect_export, is_export

    with reported(console):
        export = is_export(bundle)
        info = inspect_export(bundle) if export else inspect_bundle(bundle)
        if as_json:
            print(json.dumps(info, indent=1))
            return
        if export:
            b = info["bytes"]
            console.print(f"[bold]{info['export']}[/]: export {info['export_id']}, {info['runtime']}/{info['quant']}, {len(info['tasks'])} task{'' if len(info['tasks']) == 1 else 's'}, "
                          f"slots {_signature_summary(info['slot_signature'])}, "
                          f"program {info['program_source']}", soft_wrap=True)
            bank = (f"the bank inside it, {bundle / 'bank'}" if info["slot_signature"] else
                    f"its task is merged into the weights; the bank it came from, kept as the reference for `bench host`, {bundle / 'bank'}")
            console.print(f"resident {b['resident']:,} bytes (program {b['program']:,}, shared factors {b['shared']:,}); "
                          f"task files {sum(b['per_task'].values()):,} bytes in all; {bank}:", soft_wrap=True)
        _print_inspect(bundle / "bank" if export else bundle)


def _signature_summary(signature: dict[str, int]) -> str:
    """``q_proj: rank 2-4 (30), v_proj: rank 1-2 (30)``: a slot signature by module type."""
    by_type: dict[str, list[int]] = {}
    for module, rank in signature.items():
        by_type.setdefault(module.rsplit(".", 1)[-1], []).append(rank)
    if not by_type:
        return "none (a task merged in)"

    def ranks(r: list[int]) -> str:
        return f"rank {min(r)}" if min(r) == max(r) else f"rank {min(r)}-{max(r)}"

    return ", ".join(f"{kind}: {ranks(r)} ({len(r)})" for kind, r in by_type.items())


@app.command()
def unpack(
    bundle: Path = typer.Argument(..., help="bundle folder (hydraopt merge)"),
    task: str = typer.Option(..., "--task", help="the task whose effective adapter to write"),
    out: Path = typer.Option(..., "--out", help="PEFT folder to write (adapter_config.json + adapter_model.safetensors)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Write one task's effective adapter as a standard PEFT LoRA folder."""
    from hydraopt_mobile.bundle import load_bundle
    from hydraopt_mobile.peft_io import write_peft_folder

    with reported(console):
        bank = load_bundle(bundle)
        write_peft_folder(bank.task_factors(task), out, bank.fingerprint.get("base_model"), overwrite, inputs=[bundle])
    console.print(f"wrote {out} (PEFT LoRA, loads with peft.PeftModel.from_pretrained)")


@app.command("add")
def add_cmd(
    bundle: Path = typer.Argument(..., help="bundle to add tasks to (read only: every file of it stays byte-identical)"),
    adapters: list[str] = typer.Argument(..., help="new adapter folders, PATH or NAME=PATH"),
    out: Path = typer.Option(..., "--out", help="bundle folder to write: BUNDLE's files as they are, the new tasks' files, a new manifest"),
    allowance: Optional[str] = typer.Option(None, "--allowance", help="file bytes the new tasks' files may take: a fraction of their fp16 file bytes (0.08) or a size (200KB); default: the bundle's own storage fraction"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="treat bundle modules an adapter lacks as zero updates"),
    slots: Optional[str] = typer.Option(None, "--slots", help="the deployed program's slot signature, as given to `hydraopt export --slots` (q_proj,v_proj:16): new tasks' own factors may use ranks up to it; default: each module's largest rank in the bundle, which every program exported for it has"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Add tasks to a bundle without changing any of its files.

    Each new task uses the bundle's shared factors where they fit and its own new file
    (closed-form least squares, within --allowance)."""
    from hydraopt_mobile.adapters import load_adapter_set, parse_task_spec
    from hydraopt_mobile.bundle import BUNDLE, read_manifest
    from hydraopt_mobile.merge.add import add_to_bundle

    with reported(console):
        inputs = [bundle, *(parse_task_spec(spec)[1] for spec in adapters)]
        check_output(out, overwrite, BUNDLE, inputs)
        limit = Budget.parse(allowance, "--allowance") if allowance is not None else None
        modules = [m[0] for m in read_manifest(bundle)["modules"]]
        max_ranks = None
        if slots is not None:
            from exporters.slots import resolve_slot_spec

            max_ranks = resolve_slot_spec(slots, modules, "no module of the bundle")
        nbytes, report = add_to_bundle(bundle, load_adapter_set(adapters, allow_missing), out, limit, overwrite, allow_missing, max_ranks)
    if as_json:
        print(json.dumps({"bundle": str(out), "allowance_bytes": nbytes, "added": [dataclasses.asdict(r) for r in report]}, indent=1))
        return
    table = Table("task", "rel. error", "file bytes", "modules by option", "shared factors' fit", title=f"added to {out} (allowance {nbytes:,} bytes; existing files byte-identical)")
    for r in report:
        fit = (f"{r.resident_rel_error:.3f} vs own {r.own_rel_error_same_bytes:.3f} at the same bytes ({r.resident_modules} modules)"
               if r.resident_rel_error is not None else "no shared factors")
        table.add_row(r.task, f"{r.rel_error:.4f}", f"{r.file_bytes:,}", ", ".join(f"{k}: {n}" for k, n in r.choices.items()), fit)
    console.print(table)
    capped = [r for r in report if r.rel_error_with_room is not None and r.rel_error_with_room < r.rel_error]
    if capped:
        spec = f"{','.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))}:{max(r.rank_with_room or 0 for r in capped)}"
        better = "; ".join(f"{r.task} {r.rel_error_with_room:.4f} (now {r.rel_error:.4f})" for r in capped)
        ranks = "the --slots ranks" if slots else "the bundle's ranks"
        console.print(f"The deployed program's slots cap the new tasks' own factors at {ranks}. "
                      f"In a program exported with `--slots {spec}` (then `hydraopt add --slots {spec}`), within the same allowance: {better}.")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="output folder"),
    budget: Optional[float] = typer.Option(None, "--budget", help="budget for hydraopt and per-task compression, a fraction of the fp16 file bytes (default 1/T: one merged adapter's bytes)"),
    init: str = typer.Option("shared-seed", "--init", help="shared-seed | independent-seeds"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated subset of the suite"),
    baseline: str = typer.Option("knots", "--baseline", help="baseline merge to compare at one merged adapter's bytes (evaluated by the demo)"),
    lr: Optional[float] = typer.Option(None, "--train-lr", help="train with another learning rate (retrains into the cache)"),
    export: str = typer.Option("onnx", "--export", help="onnx | executorch | none: export the bundles and measure them on the runtime"),
    calibrate: bool = typer.Option(False, "--calibrate", help="HydraOpt and per-task compression under the data-aware objective, calibrated on 16 train examples per task (about 2 more minutes)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """The main job end to end on the packaged SmolLM2-135M and the suite's adapters."""
    import torch

    from hydraopt_mobile.suite.train_config import TrainConfig

    from .demo import DemoConfig, run_demo

    with reported(console):
        cfg = DemoConfig(
            budget=budget,
            tasks=tuple(t.strip() for t in tasks.split(",")) if tasks else None,
            threads=torch.get_num_threads(),
            baseline=baseline,
            train=TrainConfig(init=init, lr=lr if lr is not None else TrainConfig.lr),
            export=export,
            calibrate=calibrate,
        )
        run_demo(out, cfg, overwrite, console)


def _register_subsystems() -> None:
    """The suite and the exporters add their commands here (their heavy imports stay lazy)."""
    from . import export_cli
    from .suite_cli import suite_app

    app.add_typer(suite_app, name="suite")
    app.command("export")(export_cli.export)
    app.command("run")(export_cli.run)
    app.add_typer(export_cli.bench_app, name="bench")
    from . import android

    export_cli.bench_app.command("android-adb")(android.bench_android_adb_cmd)
    app.add_typer(android.android_app, name="android")
    from . import targets_cli

    targets_cli.register(app, export_cli.bench_app)
    from .cache_cli import cache_app

    app.add_typer(cache_app, name="cache")


_register_subsystems()

if __name__ == "__main__":
    app()
