"""ComPEFT: the sign format's bytes and decoding, the method's budget, scale and bundle round trip."""

from __future__ import annotations

import math

import pytest
import torch

from hydraopt_mobile.adapters import LoraFactors, build_adapter_set, load_adapter
from hydraopt_mobile.bundle import load_bundle, write_bundle
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.formats import NumberFormat, StoredFactor, sign_blob_layout
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.compeft import compress_module, file_bytes_at
from hydraopt_mobile.merge.registry import MergeConfig, merge


@pytest.mark.parametrize("n, density, where", [(4608, 0.3, "bitmask"), (4608, 0.02, "2-byte positions"), (100_000, 0.001, "4-byte positions")])
def test_sign_format_keeps_the_largest_values_in_the_smaller_encoding(n, density, where):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n))
    fmt = NumberFormat.parse(NumberFormat("sign", density=density).label())
    assert fmt.density == density
    stored = StoredFactor.encode(v.reshape(1, -1), fmt, transposed=False)
    out = stored.values().reshape(-1)
    layout = sign_blob_layout(n, density)
    top = torch.topk(v.abs(), layout.kept).indices
    assert int((out != 0).sum()) == layout.kept == math.ceil(density * n)
    assert torch.equal(torch.sign(out[top]), torch.sign(v[top]))
    assert float(out[top].abs()[0]) == pytest.approx(float(v[top].abs().mean()), rel=1e-3)
    bitmask, positions = -(-n // 8), layout.kept * (2 if n <= 65536 else 4)
    assert layout.where_bytes == min(bitmask, positions)
    assert {"bitmask": 0, "2-byte positions": 2, "4-byte positions": 4}[where] == layout.position_bytes
    assert stored.nbytes() == 2 + min(bitmask, positions) + -(-layout.kept // 8) == stored.data["z"].numel()


def test_scale_is_the_least_squares_fit_of_the_product():
    g = torch.Generator().manual_seed(0)
    factors = [LoraFactors(torch.randn(3, 20, generator=g), torch.randn(16, 3, generator=g)) for _ in range(2)]
    module = compress_module(factors, NumberFormat("sign", density=0.3))
    for t, f in enumerate(factors):
        approx = module.task_factors(t).dense()
        err = lambda c: float(((f.dense() - c * approx) ** 2).sum())  # noqa: E731
        assert err(1.0) <= min(err(0.97), err(1.03))  # any other scale of the same signs is worse


def test_compeft_fits_its_budget_round_trips_and_is_not_exported(make_adapters, tmp_path):
    aset = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=3)])
    budget = Budget(fraction=0.1)
    bank = merge(aset, MergeConfig("compeft", budget=budget))
    limit = budget.resolve(aset.reference_file_bytes())
    density = bank.modules[aset.module_names[0]].fmt.density
    assert bank.total_file_bytes() == file_bytes_at(aset, density) <= limit < file_bytes_at(aset, density + 2e-6)
    assert not any(m.shares() for m in bank.modules.values())
    written = load_bundle(write_bundle(bank, tmp_path / "bundle"))
    for task in bank.tasks:
        for name, f in bank.task_factors(task).items():
            assert torch.equal(f.dense(), written.task_factors(task)[name].dense())
    assert (tmp_path / "bundle" / "tasks").is_dir() and not (tmp_path / "bundle" / "shared.safetensors").exists()
    # the least-squares scale never does worse than dropping the update (c = 0)
    assert all(0 < e < 1 for e in bank.relative_errors(aset).values())
    from exporters.export import _load_bank

    with pytest.raises(UserError, match="no exporter decodes that format"):
        _load_bank(tmp_path / "bundle")
    with pytest.raises(InfeasibleBudget, match="exceed --budget"):
        merge(aset, MergeConfig("compeft", params={"density": 0.9}, budget=budget))
    with pytest.raises(UserError, match="--format does not apply"):
        merge(aset, MergeConfig("compeft", fmt=NumberFormat("int8"), budget=budget))


def test_frontier_compares_hydraopt_with_each_per_task_rival_at_the_same_objective():
    from hydraopt_mobile.app.frontier import sharing_verdicts

    def rec(method, calibration, scores):
        return {"method": method, "format": "auto", "budget": 0.0833, "at": None, "init": "i", "calibration": calibration, "storage_fraction": 0.08,
                "avg_score": sum(scores) / len(scores), "plan": "shared factors + per-task tensors", "layout_summary": {"sharing": {"share A": 60}}, "examples": {"t": scores}}

    records = [rec("hydraopt", False, [60.0] * 40), rec("hydraopt", True, [60.0] * 40), rec("per-task", False, [50.0] * 40),
               rec("per-task", True, [60.0] * 20 + [50.0] * 20), rec("compeft", False, [60.0] * 40)]
    rows = {(v["calibration"], v["rival"]): v for v in sharing_verdicts(records)}
    assert set(rows) == {(False, "per-task"), (False, "compeft"), (True, "per-task (calibrated)"), (True, "compeft")}
    assert rows[(False, "per-task")]["verdict"] == "HydraOpt ahead" and rows[(False, "per-task")]["hydraopt_minus_rival"] == pytest.approx(10.0)
    assert rows[(True, "per-task (calibrated)")]["rival_score"] == 55.0
    assert rows[(False, "compeft")]["verdict"] == "no clear difference"
