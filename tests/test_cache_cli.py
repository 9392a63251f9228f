"""``hydraopt cache``: sizes per part (a hard-linked file counted once), ``prune`` removes exactly
what no run can use again, ``clear`` removes named parts and refuses unknown ones."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exporters.export import export_bank
from exporters.program_cache import store_program
from hydraopt_mobile.app.cli import app

runner = CliRunner()


@pytest.fixture
def cache(tmp_path, tiny_dir, bank, monkeypatch) -> dict[str, Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv("HYDRAOPT_CACHE", str(root))
    monkeypatch.setenv("HYDRAOPT_PROGRAM_CACHE", str(root / "programs"))
    programs = root / "programs"
    export_bank(bank, tiny_dir, "onnx", "fp32", tmp_path / "first")  # lowers its program and stores a copy in the cache
    current = export_bank(bank, tiny_dir, "onnx", "fp32", root / "exports" / "onnx-fp32-hydraopt-current")  # links the cached one
    [kept] = programs.iterdir()
    old_what = json.loads((kept / "key.json").read_text())
    old_what = {**old_what, "tools": {**old_what["tools"], "torch": "2.0.0"}}  # lowered before an upgrade
    store_program("0" * 32, old_what, kept / "model.onnx")
    for name, age_s in ((".abandoned.x1", 3 * 86400), (".storing-now.x2", 0)):
        (programs / name).mkdir()
        (programs / name / "model.onnx").write_bytes(b"partial")
        os.utime(programs / name, (time.time() - age_s, time.time() - age_s))
    unreadable = root / "exports" / "onnx-fp32-hydraopt-old"
    unreadable.mkdir()
    (unreadable / "manifest.json").write_text("{}")
    (root / "answers").mkdir()
    (root / "answers" / "a.json").write_text("[]")
    return {"root": root, "kept": kept, "stale": programs / ("0" * 32), "abandoned": programs / ".abandoned.x1",
            "storing": programs / ".storing-now.x2", "current": current, "unreadable": unreadable}


def _report() -> dict[str, dict]:
    r = runner.invoke(app, ["cache", "--json"])
    assert r.exit_code == 0, r.output
    return {row["part"]: row for row in json.loads(r.stdout)}


def test_report_counts_a_linked_program_once_and_names_what_prune_frees(cache):
    rows = _report()
    assert rows["programs"]["entries"] == 4 and rows["programs"]["stale_entries"] == 2  # the old key and the abandoned store
    assert rows["exports"]["entries"] == 2 and rows["exports"]["stale_entries"] == 1  # the unreadable export
    program = cache["kept"] / "model.onnx"
    assert (cache["current"] / program.name).stat().st_ino == program.stat().st_ino  # the export links the cached program
    assert rows["programs"]["bytes"] >= 2 * program.stat().st_blocks * 512  # the kept and the stale program
    export_bytes = sum(f.stat().st_blocks * 512 for f in cache["root"].joinpath("exports").rglob("*") if f.is_file())
    assert rows["exports"]["bytes"] == export_bytes - program.stat().st_blocks * 512  # the link counted once, in programs
    assert rows["answers"]["entries"] == 1 and rows["models"]["entries"] == 0


def test_prune_removes_only_what_no_run_uses_again(cache):
    r = runner.invoke(app, ["cache", "prune"])
    assert r.exit_code == 0, r.output
    for gone in ("stale", "abandoned", "unreadable"):
        assert not cache[gone].exists(), gone
    for kept in ("kept", "storing", "current"):
        assert cache[kept].exists(), kept
    assert (cache["root"] / "answers" / "a.json").exists()
    assert not [p for p in (cache["root"] / "programs").iterdir() if p.name.startswith(".removing-")]
    rows = _report()
    assert rows["programs"]["stale_entries"] == rows["exports"]["stale_entries"] == 0


def test_clear_removes_named_parts_and_refuses_others(cache):
    r = runner.invoke(app, ["cache", "clear", "answers", "exports"])
    assert r.exit_code == 0, r.output
    assert not (cache["root"] / "answers").exists() and not (cache["root"] / "exports").exists()
    assert cache["kept"].exists()
    for args, says in ((["nope"], "no cache part 'nope'"), ([], "or pass --all")):
        r = runner.invoke(app, ["cache", "clear", *args], env={"COLUMNS": "200"})
        assert r.exit_code == 2 and says in r.stderr, r.output
