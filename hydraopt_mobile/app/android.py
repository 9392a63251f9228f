"""The Android demo from the command line: ``hydraopt android build`` (a thin wrapper around
``android_demo/build.sh``) and ``hydraopt bench android-adb EXPORT`` (the app's benchmark mode on an
attached phone over adb, speaking the device-runner protocol ``hydraopt-device-runner/1`` defined in
``android_demo/app/src/main/java/org/hydraopt/demo/DeviceRunner.java``).

On the phone, the app only runs token ids through ONNX Runtime; tokenising, decoding and scoring stay
here, with the export's own tokenizer, so the records have the host records' fields
(``hydraopt_mobile/app/bench.py``) plus ``target`` and ``latency_kind``. With no device attached the command
says so and stops (exit code 2); nothing is written.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from hydraopt_mobile.errors import UserError

from .failures import reported
from .records import refuse_existing, write_record

ROOT = Path(__file__).resolve().parents[2]  # the repository (android_demo/, benchmarks/)
BUILD_SH = ROOT / "android_demo" / "build.sh"
PACKAGE = "org.hydraopt.demo"
DEVICE_FILES = f"/sdcard/Android/data/{PACKAGE}/files"
PROTOCOL = "hydraopt-device-runner/1"
console = Console(soft_wrap=True)  # a line of text stays one line in a pipe or a log (tables still fit the width)
android_app = typer.Typer(help="The Android demo app (android_demo/).", no_args_is_help=True)


class NoDevice(UserError):
    """No phone (or emulator) is attached, or several and no --serial."""


class DeviceError(RuntimeError):
    """adb, the APK build or the app on the phone failed; the message says which."""


def adb(*args: str, timeout: int = 600) -> str:
    """Debian's adb, from the cache that build.sh fills."""
    r = subprocess.run(["bash", str(BUILD_SH), "adb", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise DeviceError(f"adb {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def attached_devices() -> list[str]:
    lines = adb("devices").splitlines()
    return [line.split()[0] for line in lines[1:] if line.strip() and line.split()[-1] == "device"]


def build_apk(args: list[str]) -> Path:
    r = subprocess.run(["bash", str(BUILD_SH), *args], capture_output=False, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise DeviceError(f"android_demo/build.sh {' '.join(args)} failed ({r.returncode})")
    return Path(r.stdout.strip().splitlines()[-1].split()[0])


def bench_android_adb(export: Path, tasks: list[str] | None, n_examples: int, threads: int, apk: Path | None,
                      json_out: Path | None, serial: str | None = None) -> list[dict]:
    from exporters.manifest import Manifest, verify_all
    from exporters.runtime import export_tokenizer
    from hydraopt_mobile.suite.metrics import score

    from .bench import task_prompts

    devices = attached_devices()
    if not devices:
        raise NoDevice("no Android device attached (`android_demo/build.sh adb devices` lists none); nothing was run. "
                       "Connect a phone with USB debugging enabled and run this again.")
    if serial is None and len(devices) > 1:
        raise NoDevice(f"{len(devices)} devices attached ({', '.join(devices)}): choose one with --serial")
    target = ["-s", serial or devices[0]]
    manifest = Manifest.read(export)
    verify_all(manifest, export)
    names = [t for t in manifest.tasks if tasks is None or t in tasks]
    apk = apk or build_apk(["--no-export", "--out", str(ROOT / "android_demo" / "build")])
    adb(*target, "install", "-r", str(apk))
    remote = f"{DEVICE_FILES}/exports/{manifest.export_id}"
    adb(*target, "shell", "mkdir", "-p", remote)
    adb(*target, "push", f"{export}/.", remote, timeout=3600)
    tokenizer = export_tokenizer(export)
    specs, prompts, max_new = task_prompts(tokenizer, names, n_examples)
    request = {"protocol": PROTOCOL, "export": remote, "tasks": names, "prompts": prompts,
               "max_new_tokens": max(max_new.values()), "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "request.json"
        local.write_text(json.dumps(request))
        adb(*target, "push", str(local), f"{DEVICE_FILES}/request.json")
        adb(*target, "shell", "rm", "-f", f"{DEVICE_FILES}/response.json")
        adb(*target, "shell", "am", "start", "-W", "-n", f"{PACKAGE}/.MainActivity",
            "--es", "request", f"{DEVICE_FILES}/request.json", "--es", "response", f"{DEVICE_FILES}/response.json")
        deadline = time.monotonic() + 3600
        while "response.json" not in adb(*target, "shell", "ls", DEVICE_FILES):
            if time.monotonic() > deadline:
                raise DeviceError("the app wrote no response within an hour (adb logcat -s hydraopt)")
            time.sleep(2)
        adb(*target, "pull", f"{DEVICE_FILES}/response.json", str(Path(tmp) / "response.json"))
        result = json.loads((Path(tmp) / "response.json").read_text())
    if "error" in result:
        raise DeviceError(f"the app refused the run: {result['error']}")
    records = []
    for t in result["tasks"]:
        task = t["task"]
        outs = t["outputs"]
        tokens = [o["tokens"][: max_new[task]] for o in outs]
        texts = [tokenizer.decode(tok, skip_special_tokens=True).strip() for tok in tokens]
        records.append({
            "target": result["target"], "latency_kind": result["latency_kind"], "runtime": result["runtime"],
            "export": export.name, "export_id": manifest.export_id, "bank_digest": manifest.extra.get("bank_digest"),
            "quant": manifest.quant, "method": manifest.method, "task": task, "n_examples": len(outs),
            "bytes_resident": result["resident_bytes"], "bytes_task": t["task_bytes"],
            "bytes_total": result["resident_bytes"] + result["all_tasks_bytes"],
            "score": score(specs[task], texts, "test"),
            "switch_ms": t["switch_ms"], "task_load_ms": t["load_ms"], "program_load_ms": result["session_ms"],
            "prefill_ms": statistics.median(o["prefill_ms"] for o in outs) if outs else None,
            "decode_ms_per_token": statistics.median(o["decode_ms_per_token"] for o in outs) if outs else None,
            "threads": result["threads"],
        })
    if json_out is not None:
        write_record(json_out, {"notes": {"protocol": PROTOCOL}, "records": records})
    return records


def bench_android_adb_cmd(
    export: Path = typer.Argument(..., help="an ONNX export folder (hydraopt export --format onnx)"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
    n_examples: int = typer.Option(20, "--examples", help="test examples per task"),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime threads on the phone"),
    apk: Optional[Path] = typer.Option(None, "--apk", help="APK to install (default: build one without an export)"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "device_android.json", "--out", help="records JSON"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    serial: Optional[str] = typer.Option(None, "--serial", help="adb serial when several devices are attached"),
) -> None:
    """Push EXPORT to an attached Android phone, run it in the demo app's benchmark mode, pull the records."""
    with reported(console, also=(DeviceError,)):
        refuse_existing(out, overwrite)
        records = bench_android_adb(export, tasks, n_examples, threads, apk, out, serial)
    for r in records:
        console.print(f"{r['task']}: score {r['score']:.1f}, switch {r['switch_ms']:.3f} ms, load {r['task_load_ms']:.1f} ms, "
                      f"decode {r['decode_ms_per_token']:.1f} ms/token ({r['target']})")
    console.print(f"wrote {out}")


@android_app.command("build")
def android_build(
    export: Optional[Path] = typer.Option(None, "--export", help="ONNX export folder to carry in the APK's assets (hydraopt export --format onnx; default: $HYDRAOPT_ANDROID_EXPORT, else the demo bank's ONNX int4 export in the cache, which benchmarks/android_apk.py makes)"),
    no_export: bool = typer.Option(False, "--no-export", help="an APK without an export (hydraopt bench android-adb pushes one)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for hydraopt-demo.apk (default: android_demo/build/)"),
) -> None:
    """Build the demo app's signed debug APK (android_demo/build.sh; its tools are fetched and cached on first use)."""
    with reported(console):
        if export is not None and no_export:
            raise UserError("--export and --no-export: give one of them")
        if export is not None and not (export / "manifest.json").is_file():
            raise UserError(f"--export {export}: not an export folder (no manifest.json; hydraopt export --format onnx writes one)")
    args = [*(["--export", str(export)] if export is not None else []), *(["--no-export"] if no_export else []), *(["--out", str(out)] if out is not None else [])]
    r = subprocess.run(["bash", str(BUILD_SH), *args])
    raise typer.Exit(r.returncode)
