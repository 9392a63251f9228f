"""``hydraopt suite ...``: train the suite's adapters and evaluate them (or the base model)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hydraopt_mobile.suite.tasks import TASK_NAMES, load_suite
from hydraopt_mobile.suite.train_config import TrainConfig

from .failures import reported
from .progress import progress_bar
from .records import print_unwrapped, write_record
from .threads import torch_threads

suite_app = typer.Typer(help="The embedded SmolLM2-135M task suite: train adapters, evaluate.", no_args_is_help=True)
console = Console(soft_wrap=True)  # a line of text stays one line in a pipe or a log (tables still fit the width)


def _task_list(tasks: str | None) -> list[str] | None:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


@suite_app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Folder to write one PEFT adapter folder per task into."),
    init: str = typer.Option(TrainConfig.init, "--init", help="shared-seed (one LoRA init seed) or independent-seeds."),
    steps: int | None = typer.Option(None, "--steps", help="Steps for every task (default: per application)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 avoids oversubscribing shared cores)."),
    tasks: str | None = typer.Option(None, "--tasks", help=f"Comma-separated subset of: {','.join(TASK_NAMES)} (or an optional reply-<lang> task)."),
    seed: int = typer.Option(0, "--seed", help="seed of the LoRA initialisation and the batch order (independent-seeds: each task's is derived from it)."),
) -> None:
    """Train one LoRA adapter per task (r 8, alpha 16, q_proj + v_proj, fp16 PEFT folders)."""
    from hydraopt_mobile.suite.train import train_suite

    start = time.time()
    with torch_threads(threads), progress_bar("train: steps", console) as on_step:
        paths = train_suite(out, TrainConfig(steps=steps, seed=seed, init=init), _task_list(tasks), on_step=on_step)
    console.print(f"trained {len(paths)} adapters into {out} in {time.time() - start:.0f} s ({threads} thread(s))")


@suite_app.command("calibration")
def calibration_(
    out: Path = typer.Option(..., "--out", help="folder to write <task>.jsonl calibration texts into (for hydraopt merge --calibration)"),
    per_task: int = typer.Option(16, "--per-task", min=1, help="examples per task, from the train split"),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated subset of tasks."),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Write calibration texts from the suite's train split (never val or test)."""
    from transformers import AutoTokenizer

    from hydraopt_mobile.suite.calibration_texts import write_calibration_dir
    from hydraopt_mobile.suite.model import base_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    write_calibration_dir(out, load_suite(_task_list(tasks)), tokenizer, per_task, overwrite)
    console.print(f"wrote {out}: {per_task} train examples per task")


@suite_app.command("eval")
def eval_(
    adapters: Path | None = typer.Option(None, "--adapters", help="Folder of per-task adapter folders; omit for the base model."),
    bundle: Path | None = typer.Option(None, "--bundle", help="A bundle (hydraopt merge) whose tasks are suite tasks: each scored with its "
                                       "effective adapter from the bundle; with --adapters too, against those adapters."),
    split: str = typer.Option("test", "--split", help="test or val."),
    threads: int = typer.Option(1, "--threads", help="torch threads (1 avoids oversubscribing shared cores)."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated subset of tasks (default: every suite task, or the bundle's)."),
    against_base: bool = typer.Option(False, "--against-base", help="Also score the base model and give each adapter's gain with a 95 % paired bootstrap interval."),
    json_out: Path | None = typer.Option(None, "--json", help="Write {task: score} and settings here."),
) -> None:
    """Score the base model, a folder of adapters or a bundle on each task's own metric.

    A bundle with --adapters is compared with those adapters (its drop per task, with a 95 %
    paired interval)."""
    if against_base and adapters is None and bundle is None:
        raise typer.BadParameter("--against-base needs --adapters or --bundle", param_hint="--against-base")
    if against_base and adapters is not None and bundle is not None:
        raise typer.BadParameter("a bundle with --adapters is compared with the adapters; --against-base compares with the base model: choose one",
                                 param_hint="--against-base")
    with reported(console), torch_threads(threads):
        _evaluate(adapters, bundle, split, threads, _task_list(tasks), against_base, json_out)


def _evaluate(adapters: Path | None, bundle: Path | None, split: str, threads: int, tasks: list[str] | None, against_base: bool,
              json_out: Path | None) -> None:
    from hydraopt_mobile.bundle import load_bundle
    from hydraopt_mobile.errors import UserError
    from hydraopt_mobile.suite.evaluate import adapters_from_folders, evaluate
    from hydraopt_mobile.suite.metrics import as_gain, average, paired_drop, paired_gain, per_example
    from hydraopt_mobile.suite.model import cache_root, load_base_model

    bank = load_bundle(bundle) if bundle is not None else None
    if bank is not None and tasks is None:
        if unknown := [t for t in bank.tasks if t not in TASK_NAMES]:
            raise UserError(f"{bundle}: tasks {unknown} are not suite tasks (suite: {', '.join(TASK_NAMES)}); pass --tasks")
        tasks = bank.tasks
    suite = load_suite(tasks)
    if bank is not None and (missing := [t.name for t in suite if t.name not in bank.tasks]):
        raise UserError(f"{bundle}: no task {missing} in this bundle (tasks: {', '.join(bank.tasks)})")
    own = None if adapters is None else adapters_from_folders({t.name: adapters / t.name for t in suite})
    factors = own if bank is None else {t.name: bank.task_factors(t.name) for t in suite}
    model, tokenizer = load_base_model()
    answers = cache_root() / "answers"  # keyed by weights, adapter, prompts and decoding settings
    start = time.time()
    texts: dict[str, list[str]] = {}
    with progress_bar("evaluate: tasks", console) as on_step:
        scores = evaluate(suite, factors, model, tokenizer, split=split, predictions=texts, cache=answers, on_step=on_step)
    seconds = time.time() - start
    record: dict = {"adapters": str(adapters) if adapters else None, "bundle": str(bundle) if bundle else None, "split": split,
                    "threads": threads, "seconds": round(seconds, 1), "scores": scores}
    # the reference each task's score is compared with: the adapters themselves (a bundle given with
    # --adapters), or the base model (--against-base)
    reference = "adapters" if bank is not None and own is not None else "base" if against_base else None
    if reference is not None:
        ref_texts: dict[str, list[str]] = {}
        with progress_bar(f"evaluate {'the adapters' if reference == 'adapters' else 'the base model'}: tasks", console) as on_step:
            ref = evaluate(suite, own if reference == "adapters" else None, model, tokenizer, split=split, predictions=ref_texts, cache=answers, on_step=on_step)
        gains = {t.name: paired_gain(t, texts[t.name], ref_texts[t.name], split) for t in suite}
        subject = "bundle" if bank is not None else "adapter"

        def clear(low: float, high: float) -> str:
            """Against the base model a gain is what is asked (interval above zero); against the
            adapters, a difference either way (interval clear of zero)."""
            return "yes" if low > 0 or (reference == "adapters" and high < 0) else "no"

        table = Table("task", "metric", reference, subject, "difference" if reference == "adapters" else "gain", "95 % interval",
                      "clear difference" if reference == "adapters" else "clear gain")
        for t in suite:
            g = gains[t.name]
            table.add_row(t.name, t.metric, f"{ref[t.name]:.1f}", f"{scores[t.name]:.1f}", f"{g.points:+.1f}",
                          f"[{g.low:+.1f}, {g.high:+.1f}]", clear(g.low, g.high))
        # the task average's difference with its own paired interval (examples resampled within each task)
        pooled = as_gain(paired_drop({t.name: per_example(t, ref_texts[t.name], split) for t in suite},
                                     {t.name: per_example(t, texts[t.name], split) for t in suite}))
        low, high = pooled["ci95"]
        table.add_row("average", "", f"{average(ref):.1f}", f"{average(scores):.1f}", f"{pooled['points']:+.1f}",
                      f"[{low:+.1f}, {high:+.1f}]", clear(low, high))
        record[f"{reference}_scores"] = ref
        record["average_difference"] = pooled
        if reference == "base":
            record["gains"] = {k: g.as_dict() for k, g in gains.items()}
        else:
            record["differences"] = {k: {"points": g.points, "ci95": [g.low, g.high], "clear": clear(g.low, g.high) == "yes"} for k, g in gains.items()}
    else:
        table = Table("task", "metric", "score")
        for t in suite:
            table.add_row(t.name, t.metric, f"{scores[t.name]:.1f}")
        table.add_row("average", "", f"{average(scores):.1f}")
    print_unwrapped(table, console)
    console.print(f"{split} split evaluated in {seconds:.0f} s with {threads} thread(s)")
    if json_out is not None:
        write_record(json_out, record, indent=2, trailing_newline=True)


if __name__ == "__main__":
    suite_app()
