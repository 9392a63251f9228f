"""What an app's build runs before packaging, written against the library instead of the CLI:
merge the team's task adapters under a storage budget, export one program plus a file per task,
then open the export on its runtime and answer one prompt per task, switching tasks in place.

    python examples/build_for_app.py ads/summarise ads/reply --budget 12MB --out build/
    python examples/build_for_app.py ads/* --budget 0.25 --model base-model/ --format executorch --quant 8da4w --out build/

Writes ``build/bundle`` (the merged bank: what `hydraopt inspect` reads) and ``build/export`` (the
program, its task files and tokenizer: what the app ships). Nothing is overwritten: an existing
``--out`` is refused. The same steps as ``hydraopt merge``, ``hydraopt export`` and ``hydraopt
bench host``; ``tests/test_examples.py`` runs this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporters.export import export_bank
from exporters.runtime import answer_tasks
from hydraopt_mobile.adapters import load_adapter_set
from hydraopt_mobile.app.quiet import silence_third_party
from hydraopt_mobile.bundle import load_bundle
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge_to_bundle
from hydraopt_mobile.sharing import plan_label


def build(adapters: list[str], budget: str, out: Path, model: Path, fmt: str, quant: str) -> Path:
    """The bundle and the export under ``out``; returns the export folder."""
    if out.exists():
        raise UserError(f"{out}: exists; choose another --out")
    adapter_set = load_adapter_set(adapters, lazy=True)  # each module read when the merge reaches it
    bundle = merge_to_bundle(adapter_set, MergeConfig("hydraopt", budget=Budget.parse(budget)), out / "bundle")
    bank = load_bundle(bundle)
    print(f"merged {len(bank.tasks)} tasks into {bank.total_file_bytes():,} file bytes "
          f"({bank.storage_fraction():.3f} of the adapters in fp16); plan: {plan_label(bank)}")
    return export_bank(bundle, model, fmt, quant, out / "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", help="PEFT LoRA folders, PATH or NAME=PATH")
    parser.add_argument("--budget", default="0.25", help="a fraction of the adapters' fp16 file bytes, or bytes with a unit (12MB)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder: bundle/ and export/ go in it")
    parser.add_argument("--model", type=Path, help="the base model folder (default: the packaged SmolLM2-135M)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "executorch"])
    parser.add_argument("--quant", default="fp32", help="onnx: fp32 | int8 | int4 ...; executorch: fp32 | 8da4w ... (hydraopt export --help)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    args = parser.parse_args(argv)
    silence_third_party()  # as the CLI does: our output, not the libraries' warnings
    if args.model is None:
        from hydraopt_mobile.suite.model import base_model_dir

        args.model = base_model_dir()
    try:
        export = build(args.adapters, args.budget, args.out, args.model, args.format, args.quant)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {export}")
    for answer in answer_tasks(export, args.prompt, max_new_tokens=16):  # one session; the tasks switch in place
        print(f"{answer['task']}: {answer['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
