"""Every ONNX ``--quant`` recipe (exporters/onnx_quant.py) on a tiny Llama, run on ONNX Runtime.

Tolerances as in test_export_runtimes.py: this random tiny model's logits differ by 0.7-1.0
between tasks; a 4-bit recipe's error was observed at 0.03-0.25, an 8-bit one's under 0.01. Each
recipe must stay under 0.5 and clearly closer to its own task's reference than to any other
task's, through a switch away and back.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from exporters.export import export_bank
from exporters.manifest import Manifest
from exporters.onnx_recipes import HEAD, RECIPES
from exporters.runtime import open_export
from hydraopt_mobile.app.cli import app
from hydraopt_mobile.errors import UserError
from tiny_models import PROMPT, TASKS, make_bank, run_logits, task_errors

QUANT_TOL = 0.5
EIGHT_BIT_TOL = 0.05


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_dir, bank):
    root = tmp_path_factory.mktemp("recipes")
    made: dict[str, Path] = {}

    def get(quant: str) -> Path:
        if quant not in made:
            made[quant] = export_bank(bank, tiny_dir, "onnx", quant, root / quant, max_cache_len=64)
        return made[quant]

    return get


QUANTISED = [name for name, r in RECIPES.items() if r.bits != 32]


@pytest.mark.parametrize("quant", QUANTISED)
def test_recipe_stays_close_to_fp32_with_the_slots_switching(quant, exports, refs):
    session = open_export(exports(quant))
    tol = EIGHT_BIT_TOL if RECIPES[quant].bits == 8 else QUANT_TOL
    first = None
    for task in [*TASKS, TASKS[0]]:  # the last one switches back to the first task
        _, got, own, others = task_errors(session, refs, task)
        assert own < tol, f"{quant} {task}: error {own}"
        assert own < 0.75 * others, f"{quant} {task}: error to own task {own} vs to another {others}"
        if first is None:
            first = got
    np.testing.assert_array_equal(first, got)  # back to the first task: the same outputs


def _matmul_bits(path: Path) -> dict[str, int]:
    """Quantised weight name -> bits, from the MatMulNBits nodes of an exported program."""
    model = onnx.load(str(path), load_external_data=False)
    return {n.input[1]: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("quant", QUANTISED)
def test_every_base_matmul_has_its_recipes_width(quant, exports):
    bits = _matmul_bits(exports(quant) / "model.onnx")
    assert bits, quant
    for weight, b in bits.items():
        assert b == RECIPES[quant].bits_of(re.sub(r"_Q\d$", "", weight)), f"{quant}: {weight} at {b} bits"
    assert any(re.search(HEAD, re.sub(r"_Q\d$", "", w)) for w in bits), f"{quant}: the head MatMul is not quantised"


def test_head_and_mixed_recipes_widths(exports):
    """The head recipes' head at 8 bits and nothing else; int4-mixed adds down_proj and v_proj; the
    embedding is packed (GatherBlockQuantized) unless the recipe keeps it fp32."""
    for quant, eight in (("int4-head8", {"lm_head"}), ("int4-head8-embfp32", {"lm_head"}), ("int4-mixed", {"lm_head", "down_proj", "v_proj"})):
        bits = _matmul_bits(exports(quant) / "model.onnx")
        at8 = {kind for w, b in bits.items() if b == 8 for kind in ("lm_head", "down_proj", "v_proj") if kind in w}
        assert at8 == eight and {b for w, b in bits.items() if not any(k in w for k in eight)} == {4}, f"{quant}: {bits}"
        model = onnx.load(str(exports(quant) / "model.onnx"), load_external_data=False)
        gather = [n.op_type for n in model.graph.node if "embedding" in n.name]
        assert gather == ["Gather" if quant.endswith("embfp32") else "GatherBlockQuantized"], f"{quant}: {gather}"


def test_lora_matmuls_stay_fp32_in_every_recipe(exports):
    for quant in QUANTISED:
        model = onnx.load(str(exports(quant) / "model.onnx"), load_external_data=False)
        slots = {i.name for i in model.graph.input if "lora_" in i.name}
        assert slots, quant
        consumers = [n for n in model.graph.node if any(i in slots for i in n.input)]
        assert consumers and all(n.op_type != "MatMulNBits" for n in consumers), quant


def test_program_bytes_follow_the_block_size_and_the_head_width(exports):
    size = {q: Manifest.read(exports(q)).bytes_of("program") for q in ("fp32", "int4", "int4-b16", "int4-b64", "int4-head8", "int8", "int8-b16")}
    assert size["int4-b64"] < size["int4"] < size["int4-b16"], size
    assert size["int4"] < size["int4-head8"] < size["int8"] < size["int8-b16"] < size["fp32"], size


def test_derived_program_equals_a_lowered_one(exports, bank, tiny_dir, tmp_path):
    """A quantised program derived from the cached fp32 program is the one lowering gives directly."""
    derived = exports("int4-head8")
    assert Manifest.read(derived).extra["program_source"].startswith("derived")
    lowered = export_bank(bank, tiny_dir, "onnx", "int4-head8", tmp_path / "lowered", max_cache_len=64, use_cache=False)
    assert Manifest.read(lowered).extra["program_source"] == "lowered"
    outputs = []
    for folder in (derived, lowered):
        session = open_export(folder)
        session.set_task(TASKS[1])
        outputs.append(run_logits(session, PROMPT)[1])
    np.testing.assert_array_equal(*outputs)


def test_unknown_quant_lists_the_registry(tmp_path):
    with pytest.raises(UserError) as err:
        export_bank(make_bank(), tmp_path, "onnx", "int3", tmp_path / "x")
    for name, r in RECIPES.items():
        assert name in str(err.value) and r.description in str(err.value)
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "onnx", "--quant", "int3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert all(name in result.output for name in RECIPES), result.output


def test_export_help_describes_every_recipe():
    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "400"})
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # rich's panel borders and wrapping out
    for name, r in RECIPES.items():
        assert f"onnx {name}: {r.description}" in text, name  # one line per recipe, with its description
