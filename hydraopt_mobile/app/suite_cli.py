"""``hydraopt suite ...``: train the suite's adapters and evaluate them (or the base model)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hydraopt_mobile.suite.tasks import TASK_NAMES, load_suite
from hydraopt_mobile.suite.train import TrainConfig

from .progress import progress_bar
from .records import write_record
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
    seed: int = typer.Option(0, "--seed"),
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
    overwrite: bool = typer.Option(False, "--overwrite"),
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
    split: str = typer.Option("test", "--split", help="test or val."),
    threads: int = typer.Option(1, "--threads"),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated subset of tasks."),
    against_base: bool = typer.Option(False, "--against-base", help="Also score the base model and give each adapter's gain with a 95 % paired bootstrap interval."),
    json_out: Path | None = typer.Option(None, "--json", help="Write {task: score} and settings here."),
) -> None:
    """Score the base model or a folder of adapters on each task's own metric."""
    if against_base and adapters is None:
        raise typer.BadParameter("--against-base needs --adapters", param_hint="--against-base")
    with torch_threads(threads):
        _evaluate(adapters, split, threads, _task_list(tasks), against_base, json_out)


def _evaluate(adapters: Path | None, split: str, threads: int, tasks: list[str] | None, against_base: bool, json_out: Path | None) -> None:
    from hydraopt_mobile.suite.evaluate import adapters_from_folders, evaluate
    from hydraopt_mobile.suite.metrics import average, paired_gain
    from hydraopt_mobile.suite.model import cache_root, load_base_model

    suite = load_suite(tasks)
    factors = None
    if adapters is not None:
        factors = adapters_from_folders({t.name: adapters / t.name for t in suite})
    model, tokenizer = load_base_model()
    answers = cache_root() / "answers"  # keyed by weights, adapter, prompts and decoding settings
    start = time.time()
    texts: dict[str, list[str]] = {}
    with progress_bar("evaluate: tasks", console) as on_step:
        scores = evaluate(suite, factors, model, tokenizer, split=split, predictions=texts, cache=answers, on_step=on_step)
    seconds = time.time() - start
    record: dict = {"adapters": str(adapters) if adapters else None, "split": split, "threads": threads,
                    "seconds": round(seconds, 1), "scores": scores}
    if against_base:
        base_texts: dict[str, list[str]] = {}
        with progress_bar("evaluate base model: tasks", console) as on_step:
            base = evaluate(suite, None, model, tokenizer, split=split, predictions=base_texts, cache=answers, on_step=on_step)
        gains = {t.name: paired_gain(t, texts[t.name], base_texts[t.name], split) for t in suite}
        table = Table("task", "metric", "base", "adapter", "gain", "95 % interval", "clear gain")
        for t in suite:
            g = gains[t.name]
            table.add_row(t.name, t.metric, f"{base[t.name]:.1f}", f"{scores[t.name]:.1f}", f"{g.points:+.1f}",
                          f"[{g.low:+.1f}, {g.high:+.1f}]", "yes" if g.clear else "[red]no[/red]")
        table.add_row("average", "", f"{average(base):.1f}", f"{average(scores):.1f}", f"{average(scores) - average(base):+.1f}", "", "")
        record["base_scores"] = base
        record["gains"] = {k: g.as_dict() for k, g in gains.items()}
    else:
        table = Table("task", "metric", "score")
        for t in suite:
            table.add_row(t.name, t.metric, f"{scores[t.name]:.1f}")
        table.add_row("average", "", f"{average(scores):.1f}")
    console.print(table)
    console.print(f"{split} split evaluated in {seconds:.0f} s with {threads} thread(s)")
    if json_out is not None:
        write_record(json_out, record, indent=2, trailing_newline=True)


if __name__ == "__main__":
    suite_app()
