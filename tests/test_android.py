"""The Android demo app (android_demo/): the APK build, the app's Java tests on the host JVM, and the
export's load on the ONNX Runtime version inside the app.

Everything here runs for real: ``android_demo/build.sh`` fetches its tools (Debian packages through
private apt trees, ONNX Runtime's Android AAR from npm) into the project's cache, builds and checks a
signed APK around a real ONNX export of a tiny model, and runs the JUnit tests on the host JVM with
inputs made here by Python (the Hugging Face tokenizer's ids for every suite prompt, real exports).
A missing tool or registry fails these tests with the build script's message; nothing is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ANDROID = ROOT / "android_demo"
BUILD_SH = ANDROID / "build.sh"
APP_ORT = "1.29.0"  # the version inside the AAR that build.sh packs (npm com.github.asus4.onnxruntime@0.4.9)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TASKS = ["alpha", "beta", "gamma"]
BANK_FORMATS = ("int8", "int4-g32", "fp16")  # q, v, o projections (tests/test_export_runtimes.py: make_bank)
EDGE_CASES = [
    "", " ", "   ", "a  b   c", "  leading", "trailing  \n\n", "tabs\tand\u00a0nbsp\u3000ideographic",
    "don't I'll we've they'd it's", "1234567 3.14 -42 1e10", "emoji \U0001F600\U0001F44D\U0001F3FD!",
    "\u4e2d\u6587\u5b57\u7b26", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "mixed<|im_start|>inside<|im_end|>text", "a\r\nb", "line\u2028sep", "\u00c0\u00c9\u00ce\u00f5\u00fc \u00df",
    "<|im_end|><|im_start|>", "x" * 300, "M\u00fcnchen Z\u00fcrich S\u00e3o Paulo", "$100.00 \u20ac50 \u00a330",
]


def android_cache() -> Path:
    from hydraopt_mobile.suite.model import cache_root

    return cache_root() / "android"


def run_build(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(BUILD_SH), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"build.sh {' '.join(args[:1])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer files: from the converted model in the cache, else from the packaged GGUF."""
    from hydraopt_mobile.suite.model import MODEL_ID, cache_root, gguf_path

    converted = cache_root() / "models" / MODEL_ID
    if all((converted / n).is_file() for n in TOKENIZER_FILES):
        return converted
    from transformers import AutoTokenizer

    gguf = gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Real ONNX exports of a tiny Llama with SmolLM2's tokenizer files: fp32, int4 (what the APK
    carries by default) and a second fp32 export of another bank (its task files are foreign). The
    bank stores its factors in all three number formats (int8, int4, fp16), shared and per task."""
    from tiny_models import make_bank, make_tiny_model

    from exporters.export import export_bank

    root = tmp_path_factory.mktemp("android")
    model = make_tiny_model(root / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model / name)
    bank = make_bank(formats=BANK_FORMATS)
    made = {q: export_bank(bank, model, "onnx", q, root / f"onnx-{q}", max_cache_len=64) for q in ("fp32", "int4")}
    made["foreign"] = export_bank(make_bank(seed=2, formats=BANK_FORMATS), model, "onnx", "fp32", root / "foreign", max_cache_len=64)
    return made


@pytest.fixture(scope="module")
def slots_reference(tmp_path_factory, exports) -> Path:
    """Every task's fp32 slots as the host decodes them (exporters/targets/device_runner.py:
    BankSlots, numpy); the Java port must give the same bits."""
    from exporters.targets.device_runner import BankSlots, Export

    export = Export(str(exports["fp32"]))
    bank = BankSlots(export.raw)
    bank.load_shared(export.verified(export.find("shared"), "the shared file"))
    ref = {task: {name: v.ravel().tolist() for name, v in bank.task_slots(task, export.verified_task_file(task)).items()}
           for task in export.tasks}
    path = tmp_path_factory.mktemp("slots-ref") / "slots.json"
    path.write_text(json.dumps(ref))
    return path


@pytest.fixture(scope="module")
def tokenizer_cases(tmp_path_factory, tokenizer_dir) -> Path:
    """Every suite prompt (all tasks, all splits) in the chat template, every target and edge cases,
    with the Hugging Face tokenizer's ids; the JUnit test compares the Java tokenizer with them."""
    from transformers import AutoTokenizer

    from hydraopt_mobile.suite.prompts import render_prompt
    from hydraopt_mobile.suite.tasks import load_suite

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts: list[str] = []
    chat = []
    for task in load_suite():
        for split in ("train", "val", "test"):
            for ex in task.split(split):
                texts += [render_prompt(tok, task, ex), ex.target, ex.prompt]
        ex = task.test[0]
        chat.append({"system": task.instruction, "user": ex.prompt, "text": render_prompt(tok, task, ex)})
    texts = list(dict.fromkeys(texts + EDGE_CASES))
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in texts]
    path = tmp_path_factory.mktemp("tokenizer-cases") / "cases.json"
    path.write_text(json.dumps({
        "tokenizer_json": str(tokenizer_dir / "tokenizer.json"),
        "chat_template": str(tokenizer_dir / "chat_template.jinja"),
        "n_cases": len(cases), "cases": cases, "chat": chat,
    }))
    return path


@pytest.fixture(scope="module")
def apk(tmp_path_factory, exports) -> tuple[Path, subprocess.CompletedProcess]:
    """Built as a user builds it: `hydraopt android build --export EXPORT --out DIR` (build.sh underneath)."""
    out = tmp_path_factory.mktemp("apk")
    r = subprocess.run([sys.executable, "-m", "hydraopt_mobile.app.cli", "android", "build", "--export", str(exports["int4"]), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"hydraopt android build failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out, r


def test_android_build_refuses_conflicting_or_wrong_exports(tmp_path):
    from typer.testing import CliRunner

    from hydraopt_mobile.app.cli import app

    runner = CliRunner()
    both = runner.invoke(app, ["android", "build", "--export", str(tmp_path), "--no-export", "--out", str(tmp_path / "apk")], env={"COLUMNS": "200"})
    assert both.exit_code == 2 and "--export and --no-export" in both.output
    wrong = runner.invoke(app, ["android", "build", "--export", str(tmp_path), "--out", str(tmp_path / "apk")], env={"COLUMNS": "200"})
    assert wrong.exit_code == 2 and "not an export folder" in wrong.output
    assert not (tmp_path / "apk").exists()


def test_apk_builds_signed_with_both_abis_the_app_and_the_export(apk, exports):
    out, r = apk
    path, size = r.stdout.strip().splitlines()[-1].split()
    assert Path(path) == out / "hydraopt-demo.apk" and Path(path).stat().st_size == int(size) > 0
    assert "checks passed: apksigner verify (v2)" in r.stderr
    names = set(zipfile.ZipFile(path).namelist())
    for abi in ("arm64-v8a", "x86_64"):
        assert f"lib/{abi}/libonnxruntime.so" in names and f"lib/{abi}/libonnxruntime4j_jni.so" in names
    assert {"AndroidManifest.xml", "classes.dex", "resources.arsc", "META-INF/MANIFEST.MF"} <= names
    export = exports["int4"]
    shipped = {n.removeprefix("assets/export/") for n in names if n.startswith("assets/export/")}
    assert shipped == {str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()}
    with zipfile.ZipFile(path) as z:
        assert z.read("assets/export/manifest.json") == (export / "manifest.json").read_bytes()
        assert z.getinfo("assets/export/model.onnx").compress_type == zipfile.ZIP_STORED
    info = json.loads((out / "build.json").read_text())
    assert info["apk_bytes"] == int(size) and info["ort_version"] == "1.29" and info["build_seconds"] > 0


def test_gradle_module_and_build_sh_compile_the_same_sources(apk):
    """The Gradle module uses the default source set; build.sh compiled exactly those files, and the
    dex holds each of their classes (and ONNX Runtime's)."""
    gradle = (ANDROID / "app" / "build.gradle").read_text()
    assert "sourceSets" not in gradle and "srcDir" not in gradle and "manifest.srcFile" not in gradle
    assert 'namespace "org.hydraopt.demo"' in gradle and "onnxruntime-android:1.29.0" in gradle
    main = ANDROID / "app" / "src" / "main"
    expected = sorted(str(p) for p in (main / "java").rglob("*.java"))
    build = apk[0] / "intermediates"
    assert (build / "sources.txt").read_text().split("\n")[:-1] == expected
    dex = set((build / "dex-classes.txt").read_text().split())
    for src in expected:
        assert str(Path(src).relative_to(main / "java").with_suffix("")) in dex
    assert {"ai/onnxruntime/OrtLoraAdapter", "ai/onnxruntime/OrtSession$RunOptions", "org/hydraopt/demo/R"} <= dex
    assert (main / "AndroidManifest.xml").is_file() and (main / "res" / "values" / "strings.xml").is_file()


def test_java_unit_tests_pass_on_the_host_jvm(exports, tokenizer_cases, slots_reference):
    """JUnit 4 (Debian junit4) on the app's plain-Java classes: tokenizer vs Python on every suite
    prompt, the manifest reader's rules, byte totals, the bank's files decoded bit-identically to the
    host's decoder, malformed bank files refused. Every @Test must have run."""
    r = run_build(
        "junit", f"-Dhydraopt.export={exports['fp32']}", f"-Dhydraopt.foreign_export={exports['foreign']}",
        f"-Dhydraopt.tasks={','.join(TASKS)}", f"-Dhydraopt.tokenizer.cases={tokenizer_cases}",
        f"-Dhydraopt.slots.reference={slots_reference}",
    )
    declared = _declared_tests("*Test.java") - _declared_tests("*HostTest.java")
    ran = re.search(r"^OK \((\d+) tests?\)", r.stdout, re.M)
    assert ran, r.stdout[-3000:]
    assert int(ran.group(1)) == declared >= 15


def _declared_tests(pattern: str) -> int:
    return sum(p.read_text().count("@Test") for p in (ANDROID / "app" / "src" / "test").rglob(pattern))


RUNTIME_PROMPT = [5, 17, 200, 33, 9, 121, 64, 3]


@pytest.fixture(scope="module")
def runtime_reference(tmp_path_factory, exports) -> Path:
    """What the host's Python runtime (exporters/runtime.py, ONNX Runtime 1.32) gives on the tiny
    exports: per task, last prefill logits, first decode logits, 6 greedy tokens; and the base model."""
    from exporters.runtime import greedy, open_export

    ref: dict = {"prompt": RUNTIME_PROMPT}
    for quant in ("fp32", "int4"):
        session = open_export(exports[quant])
        entry = {"export": str(exports[quant]), "base": {"tokens": greedy(session, RUNTIME_PROMPT, 6).tokens}, "tasks": {}}
        for task in TASKS:
            session.set_task(task)
            prefill = session.prefill(RUNTIME_PROMPT)
            step = session.decode(int(prefill[-1].argmax()))
            entry["tasks"][task] = {
                "prefill_last": prefill[-1].tolist(), "decode_first": step.tolist(),
                "tokens": greedy(session, RUNTIME_PROMPT, 6).tokens,
            }
        ref[quant] = entry
    path = tmp_path_factory.mktemp("runtime-ref") / "reference.json"
    path.write_text(json.dumps(ref))
    return path


def test_app_runtime_code_matches_the_host_runtime_on_the_host_jvm(runtime_reference):
    """OrtRunner (sessions, task load and switch, KV-cache decode) and DeviceRunner on real exports,
    on ONNX Runtime's Java API built for the host by build.sh (Java API + JNI glue 1.21.0 from Debian's
    source package, C library 1.30.0 from npm onnxruntime-node; the app ships 1.29.0 from the AAR)."""
    r = run_build("junit-runtime", f"-Dhydraopt.runtime.reference={runtime_reference}")
    ran = re.search(r"^OK \((\d+) tests?\)", r.stdout, re.M)
    assert ran, r.stdout[-3000:] + r.stderr[-2000:]
    assert int(ran.group(1)) == _declared_tests("*HostTest.java") >= 4


def _app_ort_python() -> Path:
    """A venv with ONNX Runtime's Python wheel of the app's version (its own environment, cached)."""
    venv = android_cache() / f"onnxruntime-{APP_ORT}-venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={APP_ORT}"], check=True, timeout=600)
        (venv / ".installed").touch()
    return python


APP_ORT_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
folder, prompt, runner_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, runner_dir)
from device_runner import BankSlots, Export  # numpy + stdlib: decodes the bank's files as every runtime does
m = json.load(open(f"{folder}/manifest.json"))
export = Export(folder)
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
program = ort.InferenceSession(f"{folder}/{export.entry('program')['path']}", so, providers=["CPUExecutionProvider"])
bank = BankSlots(m)
bank.load_shared(export.verified(export.find("shared"), "the shared file"))
info = m["model"]
out = {"version": ort.__version__, "logits": {}}
for task in m["tasks"]:
    slots = bank.task_slots(task, export.verified_task_file(task))
    past = [np.zeros((1, info["kv_heads"], 0, info["head_dim"]), np.float32) for _ in range(2 * info["n_layers"])]
    feeds = {"input_ids": np.array([prompt], np.int64), **slots, **{f"past.{i}": p for i, p in enumerate(past)}}
    res = program.run(None, feeds)
    # one decode step on the returned cache
    feeds = {"input_ids": np.array([[int(res[0][0, -1].argmax())]], np.int64), **slots,
             **{f"past.{i}": p for i, p in enumerate(res[1:])}}
    step = program.run(None, feeds)
    out["logits"][task] = np.concatenate([res[0][0], step[0][0]]).tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_export_loads_and_runs_on_the_apps_onnxruntime_version(quant, exports):
    """The export's opset and IR version load on ONNX Runtime 1.29 (the AAR's version, checked in its
    own environment with that version's wheel), adapters switch there, and the outputs equal the
    project's ONNX Runtime's. The AAR's library is the same version."""
    from exporters.runtime import open_export

    aar_lib = android_cache() / "ort-1.29" / "aar" / "jni" / "arm64-v8a" / "libonnxruntime.so"
    assert APP_ORT.encode() in aar_lib.read_bytes(), "the AAR is not ONNX Runtime " + APP_ORT
    prompt = [5, 17, 200, 33, 9, 121]
    r = subprocess.run([str(_app_ort_python()), "-c", APP_ORT_SCRIPT, str(exports[quant]), json.dumps(prompt),
                        str(Path(__file__).resolve().parents[1] / "exporters" / "targets")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["version"] == APP_ORT
    session = open_export(exports[quant])
    tol = 1e-4 if quant == "fp32" else 2e-3  # same graph; int4 kernels of two ORT versions may round differently
    for task in TASKS:
        session.set_task(task)
        prefill = session.prefill(prompt)
        step = session.decode(int(prefill[-1].argmax()))
        want = np.concatenate([prefill, step[None]])
        err = np.abs(np.array(got["logits"][task]) - want).max()
        assert err < tol, f"{quant} {task}: ORT {APP_ORT} differs from the host's by {err}"
    a, b = (np.array(got["logits"][t]) for t in ("alpha", "beta"))
    assert np.abs(a - b).max() > 0.05, "switching the adapter changed nothing on ORT " + APP_ORT


def test_ort_java_api_cannot_run_on_the_host_jvm_with_registry_parts():
    """The limit, shown: ONNX Runtime's Java API needs its JNI glue (libonnxruntime4j_jni); the AAR has
    it only for Android ABIs, linked against Android's C library, and no PyPI/npm/Debian package ships
    it for linux-x64 (README). Loading the API on the host JVM therefore fails at that library."""
    cache = android_cache()
    jni = cache / "ort-1.29" / "aar" / "jni"
    assert sorted(p.name for p in jni.iterdir()) == ["arm64-v8a", "armeabi-v7a", "x86", "x86_64"]
    needed = subprocess.run(["readelf", "-d", str(jni / "x86_64" / "libonnxruntime4j_jni.so")], capture_output=True, text=True).stdout
    assert "[libc.so]" in needed and "[libc.so.6]" not in needed  # bionic, not glibc
    jar = next((cache / "ort-1.29" / "retargeted").glob("ort-classes-*.jar"))
    r = subprocess.run(
        ["java", "-Donnxruntime.native.onnxruntime.skip=true", "-cp", str(jar), str(ANDROID / "tools" / "HostLoad.java")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0 and "UnsatisfiedLinkError" in r.stdout + r.stderr and "onnxruntime4j_jni" in r.stdout + r.stderr, r.stdout + r.stderr


def test_bench_android_adb_without_a_device_says_so_and_writes_nothing(exports, tmp_path):
    """`hydraopt bench android-adb EXPORT` with Debian's adb (from build.sh's cache) and no phone attached."""
    devices = run_build("adb", "devices").stdout
    try:
        assert devices.strip() == "List of devices attached", f"a device is attached here; this test expects none:\n{devices}"
        out = tmp_path / "device_android.json"
        r = subprocess.run([sys.executable, "-m", "hydraopt_mobile.app.cli", "bench", "android-adb", str(exports["fp32"]), "--out", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "no Android device attached" in r.stderr and "nothing was run" in r.stderr  # errors go to standard error
        assert not out.exists()
    finally:
        run_build("adb", "kill-server")  # the adb server this test started


# Java APIs the dexed ONNX Runtime classes may use beyond android.jar 23: API 24 additions (the AAR's
# minSdk) and java.nio.file (API 26), which ORT only uses on its desktop library-extraction path
# (skipped when OnnxRuntime.isAndroid()); LambdaMetafactory stays as an unused constant after desugaring.
API_24_OR_GUARDED = ("java/util/stream/", "java/util/function/", "java/util/Optional", "java/nio/file/",
                     "java/lang/invoke/LambdaMetafactory", "java/util/Arrays.stream", "java/util/Set.stream",
                     "java/util/Collection.stream", "java/util/List.stream")


def test_retargeted_ort_classes_call_only_java_apis_android_has(apk):
    """Every java.* method the dexed ONNX Runtime classes reference resolves in android.jar (API 23),
    walking superclasses and interfaces, or is one of the known API 24 / guarded ones above; a Java 9+
    call (List.of, covariant ByteBuffer.position, ...) left by the Java 17 build would fail here."""
    sys.path.insert(0, str(ANDROID / "tools"))
    from retarget_classes import ClassFile

    cache = android_cache()
    android_jar = zipfile.ZipFile(cache / "root" / "usr" / "share" / "java" / "com.android.android-23.jar")
    ort_jar = zipfile.ZipFile(next((cache / "ort-1.29" / "retargeted").glob("ort-classes-*.jar")))
    parsed: dict[str, ClassFile | None] = {}

    def android_class(name: str) -> ClassFile | None:
        if name not in parsed:
            parsed[name] = ClassFile(android_jar.read(name + ".class")) if name + ".class" in android_jar.namelist() else None
        return parsed[name]

    def resolves(owner: str, name: str, desc: str) -> bool:
        todo, seen = [owner], set()
        while todo:
            cf = android_class(todo.pop())
            if cf is None or id(cf) in seen:
                continue
            seen.add(id(cf))
            if any(cf.utf(m[1]) == name and cf.utf(m[2]) == desc for m in cf.methods):
                return True
            todo += ([cf.class_name(cf.super)] if cf.super else []) + [cf.class_name(i) for i in cf.interfaces]
        return False

    refs = set()
    for entry in ort_jar.namelist():
        if entry.endswith(".class"):
            cf = ClassFile(ort_jar.read(entry))
            refs |= {cf.ref(i) for i, e in enumerate(cf.cp) if e is not None and e[0] in (10, 11) and cf.ref(i)[0].startswith("java/")}
    assert len(refs) > 100
    unresolved = sorted(r for r in refs if not resolves(*r))
    unexpected = [r for r in unresolved if not any(f"{r[0]}.{r[1]}".startswith(p) for p in API_24_OR_GUARDED)]
    assert not unexpected, f"Java APIs Android 24 lacks: {unexpected}"
    assert unresolved, "expected the known API 24 calls (streams, Optional) to be listed"
