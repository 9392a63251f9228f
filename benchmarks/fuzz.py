"""Fuzz campaign over everything hydraopt reads from outside (issue 11): the targets of
tests/fuzz_cases.py (adapter configs, adapter safetensors headers, bundle manifests, bundle task
files, export manifests, ExecuTorch task files), each for a share of the time budget, in batches
of random seeds. A finding is a case that raised anything but the tool's own error types, opened a
file outside the input's folder, or did not round-trip once accepted; each is recorded with its
seed and message (not shrunk: shrinking would spend the time budget on one finding; re-run the
seed with tests/test_fuzz.py's settings to shrink it).

    python benchmarks/fuzz.py [--seconds 240] [--batch 100] [--targets NAME ...]

Writes benchmarks/results/fuzz.json and fuzz.md.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import tempfile
import time
from pathlib import Path

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from common import RESULTS_DIR as RESULTS, ROOT  # first: it puts this checkout on sys.path

sys.path.insert(0, str(ROOT / "tests"))
from fuzz_cases import TARGETS, run_case  # noqa: E402

from hydraopt_mobile.app.records import markdown_table, write_record


def campaign(name: str, seconds: float, batch: int, first_seed: int) -> dict:
    """Batches of ``batch`` cases with seeds first_seed, first_seed+1, ... until ``seconds`` pass."""
    target = TARGETS[name]
    outcomes: collections.Counter[str] = collections.Counter()
    findings = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        pristine = target.make(Path(root))
        n = first_seed
        while time.perf_counter() - t0 < seconds:

            @seed(n)
            @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(data=st.data())
            def case(data):
                with tempfile.TemporaryDirectory() as work:
                    outcomes[run_case(target, data, pristine, Path(work))] += 1

            try:
                case()
            except Exception as e:  # a finding: recorded, and the campaign goes on with the next seed
                findings.append({"seed": n, "error": f"{type(e).__name__}: {e}"[:2000]})
            n += 1
    return {
        "target": name,
        "cases": sum(outcomes.values()),
        "outcomes": dict(outcomes.most_common()),
        "findings": findings,
        "seeds": [first_seed, n - 1],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Fuzz campaign over the readers (issue 11)",
        "",
        f"`{meta['command']}`: {meta['cases']} cases in {meta['seconds']:.0f} s, **{meta['findings']} findings**; "
        f"hypothesis {meta['hypothesis']}, {meta['torch_threads']} torch thread, {meta['machine']}.",
        "",
        "A case: a valid input (2 layers, 64 x 64, r=4) with 1-3 random edits (values replaced by hostile or",
        "mistyped ones, keys deleted, lists permuted, indices nudged, header bytes flipped or truncated), read by",
        "the real reader. Accepted ones are written back and read again (round trip); all of them run under an",
        "audit hook that fails the case if a file outside the input's folder is opened.",
        "",
        *markdown_table(["target", "cases", "outcomes", "findings", "seconds"],
                        ([r["target"], r["cases"], ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()), len(r["findings"]), r["seconds"]] for r in result["targets"])),
    ]
    for r in result["targets"]:
        for f in r["findings"]:
            lines += ["", f"- {r['target']} (seed {f['seed']}): `{f['error'].splitlines()[0]}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=240, help="total time budget, shared equally by the targets")
    parser.add_argument("--batch", type=int, default=100, help="cases per seed")
    parser.add_argument("--targets", nargs="*", default=sorted(TARGETS), choices=sorted(TARGETS))
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    share = args.seconds / len(args.targets)
    targets = [campaign(name, share, args.batch, 1000 * i) for i, name in enumerate(args.targets)]
    command = "python benchmarks/fuzz.py" + "".join(f" {a}" for a in sys.argv[1:])
    result = {
        "meta": {
            "command": command,
            "cases": sum(t["cases"] for t in targets),
            "findings": sum(len(t["findings"]) for t in targets),
            "seconds": round(time.perf_counter() - t0, 1),
            "hypothesis": hypothesis.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, 2 shared cores",
        },
        "targets": targets,
    }
    write_record(args.out.with_suffix(".json"), result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
