"""Suite scores of ExecuTorch ``--quant`` recipes computed in eager PyTorch, checked against a real
lowered program: the stand-in for an XNNPACK lowering that does not fit the time at hand.

    python benchmarks/et_quant_eager.py --recipes fp32,8da4w-mixed-noclip,8da4w [--examples 4] [--methods none]

A rerun with other methods or recipes adds them to the record.

:class:`EagerSession` is an ExecuTorch export's session (same manifest, same bank files and slot
decoding, same static-cache wrapper ``ExecuTorchDecoder`` and the exporter's own ``quantize``) whose
decoder runs in eager PyTorch (torchao's reference int8-activation / intx-weight arithmetic) instead
of the lowered ``model.pte``. It decodes greedily the first ``--examples`` test examples of every
task on the export folders of ``benchmarks/quant_recipes.py --runtime executorch`` (their bank files;
their program is not used). For the recipe whose real program was scored by that script on the
same examples (``8da4w``, cached), the record gives the agreement of the eager texts with the real
program's (identical answers, score difference): how far the stand-in can be trusted. Drops vs
eager fp32 carry 95 % paired bootstrap intervals (``paired_drop``). Per-task checkpoints in
``--work/eager/``. Writes benchmarks/results/et_quant_eager.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, RESULTS_DIR  # first: it puts this checkout on sys.path

from benchmarks.quant_recipes import mean_score, score_export

from exporters.backend import Session
from exporters.executorch_backend import RECIPES, ExecuTorchDecoder, ExecuTorchSession, quantize
from exporters.slots import attach_slots
from hydraopt_mobile.app.records import markdown_table, write_record
from hydraopt_mobile.base_model import load_causal_lm
from hydraopt_mobile.suite.metrics import paired_drop
from hydraopt_mobile.suite.model import base_model_dir

RESULTS = RESULTS_DIR / "et_quant_eager.json"


class EagerSession(ExecuTorchSession):
    """An ExecuTorch export's session whose decoder is the eager, ``quant``-quantised model."""

    def __init__(self, folder: Path, quant: str) -> None:
        Session.__init__(self, folder)  # the manifest and bank; no program is loaded
        model = load_causal_lm(base_model_dir()).eval()
        attach_slots(model, self.manifest.signature)
        quantize(model, quant)
        self.names = [name for name, _ in self.manifest.slots]
        self.decoder = ExecuTorchDecoder(model, self.names, self.manifest.model["max_cache_len"]).eval()
        self.loaded: dict[str, list[torch.Tensor]] = {}  # what ExecuTorchSession's _load keeps

    def _switch(self, task: str) -> None:
        hf = self.decoder.model.model
        with torch.no_grad():
            for name, value in zip(self.names, self.loaded[task]):
                hf.get_buffer(name).copy_(value)

    def _step(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        with torch.no_grad():
            out = self.decoder(torch.tensor([ids]), torch.arange(self.pos, self.pos + n))
        self.pos += n
        return out[0].float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp32,8da4w-mixed,8da4w", help="comma-separated ExecuTorch --quant names, fp32 first")
    parser.add_argument("--methods", default="none")
    parser.add_argument("--examples", type=int, default=4, help="test examples per task")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "quant_recipes_executorch")
    parser.add_argument("--real-examples", type=int, default=8, help="--examples of the quant_recipes.py run whose real scores are compared")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (args.work / "eager").mkdir(parents=True, exist_ok=True)
    # records of other (method, recipe) pairs on the same number of examples are kept: a rerun adds to the record
    old = json.loads(args.results.read_text())["records"] if args.results.is_file() else []
    ours = {(m, q) for m in args.methods.split(",") for q in args.recipes.split(",")}
    records = [r for r in old if (r["method"], r["quant"]) not in ours and r["n_examples"] == args.examples]
    for method in args.methods.split(","):
        folder = args.work / f"{method}-8da4w"  # any export of the bank: only its manifest and bank files are read
        scores = {}
        for quant in args.recipes.split(","):
            t0 = time.time()
            checkpoint = args.work / "eager" / f"{method}-{quant}-{args.examples}.json"
            scores[quant] = score_export(folder, args.examples, checkpoint, lambda: EagerSession(folder, quant))
            fp32 = scores.get("fp32")
            drop = paired_drop({t: v["per_example"] for t, v in fp32.items()}, {t: v["per_example"] for t, v in scores[quant].items()}) if fp32 else None
            rec = {
                "method": method, "quant": quant, "bits": RECIPES[quant].bits, "description": RECIPES[quant].description,
                "n_tasks": len(scores[quant]), "n_examples": args.examples, "score": mean_score(scores[quant]),
                "fp32_score": mean_score(fp32) if fp32 else None, "score_ratio": mean_score(scores[quant]) / mean_score(fp32) if fp32 and mean_score(fp32) else None,
                "drop_points": drop["drop_points"] if drop else None, "drop_points_ci95": drop["drop_points_ci95"] if drop else None,
                "per_task": {t: float(np.mean(v["per_example"])) for t, v in scores[quant].items()},
                "seconds": round(time.time() - t0, 1), "real_program": None,
            }
            real_paths = [args.work / "scores" / f"{method}-{quant}-{args.real_examples}{end}.json" for end in ("", ".partial")]
            real = next((json.loads(p.read_text()) for p in real_paths if p.is_file()), {})
            tasks = [t for t in scores[quant] if t in real]  # the real lowered program on a superset of these examples
            if tasks:
                same = [a == b for t in tasks for a, b in zip(scores[quant][t]["texts"], real[t]["texts"])]
                eager = mean_score({t: scores[quant][t] for t in tasks})
                cut = mean_score({t: {"per_example": real[t]["per_example"][: args.examples]} for t in tasks})
                rec["real_program"] = {"tasks": tasks, "eager_score": eager, "score": cut, "identical_answers": sum(same) / len(same), "n": len(same)}
            records.append(rec)
            notes = {
                "what": "suite scores of ExecuTorch recipes in eager PyTorch (EagerSession: the export's bank files and slot decoding, "
                        "ExecuTorchDecoder's static cache, the exporter's quantize; torchao reference arithmetic instead of XNNPACK kernels)",
                "why": "an XNNPACK lowering of the real model needs ~18 CPU-minutes (export_reuse.md); on the shared cores it got "
                       "~6 CPU-seconds per minute, so the lowered 8da4w-mixed program could not be scored in this session",
                "check": "real_program: the cached, really lowered program of the same recipe (8da4w) on the same examples "
                         "(benchmarks/quant_recipes.py --runtime executorch): its score and the share of identical answers",
                "examples_per_task": args.examples, "decoding": f"greedy, 1 thread, batch 1; {platform.machine()}, 2 shared cores",
                "drop": "eager fp32 minus recipe on the same examples, 95 % paired bootstrap over examples within tasks (paired_drop)",
            }
            md = ["# ExecuTorch --quant recipes in eager PyTorch (suite test split)", ""] + [f"- **{k}**: {v}" for k, v in notes.items()] + [""]
            md += markdown_table(
                ["method", "quant", "score", "eager fp32", "score / fp32", "drop pts [95 % CI]", "eager / real program on the real run's tasks", "identical answers (n)"],
                [[r["method"], r["quant"], r["score"], r["fp32_score"], r["score_ratio"],
                  None if r["drop_points"] is None else f"{r['drop_points']:+.2f} [{r['drop_points_ci95'][0]:+.2f}, {r['drop_points_ci95'][1]:+.2f}]",
                  r["real_program"] and f"{r['real_program']['eager_score']:.2f} / {r['real_program']['score']:.2f} ({len(r['real_program']['tasks'])} tasks)",
                  r["real_program"] and f"{r['real_program']['identical_answers']:.2f} ({r['real_program']['n']})"] for r in records],
                "llrrrrrr",
            )
            write_record(args.results, {"notes": notes, "records": records}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
