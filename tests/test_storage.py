"""Storage in file bytes (issue 9): what a device keeps is files, so budgets, inspect and records
count the safetensors files' exact sizes, against the adapters stored as they are in fp16."""

import json

import pytest
import torch
from safetensors.torch import save
from typer.testing import CliRunner

from hydraopt_mobile.adapters import build_adapter_set, load_adapter
from hydraopt_mobile.bundle import write_bundle
from hydraopt_mobile.app.cli import app, console
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge, merge_budgets
from hydraopt_mobile.sharing import NO_SHARING, layout_summary, plan_label
from hydraopt_mobile.storage import TensorSpec, safetensors_bytes

console.width = 250


def tensor_files(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")


def test_file_size_formula_equals_written_bytes(tmp_path):
    """storage.safetensors_bytes is the size of the file bundle.write_bundle_files writes (one blob of
    the parts), and file_overhead_bound bounds what a file adds to its parts at the payload's digits."""
    from hydraopt_mobile.storage import BLOB, FILE_METADATA, file_overhead_bound

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(0, 6, (1,), generator=g))
        specs = []
        for i in range(n):
            dtype = [torch.float16, torch.int8, torch.uint8, torch.float32][int(torch.randint(0, 4, (1,), generator=g))]
            shape = tuple(int(s) for s in torch.randint(1, 300, (2,), generator=g))
            specs.append(TensorSpec(f"{i * 37 % 11}.{'AB'[i % 2]}{i}.q", dtype, shape))
        payload = sum(s.nbytes for s in specs)
        written = len(save({BLOB: torch.zeros(payload, dtype=torch.uint8)}, metadata=FILE_METADATA))
        assert safetensors_bytes(specs) == written, trial
        assert written - payload <= file_overhead_bound(len(str(payload))), trial


@pytest.fixture
def suite4(make_adapters):
    return build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=4, rank=4, noise=0.3)])


def test_one_adapter_per_task_fp16_is_exactly_the_reference(suite4, tmp_path):
    bank = merge(suite4, MergeConfig("none"))
    out = write_bundle(bank, tmp_path / "none")
    assert tensor_files(out) == suite4.reference_file_bytes() == bank.total_file_bytes()
    assert bank.storage_fraction() == 1.0
    fractions = []
    for fmt in ("int8", "int4"):  # tiny 64-wide adapters: the headers are a large part of each file
        small = merge(suite4, MergeConfig("none", fmt=NumberFormat.parse(fmt)))
        assert tensor_files(write_bundle(small, tmp_path / fmt)) == small.total_file_bytes()
        fractions.append(small.storage_fraction())
    assert 1.0 > fractions[0] > fractions[1]


@pytest.mark.parametrize("method", ["hydraopt", "per-task"])
@pytest.mark.parametrize("fmt", [None, "fp16", "int8", "int4"])
def test_budget_never_exceeded_in_file_bytes(suite4, tmp_path, method, fmt):
    budgets = [Budget(fraction=f) for f in (0.08, 0.13, 0.2, 0.35, 0.6, 1.0)]
    config = MergeConfig(method, fmt=NumberFormat.parse(fmt) if fmt else None)
    banks = merge_budgets(suite4, config, budgets, strict=False)
    reference = suite4.reference_file_bytes()
    measured = 0
    for budget, bank in zip(budgets, banks):
        if isinstance(bank, Exception):
            assert "smallest feasible budget" in str(bank)
            continue
        out = write_bundle(bank, tmp_path / f"{method}-{fmt}-{budget.label()}")
        on_disk = tensor_files(out)
        assert on_disk == bank.total_file_bytes() <= budget.resolve(reference)
        assert json.loads((out / "manifest.json").read_text())["file_bytes"] == on_disk
        measured += 1
    assert measured >= 2


def test_per_task_never_shares_and_is_labelled(suite4, tmp_path):
    banks = merge_budgets(suite4, MergeConfig("per-task"), [Budget(fraction=f) for f in (0.1, 0.3, 0.9)])
    for bank in banks:
        assert all(len(set(m.a_index)) == 4 and len(set(m.b_index)) == 4 for m in bank.modules.values())
        assert not layout_summary(bank)["shares_factors"]
        assert plan_label(bank) == NO_SHARING
    assert min(m.rank for b in banks for m in b.modules.values()) < 2  # ranks go below r/2
    out = write_bundle(banks[0], tmp_path / "pt")
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and NO_SHARING in result.output, result.output
    assert "by sharing" in result.output


def test_hydraopt_sharing_plan_is_labelled_and_credited(suite4, tmp_path):
    bank = merge(suite4, MergeConfig("hydraopt", budget=Budget(fraction=0.15)))
    assert layout_summary(bank)["shares_factors"]
    assert plan_label(bank) != NO_SHARING
    out = write_bundle(bank, tmp_path / "h")
    info = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).output)
    saving = info["saving"]
    assert saving["saved_by_sharing"] > 0
    assert saving["saved_by_sharing"] + saving["saved_by_rank_and_format"] == saving["reference_payload_bytes"] - saving["payload_bytes"]


def test_manifest_is_small_on_the_suite(tmp_path):
    """The compact manifest: at most 2 % of the payload for the embedded suite's 12 adapters."""
    from hydraopt_mobile.suite.tasks import TASK_NAMES
    from pathlib import Path

    import hydraopt_mobile

    root = Path(hydraopt_mobile.__file__).parent / "suite" / "adapters" / "shared-seed"
    aset = build_adapter_set([load_adapter(root / t) for t in TASK_NAMES])
    bank = merge(aset, MergeConfig("none", fmt=NumberFormat("int4")))
    out = write_bundle(bank, tmp_path / "suite")
    assert (out / "manifest.json").stat().st_size <= 0.02 * bank.payload_bytes()


def test_frontier_record_bytes_equal_the_written_bundle(suite4, tmp_path):
    """A frontier record's bytes are the bundle's files on disk; its drop interval is paired."""
    from hydraopt_mobile.app.frontier import Point, record

    bank = merge(suite4, MergeConfig("hydraopt", budget=Budget(fraction=0.5)))
    out = write_bundle(bank, tmp_path / "b")
    reference = {t: [100.0, 0.0, 100.0, 100.0] for t in bank.tasks}
    worse = {t: [100.0, 0.0, 0.0, 100.0] for t in bank.tasks}
    r = record(Point("hydraopt", 0.5), "test", bank, worse, reference, 0.0)
    assert r["file_bytes"] == tensor_files(out)
    assert r["storage_fraction"] == tensor_files(out) / suite4.reference_file_bytes()
    assert r["drop_points"] == 25.0 and r["drop_points_ci95"][0] >= 0 < r["drop_points_ci95"][1]
    assert r["layout_summary"]["modules"] == len(bank.modules) and r["plan"] == plan_label(bank)


def test_demo_verdict_names_the_winner_and_what_was_shared(suite4):
    from hydraopt_mobile.app.demo_report import REFERENCE, result_row, verdict

    reference = {t: [100.0, 0.0, 100.0, 100.0] for t in suite4.task_names}
    lower = {t: [100.0, 0.0, 0.0, 100.0] for t in suite4.task_names}
    hydra = merge(suite4, MergeConfig("hydraopt", budget=Budget(fraction=0.15)))
    per_task = merge(suite4, MergeConfig("per-task", budget=Budget(fraction=0.5)))
    rows = [
        result_row(REFERENCE, merge(suite4, MergeConfig("none")), reference, reference),
        result_row("per-task compression", per_task, lower, reference),
        result_row("hydraopt", hydra, reference, reference),
    ]
    text = verdict(rows)
    assert "hydraopt scored best" in text and "HydraOpt shared factors in" in text
    no_share = result_row("hydraopt", per_task, lower, reference)
    no_share["method"] = "hydraopt"
    assert "HydraOpt shared no factor" in verdict(rows[:2] + [no_share])


def _mixed_rank_set():
    """A rank-1 task beside a rank-16 one (2 modules, 64 x 64)."""
    from pathlib import Path

    from hydraopt_mobile.adapters import LoraFactors, TaskAdapter

    g = torch.Generator().manual_seed(0)
    tasks = []
    for name, rank in (("low", 1), ("high", 16)):
        modules = {f"m{i}": LoraFactors(torch.randn(rank, 64, generator=g), torch.randn(64, rank, generator=g) * 0.1) for i in range(2)}
        tasks.append(TaskAdapter(name, Path(name), "base", modules))
    return build_adapter_set(tasks)


@pytest.mark.parametrize("method", ["hydraopt", "per-task"])
def test_planner_never_stores_more_than_the_inputs_and_keeps_own_ranks(method):
    aset = _mixed_rank_set()
    reference = aset.reference_file_bytes()
    for budget in (Budget(fraction=1.0), Budget(nbytes=12 * reference)):
        bank = merge(aset, MergeConfig(method, budget=budget))
        assert bank.total_file_bytes() <= reference, budget
        for m in bank.modules.values():
            assert m.A[m.a_index[0]].shape[0] == 1, "the rank-1 task was padded"
    assert max(bank.rel_errors.values()) < 1e-3  # far above the inputs' size: the fp16 inputs as they are
