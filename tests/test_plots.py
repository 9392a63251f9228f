"""Every plot is drawn through ``hydraopt_mobile.plotting.figure``: it writes a PNG, closes its figure
(also when drawing fails, writing nothing then), and the plots of the committed results redraw from
their own JSON records with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from hydraopt_mobile.app import demo_report, ethos_u_bench, frontier, qnn_bench
from hydraopt_mobile.app.targets_bench import drops, plot_target
from hydraopt_mobile.plotting import figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import add_task  # noqa: E402
import quant_recipes  # noqa: E402

PNG = b"\x89PNG"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:4] == PNG and path.stat().st_size > 1000


def test_figure_writes_a_png_and_closes_it(tmp_path):
    open_before = set(plt.get_fignums())
    with figure(tmp_path / "a.png", 2, figsize=(4, 2)) as (fig, axes):
        assert len(axes) == 2 and fig.number in plt.get_fignums()
        axes[0].plot([0, 1], [1, 0])
    assert _is_png(tmp_path / "a.png")
    assert set(plt.get_fignums()) == open_before


def test_a_failed_drawing_writes_nothing_and_closes_its_figure(tmp_path):
    open_before = set(plt.get_fignums())
    with pytest.raises(KeyError):
        with figure(tmp_path / "b.png", figsize=(4, 2)):
            {}["missing"]
    assert not (tmp_path / "b.png").exists()
    assert set(plt.get_fignums()) == open_before


def _records(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["frontier", "quant_recipes", "quant_recipes_executorch", "add_task", "device_ethos-u", "demo/demo",
                                  "device_arm64-cpu", "device_arm64-cpu-executorch", "device_qnn-htp"])
def test_committed_results_redraw_from_their_records(tmp_path, name):
    data, png = _records(name), tmp_path / "out.png"
    if name == "frontier":
        frontier.plot_frontier(data["records"], png, _records("frontier_base_scores"))
    elif name.startswith("quant_recipes"):
        _, _, title, program_file = quant_recipes.RUNTIMES["executorch" if name.endswith("executorch") else "onnx"]
        quant_recipes.plot(data["records"], png, title, program_file)
    elif name == "add_task":
        add_task.plot([r for r in data["records"] if r.get("summary")], png)
    elif name == "device_ethos-u":
        ethos_u_bench.plot(data["records"], 16)(png)
    elif name.startswith("device_arm64"):
        plot_target(data["records"], data["notes"])(png)
    elif name == "device_qnn-htp":
        assert any("drop_points" in r for r in data["records"]), "the record has HydraOpt drops to draw"
        qnn_bench.plot_htp(data)(png)
    else:
        demo_report.plot(data, png)
    assert _is_png(png)
    assert not plt.get_fignums()


def test_a_device_record_without_scores_still_draws(tmp_path):
    """``hydraopt bench TARGET`` on the user's own prompts has no reference answers: scores are None."""
    records = [{"method": m, "quant": "fp32", "task": t, "score": None, "score_host": None} for m in ("hydraopt", "none") for t in ("a", "b")]
    info = {"target": "arm64-cpu", "drops": drops(records)}
    assert info["drops"] == {}
    plot_target(records, info)(tmp_path / "x.png")
    assert _is_png(tmp_path / "x.png") and not plt.get_fignums()


def test_two_budgets_of_one_method_get_their_own_drops():
    """One arm64 record holding HydraOpt at 1/T and at 0.52 (both ``method: hydraopt``) and
    one-per-task: each budget's drop is computed on its own records, none overwrites the other."""
    each = {"none": ([100.0, 0.0], [100.0, 100.0]), "0.0833": ([0.0, 0.0], [0.0, 100.0]), "0.52": ([100.0, 0.0], [100.0, 100.0])}
    records = []
    for name, (a, b) in each.items():
        method, budget = ("none", None) if name == "none" else ("hydraopt", name)
        for task, scores in (("a", a), ("b", b)):
            records.append({"method": method, "budget": budget, "quant": "fp32", "task": task, "score": sum(scores) / 2, "score_host": sum(scores) / 2,
                            "score_each": scores, "score_each_host": scores})
    found = drops(records)
    assert set(found) == {"hydraopt (0.0833)/fp32", "hydraopt (0.52)/fp32"}
    assert found["hydraopt (0.0833)/fp32"]["drop_points"]["drop_points"] == 50.0
    assert found["hydraopt (0.52)/fp32"]["drop_points"]["drop_points"] == 0.0
    older = [{k: v for k, v in r.items() if k != "budget"} for r in records if r["budget"] != "0.52"]  # records written before `budget` existed
    assert set(drops(older)) == {"hydraopt/fp32"}
