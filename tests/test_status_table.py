"""The README's "Where the numbers stand" table is what benchmarks/status_table.py computes from the
committed records: nobody edits a figure or a verdict there by hand, and a regenerated record that
moves a figure fails this test until the table is written again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_status_table_is_what_the_records_give():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "status_table.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- status:begin -->", 1)[1].split("<!-- status:end -->", 1)[0]
    assert "| merge speed | 100 adapters at Llama-3-8B shapes" in block and block.count("\n| ") >= 20


def test_check_fails_on_a_hand_edited_table(tmp_path):
    """--check compares the README with the records; the same script on a checkout whose README
    table was edited by hand exits 1 naming the file."""
    checkout = tmp_path / "co"
    (checkout / "benchmarks").mkdir(parents=True)
    for f in ("status_table.py", "common.py"):
        (checkout / "benchmarks" / f).write_text((ROOT / "benchmarks" / f).read_text())
    (checkout / "benchmarks" / "results").symlink_to(ROOT / "benchmarks" / "results")
    (checkout / "hydraopt_mobile").symlink_to(ROOT / "hydraopt_mobile")
    readme = (ROOT / "README.md").read_text().replace("| merge speed | calibration pass", "| merge speed | calibration pass (edited)", 1)
    (checkout / "README.md").write_text(readme)
    done = subprocess.run([sys.executable, str(checkout / "benchmarks" / "status_table.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 1 and "README.md: the status table is not what benchmarks/status_table.py gives" in done.stderr
