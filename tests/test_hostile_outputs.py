"""Careless and hostile inputs on the writing side (issue 11): task names that would escape the
output, --overwrite that would delete what is not ours, leftovers of killed runs, write failures,
adapter configs of the wrong types, and the small ones (empty --budget, NaN in JSON, file modes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hydraopt_mobile.adapters import AdapterError, load_adapter
from hydraopt_mobile.atomic import OutputExists, atomic_dir, remove_stale
from hydraopt_mobile.bundle import BUNDLE
from hydraopt_mobile.app.cli import app, console
from hydraopt_mobile.paths import MODULE_NAME_PATTERN, TASK_NAME_PATTERN
from hydraopt_mobile.schemas import schema
from hydraopt_mobile.synthetic import llama_shapes, planted_factors, write_peft_adapter

runner = CliRunner()
console.width = 250
REPO = Path(__file__).resolve().parent.parent


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"traceback instead of an error line: {result.exception!r}\n{result.output}"
    )
    return result.exit_code, " ".join(result.output.split())


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_task_name_cannot_write_outside_out(make_adapters, tmp_path):
    a, b = make_adapters(n_tasks=2)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"precious")
    out = tmp_path / "work" / "deep" / "b"
    code, text = run("merge", f"../../victim/model={a}", b, "--out", out)
    assert code == 2 and "task name '../../victim/model' is not allowed" in text
    assert (victim / "model.safetensors").read_bytes() == b"precious" and not out.exists()
    code, text = run("merge", f"a/b={a}", b, "--out", out)
    assert code == 2 and "task name 'a/b' is not allowed" in text and not out.exists()


@pytest.mark.parametrize("name", ["..", "a..b", ".hidden", "-x", "a b", "a\\b", "x" * 65, "trailing.", "tâche", "a:b"])
def test_task_names_outside_the_character_set_are_refused(make_adapters, name):
    (a,) = make_adapters(n_tasks=1)
    with pytest.raises(AdapterError, match="not allowed"):
        load_adapter(a, name)


def test_task_names_unique_ignoring_case_and_folder_names_checked(make_adapters, tmp_path):
    a, b = make_adapters(n_tasks=2)
    code, text = run("merge", f"Task={a}", f"task={b}", "--out", tmp_path / "b")
    assert code == 2 and "differ only in case" in text
    spaced = a.rename(a.parent / "my adapter")
    code, text = run("merge", spaced, b, "--out", tmp_path / "b")
    assert code == 2 and "folder name 'my adapter' is not a valid task name" in text and "NAME=PATH" in text
    code, text = run("merge", f"v1.2_x-y={spaced}", b, "--out", tmp_path / "b")
    assert code == 0, text
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["tasks"] == ["task1", "v1.2_x-y"]  # bundles keep tasks sorted


def test_module_names_that_are_not_module_paths_are_refused(tmp_path):
    """Module names become heatmap file names and graph input names: 'a./../../x' would escape."""
    f = planted_factors(llama_shapes(1, 64, 32), 1, 4)[0]
    A, B = next(iter(f.values()))
    a = write_peft_adapter(tmp_path / "a", {"model.layers.0/../../../evil.q_proj": (A, B)}, 4, 8)
    with pytest.raises(AdapterError, match="is not a PyTorch module path"):
        load_adapter(a)


def test_task_name_rule_is_the_one_in_the_schemas():
    assert schema("bundle-manifest")["$defs"]["task"]["pattern"] == TASK_NAME_PATTERN
    assert schema("export-manifest")["$defs"]["task"]["pattern"] == TASK_NAME_PATTERN
    assert schema("bundle-manifest")["properties"]["modules"]["items"]["prefixItems"][0]["pattern"] == MODULE_NAME_PATTERN


@pytest.mark.parametrize("command", ["merge", "analyze", "unpack"])
def test_overwrite_never_deletes_a_folder_this_tool_did_not_write(make_adapters, tmp_path, command):
    paths = make_adapters(n_tasks=2)
    bundle = tmp_path / "bundle"
    assert run("merge", *paths, "--out", bundle)[0] == 0
    out = tmp_path / "o"
    out.mkdir()
    (out / "KEEPME").write_text("mine")
    args = {"merge": ["merge", *paths], "analyze": ["analyze", *paths], "unpack": ["unpack", bundle, "--task", "task0"]}[command]
    code, text = run(*args, "--out", out, "--overwrite")
    assert code == 2 and "not a" in text and "written by hydraopt" in text
    assert sorted(p.name for p in out.iterdir()) == ["KEEPME"] and hidden(tmp_path) == []
    # its own earlier output is replaced
    own = tmp_path / "own"
    assert run(*args, "--out", own)[0] == 0
    code, text = run(*args, "--out", own, "--overwrite")
    assert code == 0, text
    assert hidden(tmp_path) == []


def test_overwrite_over_a_file_keeps_the_file_and_leaves_nothing(make_adapters, tmp_path):
    paths = make_adapters(n_tasks=2)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, text = run("merge", *paths, "--out", target, "--overwrite")
    assert code == 2 and "not a bundle written by hydraopt" in text
    assert target.read_text() == "mine" and hidden(tmp_path) == []


def test_overwrite_refuses_an_input_of_the_same_run_or_its_parent(make_adapters, tmp_path):
    a, b = make_adapters(n_tasks=2)
    before = (a / "adapter_model.safetensors").read_bytes()
    for out in (a, a.parent, tmp_path):
        code, text = run("merge", a, b, "--out", out, "--overwrite")
        assert code == 2 and "an input of this run" in text
    assert (a / "adapter_model.safetensors").read_bytes() == before
    bundle = tmp_path / "bundle"
    assert run("merge", a, b, "--out", bundle)[0] == 0
    manifest = (bundle / "manifest.json").read_bytes()
    code, text = run("unpack", bundle, "--task", "task0", "--out", bundle, "--overwrite")
    assert code == 2 and "an input of this run" in text
    # an unpacked folder is this tool's output, but not while it is an input of the run
    unpacked = tmp_path / "unpacked"
    assert run("unpack", bundle, "--task", "task0", "--out", unpacked)[0] == 0
    code, text = run("merge", f"u={unpacked}", b, "--out", unpacked, "--overwrite")
    assert code == 2 and "an input of this run" in text
    assert (bundle / "manifest.json").read_bytes() == manifest and run("inspect", bundle)[0] == 0


WRITER = """
import os, sys, time
from pathlib import Path
from hydraopt_mobile.atomic import atomic_dir, json_marker  # not bundle.py: no torch import, a quick start
with atomic_dir(Path(sys.argv[1]), overwrite=True, kind=json_marker("bundle", "manifest.json", "format", "hydraopt-bundle")) as tmp:
    (tmp / "big.bin").write_bytes(os.urandom(3 << 20))
    print("ready", flush=True)
    time.sleep(60)
"""


def _start_writer(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(out)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(make_adapters, tmp_path, sig):
    paths = make_adapters(n_tasks=2)
    out = tmp_path / "b"
    proc = _start_writer(out)
    proc.send_signal(sig)
    proc.wait(10)
    left = hidden(tmp_path)
    assert left and sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) > 3 << 20
    stranger = tmp_path / ".b.hydraopt-tmp-0123abcd"  # our name but no lock file: not ours to delete
    stranger.mkdir()
    (stranger / "data").write_text("someone else's")
    assert run("merge", *paths, "--out", out)[0] == 0
    assert hidden(tmp_path) == [stranger.name] and (stranger / "data").exists()


def test_a_live_run_keeps_its_temporary_folder(tmp_path):
    out = tmp_path / "b"
    proc = _start_writer(out)
    try:
        live = hidden(tmp_path)
        with atomic_dir(out, kind=BUNDLE) as tmp:  # a second run writing the same output meanwhile
            (tmp / "manifest.json").write_text('{"format": "hydraopt-bundle"}')
        assert out.is_dir() and hidden(tmp_path) == live
    finally:
        proc.kill()
        proc.wait(10)
    assert remove_stale(out) and hidden(tmp_path) == []


def test_output_appearing_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(OutputExists):
        with atomic_dir(out, kind=BUNDLE) as tmp:
            (tmp / "manifest.json").write_text("{}")
            out.mkdir()  # another program created it meanwhile
            (out / "theirs").write_text("keep")
    assert (out / "theirs").read_text() == "keep" and hidden(tmp_path) == []


def test_unwritable_output_is_one_line(make_adapters, tmp_path):
    paths = make_adapters(n_tasks=2)
    (tmp_path / "afile").write_text("x")
    code, text = run("merge", *paths, "--out", tmp_path / "afile" / "sub" / "b")
    assert code == 2 and "afile is a file, not a folder" in text and "Traceback" not in text
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        code, text = run("merge", *paths, "--out", ro / "b")
        assert code == 2 and "cannot write" in text


@pytest.mark.parametrize(
    "config, message",
    [
        ({"r": None}, "r: is null, expected integer"),
        ([1, 2], "top level: is a list"),
        ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern: 'q_proj(' is not a 'regex'"),
        ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern.q_proj: is a string"),
        ({"lora_alpha": "8"}, "lora_alpha: is a string"),
        ({"r": 0}, "r: 0 is less than the minimum of 1"),
        ({"use_rslora": "yes"}, "use_rslora: is a string"),
    ],
)
def test_adapter_config_types_are_checked_and_the_file_named(make_adapters, tmp_path, config, message):
    a, b = make_adapters(n_tasks=2)
    cfg_path = a / "adapter_config.json"
    if isinstance(config, dict):
        config = {**json.loads(cfg_path.read_text()), **config}
    cfg_path.write_text(json.dumps(config))
    code, text = run("merge", a, b, "--out", tmp_path / "b")
    assert code == 2 and str(cfg_path) in text and message in text, text


@pytest.mark.parametrize("raw", ['{"r": NaN}', '{"lora_alpha": Infinity}', "\xff\xfe", "[" * 100_000])
def test_adapter_config_that_is_not_strict_json_is_named(make_adapters, raw):
    (a,) = make_adapters(n_tasks=1)
    (a / "adapter_config.json").write_bytes(raw.encode("latin-1"))
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(a)


def test_empty_budget_and_format_refused(make_adapters, tmp_path):
    paths = make_adapters(n_tasks=2)
    code, text = run("merge", *paths, "--budget", "", "--out", tmp_path / "b")
    assert code == 2 and "--budget ''" in text
    code, text = run("merge", *paths, "--format", "", "--out", tmp_path / "b")
    assert code == 2 and "--format ''" in text
    assert not (tmp_path / "b").exists()


def test_similarity_json_is_strict_json(tmp_path):
    shapes = llama_shapes(2, 64, 32)
    f = planted_factors(shapes, 2, 4, 0.05, 0)
    low = {m: (A[:1], B[:, :1]) for m, (A, B) in f[1].items()}  # rank 1 vs rank 4: raw cosines undefined
    a = write_peft_adapter(tmp_path / "a", f[0], 4, 8)
    b = write_peft_adapter(tmp_path / "b", low, 1, 2)
    code, text = run("analyze", a, b, "--out", tmp_path / "sim")
    assert code == 0, text

    def no_constants(token):
        raise AssertionError(f"{token} in similarity.json")

    data = json.loads((tmp_path / "sim" / "similarity.json").read_text(), parse_constant=no_constants)
    assert data["format"] == "hydraopt-analysis"
    assert data["modules"]["model.layers.0.self_attn.q_proj"]["cos_A"][0][1] is None
    assert 0 <= data["summary"]["q_proj"]["subspace_A"] <= 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_get_the_usual_modes(make_adapters, tmp_path, umask):
    paths = make_adapters(n_tasks=2)
    old = os.umask(umask)
    try:
        assert run("merge", *paths, "--out", tmp_path / "b")[0] == 0
        assert run("unpack", tmp_path / "b", "--task", "task0", "--out", tmp_path / "u")[0] == 0
    finally:
        os.umask(old)
    for root in (tmp_path / "b", tmp_path / "u"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))



@pytest.mark.parametrize("quiet", [False, True])
def test_cli_boundary_hides_the_libraries_progress_bars(tmp_path, quiet):
    """transformers draws a "Loading weights" bar on every model load; the CLI's output stays ours."""
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    code = textwrap.dedent(f"""
        from hydraopt_mobile.app.quiet import silence_third_party
        if {quiet}:
            silence_third_party()
        from transformers import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained({str(model)!r})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("Loading weights" in r.stdout + r.stderr) is not quiet


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_boundary_hides_torch_warnings_logged_after_torch_loads(quiet):
    """The commands import torch after the CLI boundary hid third-party logs, and importing torch
    resets its logger to WARNING: ``hydraopt export`` printed torch.onnx's "torchvision is not
    installed" warning until the setting survived the import."""
    code = textwrap.dedent(f"""
        from hydraopt_mobile.app.quiet import silence_third_party
        if {quiet}:
            silence_third_party()
        import logging
        import torch
        logging.getLogger("torch.onnx._internal.exporter._registration").warning("a torch warning")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("a torch warning" in r.stderr) is not quiet


def test_error_lines_go_to_standard_error(tmp_path):
    """A refused input is reported on standard error, naming it, so standard output (a ``--json``
    result) never carries an error line."""
    missing = tmp_path / "no-such-bank"
    result = runner.invoke(app, ["inspect", str(missing), "--json"])
    assert result.exit_code == 2
    assert "error:" in result.stderr and str(missing) in " ".join(result.stderr.split())
    assert "error" not in result.stdout
