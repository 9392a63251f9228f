"""Both back ends on a tiny Llama, run on the real runtimes (ExecuTorch Python runtime, ONNX Runtime).

The reference is plain Hugging Face PyTorch with the task's ``B @ A`` added into the base weights
and no KV cache (one full forward), so it checks the LoRA slots, the cache graph and the switching
together. Tolerances:

- fp32: 1e-4 absolute on logits of magnitude ~1. Both sides compute the same fp32 arithmetic in a
  different order (unmerged vs merged LoRA, cached vs full attention); observed ~1e-6. A wrong or
  stale task moves logits by ~0.7 here, 4 orders of magnitude above the bound.
- quantised (4-bit weights and, on ONNX, embedding; group 32): observed 0.05-0.35 on this random tiny
  model, whose logits differ by 0.7-1.0 between tasks. Bound 0.5, and the quantised output must stay
  clearly closer to its own task's reference than to any other task's (under 3/4 of the distance),
  i.e. quantisation noise must not swamp the task signal that switching selects.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from exporters.et_recipes import RECIPES
from exporters.export import export_bank
from exporters.manifest import Manifest, TaskFileError
from exporters.runtime import greedy, open_export
from hydraopt_mobile.errors import UserError
from tiny_models import PROMPT, TASKS, make_bank, reference_logits, run_logits, task_errors

torch.set_num_threads(1)
FP32_TOL = 1e-4
QUANT_TOL = 0.5


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dir, bank) -> dict:
    root = tmp_path_factory.mktemp("exports")
    made: dict[tuple[str, str], Path] = {}

    def get(fmt: str, quant: str) -> Path:
        if (fmt, quant) not in made:
            made[(fmt, quant)] = export_bank(bank, tiny_dir, fmt, quant, root / f"{fmt}-{quant}", max_cache_len=64)
        return made[(fmt, quant)]

    return get


RUNTIMES = ["onnx", "executorch"]
QUANTISED = {"onnx": "int4", "executorch": "8da4w"}


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_fp32_matches_pytorch_for_every_task(fmt, exports, refs):
    session = open_export(exports(fmt, "fp32"))
    for task in TASKS:
        session.set_task(task)
        seq, got = run_logits(session, PROMPT)
        err = np.abs(got - refs(task, seq)[: len(got)]).max()
        assert err < FP32_TOL, f"{fmt} task {task}: max logit error {err}"
        assert np.abs(got - refs(None, seq)[: len(got)]).max() > 100 * FP32_TOL, "the adapter had no effect"


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_no_task_is_the_base_model(fmt, exports, refs):
    session = open_export(exports(fmt, "fp32"))
    seq, got = run_logits(session, PROMPT)
    assert np.abs(got - refs(None, seq)[: len(got)]).max() < FP32_TOL


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_switching_1_2_1_gives_each_tasks_own_outputs(fmt, exports, refs):
    session = open_export(exports(fmt, "fp32"))
    outputs = []
    for task in ["alpha", "beta", "alpha", "gamma"]:
        session.set_task(task)
        seq, got = run_logits(session, PROMPT)
        assert np.abs(got - refs(task, seq)[: len(got)]).max() < FP32_TOL, f"after switching to {task}"
        outputs.append(got)
    np.testing.assert_array_equal(outputs[0], outputs[2])  # back to alpha: bit-identical
    assert np.abs(outputs[0][: len(PROMPT)] - outputs[1][: len(PROMPT)]).max() > 0.05


def _memory(slots) -> list:
    """The arrays a task's decoded slots live in: its block arrays and its stacked inputs' arrays."""
    arrays, families = slots.blocks
    return [*arrays, *families.values()]


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_an_unloaded_task_s_memory_serves_the_next_load_and_no_task_changes(fmt, exports, refs):
    """alpha and gamma have one layout: after alpha is unloaded, gamma decodes into its memory;
    every task still gives its own outputs, and the active task cannot be unloaded."""
    session = open_export(exports(fmt, "fp32"))
    session.set_task("alpha")
    alpha = _memory(session.decoded["alpha"])
    session.set_task("beta")
    with pytest.raises(UserError, match="'beta' is active"):
        session.unload("beta")
    session.unload("alpha")
    for task in ["gamma", "beta", "alpha"]:
        session.set_task(task)
        seq, got = run_logits(session, PROMPT)
        assert np.abs(got - refs(task, seq)[: len(got)]).max() < FP32_TOL, f"{fmt}: {task} after alpha was unloaded"
        if task == "gamma":
            gamma = _memory(session.decoded["gamma"])
            assert alpha and len(gamma) == len(alpha) and all(a is b for a, b in zip(alpha, gamma)), "gamma did not reuse alpha's memory"


def test_onnx_switch_unbinds_the_previous_task_s_slots(exports, refs):
    """The ONNX decoder binds a task's slots once (OrtDecoder): binding another set must drop every
    slot of the one before, so binding none after alpha is the base model again, and alpha again is alpha."""
    session = open_export(exports("onnx", "fp32"))
    session.set_task("alpha")
    _, with_alpha = run_logits(session, PROMPT)
    session.decoder.set_slots({})  # what a merged export binds
    seq, got = run_logits(session, PROMPT)
    assert np.abs(got - refs(None, seq)[: len(got)]).max() < FP32_TOL, "alpha's slots stayed bound"
    session.set_task("alpha")
    np.testing.assert_array_equal(run_logits(session, PROMPT)[1], with_alpha)


def test_onnx_slot_values_refuse_what_onnx_runtime_would_misread():
    """Slot values share the arrays' memory and are typed FLOAT without a check of their own:
    another dtype or a strided view would be read as wrong numbers, so both are refused by name."""
    from exporters.targets.device_runner import OrtDecoder, Refused

    good = np.arange(12, dtype=np.float32).reshape(3, 4)
    value = OrtDecoder.slot_values({"m.lora_a": good})["m.lora_a"]
    np.testing.assert_array_equal(value.numpy(), good)
    for bad, why in [(good.astype(np.float16), "float16"), (good.T, "not C-contiguous")]:
        with pytest.raises(Refused, match=f"slot 'm.lora_a'.*{why}"):
            OrtDecoder.slot_values({"m.lora_a": bad})


def _slot_writes_and_reads(pte: Path) -> dict[str, dict]:
    """Per method of an ExecuTorch program: its operators, the buffers its ``copy_`` instructions
    write (by name) and the memory (id, offset) of the slot buffers it names."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    out = {}
    for plan in getattr(program, "program", program).execution_plan:
        ops = [o.name for o in plan.operators]
        name = lambda v: v.val.extra_tensor_info.fully_qualified_name if getattr(v.val, "extra_tensor_info", None) else None  # noqa: E731
        writes = [name(plan.values[i.instr_args.args[0]]) for i in plan.chains[0].instructions
                  if hasattr(i.instr_args, "op_index") and ops[i.instr_args.op_index] == "aten::copy_"]
        slots = {name(v): (v.val.allocation_info.memory_id, v.val.allocation_info.memory_offset_low)
                 for v in plan.values if (name(v) or "").endswith((".lora_a", ".lora_b"))}
        out[plan.name] = {"ops": set(ops), "writes": writes, "slots": slots}
    return out


@pytest.mark.parametrize("quant", ["fp32", "8da4w"])
def test_executorch_forward_reads_the_slots_inside_xnnpack_and_writes_none(quant, exports):
    """``forward`` computes the slot matmuls inside XNNPACK (no matmul left to ExecuTorch's own
    kernels) and writes no slot buffer (no write-back ``copy_``); ``set_slots`` writes every slot,
    into the same memory ``forward`` reads (exporters/executorch_backend.py: slot_partitioner)."""
    folder = exports("executorch", quant)
    methods = _slot_writes_and_reads(folder / Manifest.read(folder).entry("program").path)
    fwd, setter = methods["forward"], methods["set_slots"]
    assert not {"aten::mm", "aten::addmm", "aten::linear", "aten::bmm"} & fwd["ops"], fwd["ops"]
    assert not [w for w in fwd["writes"] if w and w.endswith((".lora_a", ".lora_b"))], fwd["writes"]
    names = {"model.model." + name for name, _ in Manifest.read(folder).slots}  # ExecuTorchDecoder's prefix
    assert set(setter["slots"]) == names and sorted(setter["writes"]) == sorted(names), setter["writes"]
    assert fwd["slots"] == setter["slots"], "forward reads other memory than set_slots writes"


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_quantised_error_is_bounded_and_keeps_tasks_apart(fmt, exports, refs):
    session = open_export(exports(fmt, QUANTISED[fmt]))
    for task in TASKS:
        _, _, own, others = task_errors(session, refs, task)
        assert own < QUANT_TOL, f"{fmt} {task}: quantised error {own}"
        assert own < 0.75 * others, f"{fmt} {task}: error to own task {own} vs to another {others}"


class _ProgramOnly:
    """Only ``prefill`` and ``decode`` of a real session (no manifest): the shape of another tool's
    program as ``benchmarks/vs_optimum.py`` runs it."""

    def __init__(self, session) -> None:
        self.prefill, self.decode = session.prefill, session.decode


def test_greedy_stops_at_a_given_eos_and_needs_no_manifest_then(exports):
    session = open_export(exports("onnx", "fp32"))
    session.set_task("beta")
    free = greedy(session, PROMPT, 6, eos=[])
    assert len(free.tokens) == 6
    stop = free.tokens[2]
    first = free.tokens.index(stop)
    bare = greedy(_ProgramOnly(session), PROMPT, 6, eos=[stop])
    assert bare.tokens == free.tokens[: first + 1]


def _linear_params(model_dir: Path) -> tuple[int, int]:
    """(base Linear weights without lm_head, lm_head weights) of the tiny model."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    body = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    return body, model.lm_head.weight.numel()


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_quantised_program_is_smaller_by_the_expected_factor(fmt, exports, tiny_dir):
    """Quantised weights go from 4 bytes to 4 bits + one fp32 scale per 32 values = 0.625 bytes.

    ExecuTorch (8da4w): the base Linears incl. the lm_head, which the fp32 program already stores
    apart from the tied embedding; the embedding stays fp32. ONNX (int4): the base MatMuls and the
    embedding (GatherBlockQuantized); the tied lm_head, stored once in fp32, gets a 4-bit copy of
    its own for MatMulNBits.
    """
    fp32 = Manifest.read(exports(fmt, "fp32")).bytes_of("program")
    quant = Manifest.read(exports(fmt, QUANTISED[fmt])).bytes_of("program")
    body, head = _linear_params(tiny_dir)
    if fmt == "executorch":
        expected = fp32 - (body + head) * (4 - 0.625)
    else:
        expected = fp32 - (body + head) * (4 - 0.625) + head * 0.625
    assert abs(quant - expected) / expected < 0.1, f"{fmt}: {quant} bytes, expected about {expected:.0f} (fp32 {fp32})"
    assert fp32 / quant > 2.0


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one flipped bit near the end (tensor data in a safetensors file)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_corrupted_or_swapped_task_file_is_refused_before_loading(fmt, exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exports(fmt, "fp32"), folder)
    manifest = Manifest.read(folder)
    alpha = folder / manifest.task_file("alpha").path
    session = open_export(folder)
    session.set_task("beta")
    _corrupt(alpha)
    with pytest.raises(TaskFileError, match="SHA-256"):
        session.set_task("alpha")
    shutil.copy(folder / manifest.task_file("gamma").path, alpha)  # alpha's and gamma's files have one layout
    with pytest.raises(TaskFileError, match="this export's file for 'gamma'"):
        session.load_task("alpha")
    alpha.write_bytes(alpha.read_bytes()[:-10])
    with pytest.raises(TaskFileError, match="truncated"):
        session.load_task("alpha")
    assert session.active == "beta"
    assert "alpha" not in session.decoded


def test_executorch_task_file_of_another_export_is_refused(exports, tiny_dir, tmp_path):
    """A task file of another bank (same layout, other values): refused by checksum, before ExecuTorch sees it."""
    other = export_bank(make_bank(seed=9), tiny_dir, "executorch", "fp32", tmp_path / "other", max_cache_len=64)
    foreign = other / Manifest.read(other).task_file("alpha").path
    session = open_export(exports("executorch", "fp32"))
    with pytest.raises(TaskFileError, match="another export"):
        session.load_task("alpha", foreign)
    assert "alpha" not in session.loaded


def test_unknown_task_is_a_clear_error(exports):
    session = open_export(exports("onnx", "fp32"))
    with pytest.raises(UserError, match="not in export"):
        session.set_task("delta")


@pytest.mark.parametrize("fmt", RUNTIMES)
def test_data_files_are_the_banks_files_in_its_number_format(fmt, tiny_dir, tmp_path):
    """int8 / int4 factors stay int8 / int4 (packed) on disk: the export's data files are the
    bank's own files, byte for byte the sizes ``MergedBank.file_bytes`` gives, and decoding them at
    load gives exactly the bank's effective adapter."""
    bank = make_bank(seed=4, formats=("int8", "int4-g32", "fp16"))
    folder = export_bank(bank, tiny_dir, fmt, "fp32", tmp_path / "mixed", max_cache_len=64)
    manifest = Manifest.read(folder)
    data = {f.path.removeprefix("bank/"): f.bytes for f in manifest.files if f.role in ("shared", "task")}
    assert data == bank.file_bytes()
    assert all((folder / "bank" / rel).stat().st_size == n for rel, n in data.items())
    assert manifest.resident_bytes() == manifest.bytes_of("program") + bank.file_bytes()["shared.safetensors"]
    session = open_export(folder)
    for task in TASKS:
        assert manifest.task_bytes(task) == bank.file_bytes()[f"tasks/{task}.safetensors"]
        session.set_task(task)
        seq, got = run_logits(session, PROMPT)
        assert np.abs(got - reference_logits(tiny_dir, bank, task, seq)[: len(got)]).max() < FP32_TOL


def test_onnx_int8_is_closer_to_fp32_than_int4_and_sized_as_expected(exports, refs, tiny_dir):
    """8-bit codes + one fp32 scale per 32 values = 1.125 bytes per base MatMul weight, and a far
    smaller error than int4 on every task. ONNX Runtime's quantiser packs Gather only to 4 bits, so
    at int8 the embedding stays fp32 and the tied lm_head gets an 8-bit copy of its own."""
    errors = {}
    for quant in ("int4", "int8"):
        session = open_export(exports("onnx", quant))
        worst = 0.0
        for task in TASKS:
            session.set_task(task)
            seq, got = run_logits(session, PROMPT)
            worst = max(worst, float(np.abs(got - refs(task, seq)[: len(got)]).max()))
        errors[quant] = worst
    assert errors["int8"] < errors["int4"] / 4, errors
    fp32 = Manifest.read(exports("onnx", "fp32")).bytes_of("program")
    int8 = Manifest.read(exports("onnx", "int8")).bytes_of("program")
    body, head = _linear_params(tiny_dir)
    expected = fp32 - body * (4 - 1.125) + head * 1.125
    assert abs(int8 - expected) / expected < 0.1, f"{int8} bytes, expected about {expected:.0f} (fp32 {fp32})"


RECOMMENDED = "8da4w-mixed-qkv-noclip"  # the ExecuTorch 4-bit recipe the README recommends


@pytest.mark.parametrize("quant", ["8da4w-mixed", "8da4w-mixed-noclip", RECOMMENDED])
def test_executorch_mixed_recipe_keeps_the_sensitive_linears_at_8_bits(tiny_dir, quant):
    """A mixed recipe in eager: its ``int8_modules`` (down_proj, v_proj, with ``-qkv`` also q_proj and k_proj, and the LM
    head) get int8 codes with one scale per output channel; every other base Linear int4 codes ([-8, 7])
    with one scale per 32 inputs; the slot factors stay fp32 buffers."""
    from exporters.executorch_backend import quantize
    from exporters.slots import attach_slots
    from hydraopt_mobile.base_model import load_causal_lm

    eight_bit = set(RECIPES[quant].int8_modules)
    model = load_causal_lm(tiny_dir)
    attach_slots(model, {"model.layers.0.self_attn.v_proj": 4, "model.layers.0.self_attn.q_proj": 4})
    quantize(model, quant)
    seen = {4: 0, 8: 0}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        codes, scale = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        assert codes.dtype == torch.int8
        if set(name.split(".")) & eight_bit:
            assert scale.shape == (m.out_features, 1), name
            assert codes.abs().max() > 64, name  # uses the int8 range
            seen[8] += 1
        else:
            assert scale.shape == (m.out_features, m.in_features // 32), name
            assert codes.min() >= -8 and codes.max() <= 7, name
            seen[4] += 1
    per_layer = len(eight_bit - {"lm_head"})  # of a layer's 7 Linears
    assert seen[8] == 2 * per_layer + 1 and seen[4] == 2 * (7 - per_layer), seen  # 2 layers and the head
    slot = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert slot.lora_a.dtype == torch.float32 and slot.lora_b.dtype == torch.float32


def test_executorch_mixed_recipe_lowers_switches_and_is_closer_than_8da4w(exports, refs, tiny_dir):
    """The lowered ``8da4w-mixed-qkv-noclip`` program (the recommended recipe) runs every task within the quantised bound, apart from the
    other tasks, switches back bit-identically, errs less than ``8da4w``, and is larger than 8da4w by
    what the 8-bit Linears cost: per weight a byte instead of half a byte and a bf16 scale per 32
    (XNNPACK stores per-group scales as bf16), plus an fp32 scale per output channel."""
    session = open_export(exports("executorch", RECOMMENDED))
    worst = {}
    outputs = []
    for task in ["alpha", "beta", "gamma", "alpha"]:
        _, got, own, others = task_errors(session, refs, task)
        assert own < QUANT_TOL, f"{task}: quantised error {own}"
        assert own < 0.75 * others, f"{task}: error to own task {own} vs to another {others}"
        worst["mixed"] = max(worst.get("mixed", 0.0), own)
        outputs.append(got)
    np.testing.assert_array_equal(outputs[0], outputs[3])
    plain = open_export(exports("executorch", "8da4w"))
    worst["8da4w"] = max(task_errors(plain, refs, task)[2] for task in TASKS)
    assert worst["mixed"] < worst["8da4w"], worst

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    eight_bit = set(RECIPES[RECOMMENDED].int8_modules)
    eight = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and set(n.split(".")) & eight_bit]
    extra = sum(m.weight.numel() * (1 - 0.5 - 2 / 32) + 4 * m.out_features for m in eight)
    mixed = Manifest.read(exports("executorch", RECOMMENDED)).bytes_of("program")
    base = Manifest.read(exports("executorch", "8da4w")).bytes_of("program")
    assert abs((mixed - base) - extra) < 0.1 * extra, f"mixed {mixed} - 8da4w {base} = {mixed - base}, expected about {extra:.0f}"


def test_executorch_session_keeps_the_runtime_s_native_log_off_standard_error(exports, tmp_path):
    """ExecuTorch's runtime writes its CPU-info and thread-pool set-up to the process's stderr on
    every session open ("Resetting threadpool to 1 threads."): held back unless the open fails."""
    import subprocess
    import sys

    folder = exports("executorch", "fp32")
    code = ("import sys\nfrom exporters.runtime import open_export\n"
            "session = open_export(sys.argv[1])\nsession.set_task(session.tasks[0])\nsession.prefill([1, 2, 3])\nprint('ran')\n")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ran", r.stderr[-2000:]
    assert "threadpool" not in r.stderr and ".cpp:" not in r.stderr, r.stderr[-2000:]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    program = broken / Manifest.read(broken).entry("program").path
    program.write_bytes(program.read_bytes()[:4096])  # a truncated program: the runtime fails to load it
    r = subprocess.run([sys.executable, "-c", code, str(broken)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "threadpool" in r.stderr, r.stderr[-2000:]  # a failed open shows what the runtime said
