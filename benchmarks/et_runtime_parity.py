"""Why a quantised ExecuTorch export is not token-identical on ``arm64-cpu``: the runtime's version or
the CPU architecture's kernels? The same request (one export, some tasks, teacher-forced suite
examples, every answer row's logits) runs through the same device runner on three runtimes:

- ``host``: the exporter's ExecuTorch 1.5.1 on x86_64 (the parity reference of ``hydraopt bench arm64-cpu``);
- ``x86-1.1``: ExecuTorch 1.1.0 + torch 2.10.0 on x86_64, the version the arm64 target runs, from
  ``--x86-python`` (a venv made with ``pip install torch==2.10.0 executorch==1.1.0 numpy``; PyPI's
  x86 torch 2.10.0 is a CUDA build, about 7.5 GB installed, run here on the CPU; the project's own
  environments never install it);
- ``arm64-1.1``: the ``arm64-cpu`` target (ExecuTorch 1.1.0 aarch64 under qemu-user).

Pairwise: max logit error over the answer rows, argmax agreement, and identical tokens. If x86-1.1
equals host, the version does not matter and the aarch64 kernels are the difference; if it equals
arm64-1.1, the version is. Nothing is timed (latencies of the emulated run are not recorded).

    python benchmarks/et_runtime_parity.py EXPORT --x86-python /tmp/et11/bin/python [--tasks country-de,topic-en] [--examples 3]

Writes benchmarks/results/et_runtime_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
from pathlib import Path

import numpy as np

from common import RESULTS_DIR  # first: it puts this checkout on sys.path

from exporters.manifest import Manifest
from exporters.targets.protocol import Response, make_request, run_on_host, run_request
from exporters.runtime import export_tokenizer
from hydraopt_mobile.app.bench import task_prompts
from hydraopt_mobile.app.records import dict_table, write_record
from hydraopt_mobile.app.targets_bench import parity, ready_target, reference_answers


def compare(a: Response, b: Response) -> dict:
    """Over every answer row both sides returned (:func:`parity`, teacher-forced: every row's inputs
    are the same): max |logit difference|, argmax agreement, identical tokens."""
    checks = [(len(oa["tokens"]), parity(oa["tokens"], ob["tokens"], a.rows(entry, i), b.rows(entry, i), teacher_forced=True))
              for entry, (ea, eb) in enumerate(zip(a.entries(), b.entries()))
              for i, (oa, ob) in enumerate(zip(ea["outputs"], eb["outputs"]))]
    errs = [c["max_logit_err"] for _, c in checks]
    rows = sum(n for n, _ in checks)
    return {"max_logit_err": max(errs), "median_example_max_logit_err": float(np.median(errs)),
            "argmax_agreement": sum(n * c["agreement"] for n, c in checks) / rows, "answer_rows": rows,
            "tokens_identical": all(c["identical"] for _, c in checks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--x86-python", type=Path, required=True, help="python of an x86_64 venv with executorch==1.1.0 and torch==2.10.0")
    ap.add_argument("--tasks", default="country-de,topic-en")
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "et_runtime_parity.json")
    args = ap.parse_args()
    manifest = Manifest.read(args.export)
    if manifest.runtime != "executorch":
        sys.exit(f"{args.export}: not an ExecuTorch export ({manifest.runtime})")
    tasks = args.tasks.split(",")
    tokenizer = export_tokenizer(args.export)
    specs, prompts, _ = task_prompts(tokenizer, tasks, args.examples)
    answers = reference_answers(tokenizer, specs, prompts)
    request = make_request(args.export, tasks, prompts, 1, 1, args.examples, 1, answers)
    target = ready_target("arm64-cpu", "executorch")
    python, env = target.python(target.folder(), "executorch")
    runs = {"host": run_on_host(request),
            "x86-1.1": run_request([str(args.x86_python)], None, request, "x86-executorch-1.1", "measured"),
            "arm64-1.1": run_request(python, env, request, "arm64-cpu", target.latency_kind)}
    runtimes = {name: f"{r.data['runtime']} ({r.data['machine']})" for name, r in runs.items()}
    records = [{"pair": f"{x} vs {y}", "a": runtimes[x], "b": runtimes[y], **compare(runs[x], runs[y])}
               for x, y in itertools.combinations(runs, 2)]
    notes = {"export": args.export.name, "export_id": manifest.export_id, "quant": manifest.quant, "tasks": tasks,
             "examples_per_task": args.examples, "scoring": "teacher-forced: every answer row (answer tokens and end-of-turn)",
             "runtimes": runtimes, "host": platform.machine(),
             "command": "python benchmarks/et_runtime_parity.py " + " ".join(sys.argv[1:]),
             "x86_1_1_env": "pip install torch==2.10.0 executorch==1.1.0 numpy in its own venv (PyPI's x86 torch 2.10.0 is a CUDA build, "
                            "about 7.5 GB installed, run on the CPU); not one of the project's environments"}
    columns = ["pair", "max_logit_err", "median_example_max_logit_err", "argmax_agreement", "answer_rows", "tokens_identical"]
    md = "\n".join(["# ExecuTorch runtime parity: version or architecture", "", *(f"- **{k}**: {v}" for k, v in notes.items()), "",
                    *dict_table(records, columns), ""])
    write_record(args.out, {"notes": notes, "records": records}, md)
    for r in records:
        print(f"{r['pair']:24s} max logit err {r['max_logit_err']:.3g}  argmax agreement {r['argmax_agreement']:.3f}  tokens identical {r['tokens_identical']}")


if __name__ == "__main__":
    main()
