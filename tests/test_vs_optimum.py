"""``benchmarks/vs_optimum.py``'s own machinery on real programs: the runner it drives the tools'
merged ExecuTorch programs with and its ETDump op profile (the CPU lock it shares with the other
timing scripts: tests/test_slot_overhead.py). The tool's program is stood in for by our fully merged export of the tiny model
(``merged_task``): one ``forward(input_ids, cache_position)`` over a KV cache the program keeps, the
interface optimum-executorch's ``.pte`` has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exporters.export import export_bank
from exporters.manifest import Manifest
from tiny_models import PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_optimum  # noqa: E402

torch.set_num_threads(1)
FP32_TOL = 1e-4  # as tests/test_export_runtimes.py


@pytest.fixture(scope="module")
def merged_pte(tmp_path_factory, tiny_dir, bank) -> Path:
    folder = export_bank(bank, tiny_dir, "executorch", "fp32", tmp_path_factory.mktemp("vs") / "merged", merged_task="beta", max_cache_len=64)
    return folder / Manifest.read(folder).entry("program").path


def test_tool_runner_decodes_a_merged_program_as_pytorch_does(merged_pte, refs):
    runner = vs_optimum.OptimumExecuTorch(merged_pte)
    prompt, follow = PROMPT[:-2], PROMPT[-2:]
    got = [runner.prefill(prompt)]
    got += [runner.decode(t)[None] for t in follow]
    got = np.concatenate(got)
    err = np.abs(got - refs("beta", PROMPT)[: len(PROMPT)]).max()
    assert err < FP32_TOL, f"prefill + decode through the runner: max logit error {err}"
    again = runner.prefill(prompt)  # a new sequence starts at position 0
    assert np.abs(again - got[: len(prompt)]).max() < FP32_TOL


def test_et_profile_splits_a_decode_step_into_xnnpack_and_executorch_run_ops(merged_pte, tmp_path):
    vs_optimum.etdump_run(merged_pte, 3, tmp_path / "p.etdp")
    prof = vs_optimum.etdump_read(merged_pte, 3, tmp_path / "p.etdp")
    assert prof["decode_steps"] == 3 and prof["execute_ms_per_step"] > 0
    assert prof["delegate_calls_per_step"] > 0 and prof["xnnpack_ms_per_step"] > 0
    assert any(k.startswith("Fully Connected") for k in prof["xnnpack_ms_by_kind"]), prof["xnnpack_ms_by_kind"]
    # our KV cache is written and read by ExecuTorch's LLM kernels (custom ops), which ExecuTorch runs itself
    assert {"llama::update_cache.out", "llama::custom_sdpa.out"} <= set(prof["operators_ms_by_op"]), list(prof["operators_ms_by_op"])
    assert prof["operator_calls_per_step"] == sum(v for k, v in prof["calls_per_step"].items() if k.startswith("op:"))
    parts = prof["xnnpack_ms_per_step"] + prof["operators_ms_per_step"]
    assert 0 < parts <= prof["execute_ms_per_step"] * 1.001, (parts, prof["execute_ms_per_step"])
    assert sum(prof["xnnpack_ms_by_kind"].values()) <= prof["xnnpack_ms_per_step"] * 1.001
