"""Where the qnn-htp QDQ A16W8 graph loses accuracy on the real model, tensor by tensor.

Runs ``exporters/targets/qnn_layers.py`` in the qnn-htp target's environment on the files a
``benchmarks/device_qnn_htp.py`` run left in its workdir (the fp32 graph as quantised, the QDQ graph,
the eval windows) and writes, per probed tensor and task, the relative L2 error vs fp32 of the same QDQ
graph on the CPU EP and on HTP (CPU fallback disabled), their distance from each other and the
tensor's quantisation range; for hidden-state tensors also the share of the 4 largest channels in the
norm and the error over the other channels. Probed: the residual stream before every RMSNorm, the attention and MLP
branches added into it, the first and the last RMSNorm's pieces, every tensor of ``--detail-layers``, the logits.

    flock -s /work/runs/cpu.lock python benchmarks/qnn_layer_parity.py /work/runs/qnn/export-hydraopt \\
        /work/runs/qnn/bench16/export-hydraopt --tasks country-de,currency-es --detail-layers 0

Writes benchmarks/results/qnn_layer_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS_DIR, ROOT, ready_target  # first: it puts this checkout on sys.path

import exporters.targets.registry  # noqa: F401  (the registry first: qnn_htp registers itself there)
from exporters.targets.qnn_htp import NAME, venv_python
from hydraopt_mobile.app.records import markdown_table, write_record

SCRIPT = ROOT / "exporters" / "targets" / "qnn_layers.py"
OP_PROBE = ROOT / "exporters" / "targets" / "qnn_op_probe.py"
COLUMNS = ["layer", "where", "kind", "q_step", "ref_absmax", "rel_err_cpu_qdq", "rel_err_htp", "rel_diff_htp_vs_cpu_qdq", "cos_htp", "rel_err_cpu_qdq_conv_weights_fp32",
           "top4_share_of_norm", "rel_err_cpu_qdq_other_channels", "rel_err_htp_other_channels"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("workdir", type=Path, help="a device_qnn_htp.py workdir of this export (convs.onnx, qdq_<quant>.onnx, ids.json, report.json)")
    ap.add_argument("--tasks", default="")
    ap.add_argument("--quant", default="a16w8")
    ap.add_argument("--arch", default="73")
    ap.add_argument("--detail-layers", default="")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "qnn_layer_parity.json")
    args = ap.parse_args()
    target = ready_target(NAME)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "layers.json"
        cmd = [str(venv_python(target.folder())), str(SCRIPT), str(args.export), str(args.workdir), str(out),
               "--quant", args.quant, "--arch", args.arch, "--tasks", args.tasks, "--detail-layers", args.detail_layers]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"qnn_layers.py failed: {r.stderr.strip()[-3000:]}")
        data = json.loads(out.read_text())
        r = subprocess.run([cmd[0], str(OP_PROBE), str(Path(tmp) / "ops.json"), tmp], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"qnn_op_probe.py failed: {r.stderr.strip()[-3000:]}")
        ops = json.loads((Path(tmp) / "ops.json").read_text())
    command = " ".join(["python", "benchmarks/qnn_layer_parity.py", *sys.argv[1:]])
    data = {"notes": {"command": command, "export": str(args.export), "workdir": str(args.workdir),
                      "what": "the QDQ graph of device_qnn_htp.py's run (same calibration), probed tensors as extra graph outputs "
                              "(fp32: the tensor; QDQ: its DequantizeLinear output); rel_err = ||x - fp32|| / ||fp32|| over the "
                              f"{data['seq']} decode rows of one eval window per task (KV cache of {data['past']} ids prefilled by the fp32 export "
                              "on the CPU EP); q_step: the tensor's quantisation step (16-bit activations), from its scale",
                      **{k: v for k, v in data.items() if k != "rows"}},
            "op_probe": {"what": "single QDQ ops (16-bit activations) on seeded random data shaped like the model's, "
                                 "exporters/targets/qnn_op_probe.py; rel_err vs fp32; sim: numpy Q/DQ arithmetic with the "
                                 "MatMul's second input at 16 or 8 bits", "ops": ops},
            "rows": data["rows"]}
    rows = data["rows"]
    first = rows[0]["task"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
    main_rows = [r for r in rows if r["task"] == first and r["where"] != "detail"]
    detail = [r for r in rows if r["task"] == first and r["where"] == "detail"]
    md = [f"# {NAME}: where A16W8 loses accuracy on SmolLM2-135M, tensor by tensor", "", f"`{command}`", "",
          data["notes"]["what"] + f". HTP session {data['notes']['htp_session']}. Task shown: {first} (every task in the JSON).", "",
          *markdown_table(COLUMNS, [[fmt(r.get(c, "-")) for c in COLUMNS] for r in main_rows]), ""]
    md += ["Ablations on the CPU EP without graph optimisations, logits rel. error vs fp32 of the same QDQ graph as built / with the "
           "LM head's weight unquantised (fp32) / with every Conv's weight unquantised (16-bit activations kept): "
           + "; ".join(f"{r['task']} {r['logits_rel_err_cpu_qdq_no_graph_optimisation']:.3g} / {r['logits_rel_err_cpu_qdq_lm_head_fp32']:.3g} / "
                       f"{r['logits_rel_err_cpu_qdq_all_conv_weights_fp32']:.3g}" for r in data["notes"]["ablation_lm_head_fp32"]) + ".", ""]
    if detail:
        md += ["## Every tensor of the detail layers", "", *markdown_table(COLUMNS, [[fmt(r.get(c, "-")) for c in COLUMNS] for r in detail]), ""]
    md += ["## Single ops, HTP vs the CPU EP", "", data["op_probe"]["what"] + ".", "",
           *markdown_table(["op", "rel_err_cpu", "rel_err_htp", "rel_diff_htp_vs_cpu", "rel_diff_htp_vs_sim_16bit_in1", "rel_diff_htp_vs_sim_8bit_in1"],
                           [[k, *(fmt(v.get(c, "-")) for c in ("rel_err_cpu", "rel_err_htp", "rel_diff_htp_vs_cpu", "rel_diff_htp_vs_sim_16bit_in1",
                                                               "rel_diff_htp_vs_sim_8bit_in1"))] for k, v in ops.items()]), ""]
    write_record(args.out, data, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
