"""How large are the inputs of the adapted Linears, layer by layer? The reason the data-aware
objective scales each module's moments to mean eigenvalue 1 (hydraopt_mobile/calibration.py).

Runs the suite's calibration texts (16 train examples per task, as the frontier) through the base
SmolLM2-135M and records, per adapted Linear, the median over tokens of the input's squared norm
and the mean eigenvalue of its second moment (trace / d_in), padding left out.

    python benchmarks/input_scale.py

Writes benchmarks/results/input_scale.{json,md}.
"""

from __future__ import annotations

import platform
import statistics

import torch

from common import RESULTS_DIR, SUITE_ADAPTERS  # first: it puts this checkout on sys.path

from frontier import CALIBRATION_PER_TASK
from hydraopt_mobile.adapters import load_adapter_folders
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.suite.calibration_texts import calibration_texts
from hydraopt_mobile.suite.model import load_base_model
from hydraopt_mobile.suite.tasks import load_suite


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_base_model()
    adapters = load_adapter_folders(SUITE_ADAPTERS / "shared-seed")  # only its module names are read
    texts = calibration_texts([t for t in load_suite() if t.name in adapters.task_names], tokenizer, CALIBRATION_PER_TASK)
    norms: dict[str, list[torch.Tensor]] = {name: [] for name in adapters.module_names}
    state: dict = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: norms[name].append(args[0][state["mask"]].double().pow(2).sum(-1)))
               for name in adapters.module_names]
    try:
        for rows in texts.values():
            for i in range(0, len(rows), 16):
                enc = tokenizer(rows[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
                state["mask"] = enc.attention_mask.bool()
                model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    finally:
        for h in handles:
            h.remove()
    records = []
    for name in adapters.module_names:
        sq = torch.cat(norms[name])
        d_in = adapters.shapes[name][1]
        records.append({"module": name, "tokens": len(sq), "median_sq_norm": float(sq.median()), "mean_eigenvalue": float(sq.mean() / d_in)})
    eig = [r["mean_eigenvalue"] for r in records]
    data = {"meta": {"texts": f"the suite's calibration texts, {CALIBRATION_PER_TASK} train examples per task", "model": "SmolLM2-135M (packaged, dequantised)",
                     "machine": platform.machine(), "max_over_min_mean_eigenvalue": max(eig) / min(eig), "median_mean_eigenvalue": statistics.median(eig)},
            "records": records}
    rows = [[r["module"], f"{r['median_sq_norm']:.2f}", f"{r['mean_eigenvalue']:.4f}"] for r in records]
    md = "\n".join(["# Input scale of the adapted Linears (base model, calibration texts)", "",
                    f"Largest over smallest mean eigenvalue: {data['meta']['max_over_min_mean_eigenvalue']:.0f}x.", "",
                    *markdown_table(["module", "median squared norm per token", "mean eigenvalue of X^T X / n"], rows, align="lrr")]) + "\n"
    write_record(RESULTS_DIR / "input_scale.json", data, md)


if __name__ == "__main__":
    main()
