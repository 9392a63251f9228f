"""``hydraopt merge`` -> ``hydraopt export`` -> ``hydraopt bench host`` as a user runs them, on a
tiny Llama that carries the packaged SmolLM2 tokenizer (so the suite's prompts render) and two
PEFT adapters named after suite tasks.

``bench host`` finds its PyTorch reference from data inside the export (the bank's own files under
``bank/``) and the base model from ``--model``: nothing in an export names a path of the machine
that wrote it, so the export folder can be moved (here: renamed) before it is benchmarked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_chat_model, peft_adapter_of
from typer.testing import CliRunner

from hydraopt_mobile.app.cli import app

TASKS = ["country-de", "topic-en"]
@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchhost")
    model = make_tiny_chat_model(root / "model")
    ads = [peft_adapter_of(model, root / "ads" / t, seed) for seed, t in enumerate(TASKS, start=1)]
    runner = CliRunner()
    merged = runner.invoke(app, ["merge", *map(str, ads), "--method", "hydraopt", "--budget", "0.5", "--out", str(root / "bank")])
    assert merged.exit_code == 0, merged.output
    exported = runner.invoke(app, ["export", str(root / "bank"), "--model", str(model), "--format", "onnx", "--out", str(root / "export")])
    assert exported.exit_code == 0, exported.output
    moved = root / "moved-export"
    (root / "export").rename(moved)  # an export is used where it is copied to, not where it was written
    return {"root": root, "model": model, "export": moved}


def test_an_export_names_no_path_of_the_machine_that_wrote_it(case):
    """The adapters name their base model by its local folder (an absolute path); the bundle and
    the export record the folder's name only."""
    texts = [p.read_text(errors="replace") for p in case["export"].rglob("*.json")]
    assert len(texts) >= 2, "an export has its manifest and its bank's"
    for text in texts:
        assert str(case["root"]) not in text
    assert json.loads((case["export"] / "bank" / "manifest.json").read_text())["base_model"] == "model"


def test_bench_host_runs_on_a_moved_export_with_the_reference_from_its_own_bank(case):
    out = case["root"] / "bench"
    r = CliRunner().invoke(app, ["bench", "host", str(case["export"]), "--model", str(case["model"]), "--examples", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    records = json.loads(out.read_text())["records"]  # --out OUT: OUT is the JSON record, OUT.md and OUT.png beside it
    assert sorted(rec["task"] for rec in records) == TASKS
    for rec in records:
        task_file = case["export"] / "bank" / "tasks" / f"{rec['task']}.safetensors"
        assert rec["bytes_task"] == task_file.stat().st_size > 0
        assert rec["max_logit_err"] is not None and rec["max_logit_err"] < 1e-3  # fp32 ONNX vs PyTorch with the bank's adapter
        assert rec["n_examples"] == 1 and rec["score"] is not None
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_bench_host_never_replaces_a_report_silently(case):
    """A second run with the same ``--out`` is refused before anything runs; ``--overwrite`` replaces it."""
    out = case["root"] / "again"
    args = ["bench", "host", str(case["export"]), "--model", str(case["model"]), "--examples", "1", "--task", TASKS[0], "--out", str(out)]
    out.with_suffix(".md").write_text("kept")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output, r.output
    assert not out.exists() and out.with_suffix(".md").read_text() == "kept"
    r = CliRunner().invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert [rec["task"] for rec in json.loads(out.read_text())["records"]] == [TASKS[0]] and out.with_suffix(".md").read_text() != "kept"


def test_bench_host_prints_json_alone_on_stdout_or_a_table(case):
    """``--json``: stdout is the records and nothing else (progress goes to stderr), so it pipes into
    a JSON reader; without it, one table row per export with the runtime's score and decode time."""
    args = ["bench", "host", str(case["export"]), "--model", str(case["model"]), "--examples", "1", "--task", TASKS[0]]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    (record,) = json.loads(r.stdout)
    assert record["task"] == TASKS[0] and record["decode_ms_per_token"] > 0
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "score (runtime)" in r.stdout and "decode ms/token" in r.stdout and case["export"].name in r.stdout
    assert "{" not in r.stdout  # a table, not the records' dicts


def test_the_runtime_process_error_reaches_the_caller_as_raised(tmp_path):
    """The runtime runs in a spawned process; what it raises is raised in the caller, same type and
    message (so the CLI reports it as the one-line error it is)."""
    from exporters.manifest import ManifestError
    from hydraopt_mobile.app.bench import _in_child

    with pytest.raises(ManifestError, match="no manifest.json"):
        _in_child(tmp_path / "not-an-export", {"t": [[1, 2]]}, {"t": 2}, 1)


def test_inspect_an_export_shows_its_program_then_the_bank_inside_it(case):
    """``hydraopt inspect`` takes an export as well as a bundle: the export's runtime, slots and
    resident bytes, then the bundle report of its ``bank/``; ``--json`` nests that report."""
    r = CliRunner().invoke(app, ["inspect", str(case["export"])], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "onnxruntime/fp32" in r.stdout and "q_proj: rank" in r.stdout and "plan:" in r.stdout
    r = CliRunner().invoke(app, ["inspect", str(case["export"]), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["runtime"] == "onnxruntime" and info["tasks"] == info["bank"]["tasks"] == sorted(TASKS)
    assert info["bytes"]["per_task"] == info["bank"]["bytes"]["per_task"]  # the export ships the bank's task files as they are


def test_inspect_a_merged_export_says_its_bank_is_the_reference(case):
    """An export with one task folded into the weights has no slots; the bundle it keeps is the
    bank that task came from, there for bench's reference, and inspect says so."""
    merged = case["root"] / "merged-export"
    r = CliRunner().invoke(app, ["export", str(case["root"] / "bank"), "--model", str(case["model"]), "--format", "onnx",
                                 "--merged-task", TASKS[0], "--out", str(merged)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["inspect", str(merged)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "slots none (a task merged in)" in r.stdout and "its task is merged into the weights" in r.stdout


def _run(case, *args: str, prompt: str = "Name a country.") -> list[dict]:
    r = CliRunner().invoke(app, ["run", str(case["export"]), prompt, "--max-new-tokens", "4", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _pytorch_greedy(case, task: str, ids: list[int], n: int = 4) -> list[int]:
    """Greedy tokens of the base model with ``task``'s effective adapter from the export's bank."""
    import torch
    from transformers import AutoModelForCausalLM

    from hydraopt_mobile.adapter_weights import applied
    from hydraopt_mobile.bundle import load_bundle

    model = AutoModelForCausalLM.from_pretrained(str(case["model"]), torch_dtype=torch.float32).eval()
    eos, seq, out = model.config.eos_token_id, list(ids), []
    with applied(model, load_bundle(case["export"] / "bank").task_factors(task)), torch.no_grad():
        while len(out) < n and (not out or out[-1] != eos):
            out.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


def test_run_answers_each_task_as_pytorch_does_with_that_task_adapter(case):
    """``hydraopt run``: one session switching tasks in place gives each task the greedy tokens of
    the base model with that task's effective adapter from the bank (PyTorch), in either order."""
    from exporters.runtime import export_tokenizer, prompt_ids

    records = _run(case)
    assert [r["task"] for r in records] == TASKS  # default: every task, in the export's order
    reversed_records = _run(case, "--task", TASKS[1], "--task", TASKS[0])
    assert [r["task"] for r in reversed_records] == TASKS[::-1]
    assert {r["task"]: r["tokens"] for r in reversed_records} == {r["task"]: r["tokens"] for r in records}
    ids = prompt_ids(export_tokenizer(case["export"]), "Name a country.")
    for r in records:
        assert 1 <= len(r["tokens"]) <= 4 and r["switch_ms"] > 0 and r["prefill_ms"] > 0
        assert r["tokens"] == _pytorch_greedy(case, r["task"], ids), r["task"]


def test_run_with_suite_instructions_prompts_each_task_as_it_was_trained(case):
    """``--suite-instructions``: each task's prompt is the suite's own rendering (its instruction as
    the system message, as in training and evaluation), so the answers are the suite's."""
    from exporters.runtime import export_tokenizer
    from hydraopt_mobile.suite.prompts import render_prompt
    from hydraopt_mobile.suite.tasks import Example, load_suite

    tokenizer = export_tokenizer(case["export"])
    records = _run(case, "--suite-instructions", prompt="Armenia")
    for r, spec in zip(records, load_suite(TASKS)):
        ids = tokenizer(render_prompt(tokenizer, spec, Example("Armenia", "")), add_special_tokens=False).input_ids
        assert r["tokens"] == _pytorch_greedy(case, r["task"], ids), r["task"]
    refused = CliRunner().invoke(app, ["run", str(case["export"]), "Armenia", "--suite-instructions", "--system", "x"], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "not with --system or --raw" in refused.stderr


def test_run_reads_the_prompt_from_standard_input_with_a_dash(case):
    argv = ["run", str(case["export"]), "-", "--max-new-tokens", "4", "--json"]
    piped = CliRunner().invoke(app, argv, input="Name a country.\n")
    assert piped.exit_code == 0, piped.output
    answers = [(r["task"], r["tokens"], r["answer"]) for r in json.loads(piped.stdout)]
    assert answers == [(r["task"], r["tokens"], r["answer"]) for r in _run(case)]  # as with the prompt as an argument
    empty = CliRunner().invoke(app, argv, input="", env={"COLUMNS": "200"})
    assert empty.exit_code == 2 and "standard input was empty" in empty.stderr


def test_run_names_the_task_an_export_lacks(case):
    r = CliRunner().invoke(app, ["run", str(case["export"]), "hi", "--task", "topic-xx"], env={"COLUMNS": "200"})
    assert r.exit_code == 2
    assert "no task 'topic-xx'" in r.stderr and "country-de, topic-en" in r.stderr


def test_bench_host_output_is_ours_on_an_executorch_export(case):
    """As a user runs it (a new process): standard error carries no library output. The runtime's
    process did not inherit the CLI's quieting (torchao's "Failed to load ..." import warnings), and
    ExecuTorch's runtime logged its thread-pool set-up on every session open."""
    import subprocess
    import sys

    export = case["root"] / "export-et"
    if not export.exists():
        made = CliRunner().invoke(app, ["export", str(case["root"] / "bank"), "--model", str(case["model"]), "--format", "executorch",
                                        "--max-cache-len", "128", "--out", str(export)])
        assert made.exit_code == 0, made.output
    r = subprocess.run([sys.executable, "-m", "hydraopt_mobile.app.cli", "bench", "host", str(export), "--model", str(case["model"]),
                        "--examples", "1", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(rec["task"] for rec in json.loads(r.stdout)) == TASKS
    assert r.stderr.strip() == "", r.stderr[-3000:]  # progress draws on a terminal only; here there is none
