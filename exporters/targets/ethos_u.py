"""``ethos-u``: Arm Ethos-U55 and Ethos-U85 NPUs through ExecuTorch's Arm backend, estimated.

What the set-up installs under ``<cache>/targets/ethos-u/site`` (about 200 MB, PyPI only): the pins
of executorch's own ``ethos-u`` extra, ``ethos-u-vela`` (Arm's NPU compiler, whose performance
estimator gives the cycles and memory) and ``tosa-tools`` (the TOSA reference model, which runs a
lowered TOSA graph with the integer numerics the NPU implements), with ``--no-deps``: their
dependencies (numpy, flatbuffers, ml_dtypes) are the project's. The extra also pins
``ml_dtypes==0.5.1``; the project's 0.7 is used and works. The ExecuTorch Arm backend itself
(quantiser, partitioner, TOSA lowering) is in the project's ``executorch``: the target's Python is
the project's interpreter with ``site`` appended to ``sys.path`` in a subprocess, so nothing of the
target ever enters the project's ``.venv`` or the calling process.

What runs (``ethos_u_layer.py``): one decoder layer, PT2E-quantised for the NPU, lowered to TOSA
and compiled by Vela for each NPU configuration. There is no Corstone FVP (the NPU simulator) on
PyPI, so nothing runs the ``.pte`` itself: latency is Vela's estimate (``latency_kind
"estimated"``), numerics are the TOSA reference model's. One layer; no whole-model claim.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exporters.targets.ethos_u_layer import SLOTS, LayerConfig
from exporters.targets.protocol import OnStep, run_streaming
from exporters.targets.target import Readiness, Step, Target, step_facts
from hydraopt_mobile.bank import MergedBank
from hydraopt_mobile.errors import UserError

NAME = "ethos-u"
SCRIPT = Path(__file__).with_name("ethos_u_layer.py")
SETUP_COMMAND = f"hydraopt targets setup {NAME}"
NPUS = ("ethos-u55-128", "ethos-u85-256")
QUANTS = ("a8w8", "a16w8")
SITE_PACKAGES = ("ethos-u-vela", "tosa-tools")


def pins() -> list[str]:
    """Vela and the TOSA tools at the versions executorch's ``ethos-u`` extra pins."""
    reqs = importlib.metadata.requires("executorch") or []
    found = [r.split(";")[0].strip() for r in reqs if 'extra == "ethos-u"' in r and r.split("==")[0] in SITE_PACKAGES]
    if len(found) != len(SITE_PACKAGES):
        raise RuntimeError(f"executorch {importlib.metadata.version('executorch')} declares no ethos-u extra pins for {SITE_PACKAGES}")
    return sorted(found)


def site(folder: Path) -> Path:
    return folder / "site"


def _site(folder: Path) -> dict:
    tmp = folder / "site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(tmp), *pins()], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {' '.join(pins())}: {r.stderr.strip()[-1500:]}")
    if site(folder).exists():
        shutil.rmtree(site(folder))
    tmp.rename(site(folder))
    return {"pins": pins()}


def _smoke(folder: Path) -> dict:
    code = (f"import sys; sys.path.append({str(site(folder))!r}); import importlib.metadata as m; "
            "from ethosu import vela; import tosa_reference_model; "
            "from executorch.backends.arm import arm_vela; assert arm_vela.has_vela; "
            "print(m.version('ethos-u-vela'), m.version('tosa-tools'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"Vela or the TOSA reference model does not import: {r.stderr.strip()[-1500:]}")
    vela, tosa = r.stdout.split()[-2:]
    return {"vela": vela, "tosa_tools": tosa}


def steps() -> list[Step]:
    key = " ".join(pins())
    return [Step("site", key, _site), Step("smoke", key, _smoke)]


def check(folder: Path) -> Readiness:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return Readiness(False, "tosa-tools (the TOSA reference model) ships x86_64 Linux wheels only", "-")
    try:
        stale = [s.name for s in steps() if (step_facts(folder, s.name) or {}).get("key") != s.key]
    except RuntimeError as e:
        return Readiness(False, str(e), "pip install executorch (the project's pin)")
    if stale or not (site(folder) / "tosa_reference_model").exists():
        return Readiness(False, f"not set up in {folder}: {' and '.join(pins())} (--no-deps) in site/", SETUP_COMMAND)
    smoke = step_facts(folder, "smoke") or {}
    return Readiness(True, f"Vela {smoke.get('vela')} + TOSA reference model {smoke.get('tosa_tools')} "
                           f"(ExecuTorch {importlib.metadata.version('executorch')} Arm backend); no FVP: estimates only")


TARGET = Target(
    name=NAME,
    summary="Arm Ethos-U55/U85 NPUs via ExecuTorch's Arm backend: one decoder layer, Vela's cycle/memory estimate, "
            "the TOSA reference model's int8/int16 outputs",
    needs=f"a site folder (~200 MB, PyPI, --no-deps) with {' and '.join(pins())} beside the project's executorch",
    latency_kind="estimated",
    tolerance="tiny test layer at A8W8: TOSA reference output within 0.05 x the fp32 output's max, nearer its own task than "
              "the other, LoRA effect cosine > 0.95, switching back bit-identical; the real layer's errors are reported, not bounded "
              "(A8W8 rel. error ~0.24, LoRA effect cosine 0.51-0.90)",
    on_phone="not a phone NPU: the same .pte runs on a Cortex-M55/M85 + Ethos-U board (Corstone-300/320) with ExecuTorch's "
             "arm_executor_runner; no FVP or board here",
    steps=steps,
    check=check,
)


@dataclass(frozen=True)
class LayerVariant:
    """One program to build: ``switchable`` (task factors as inputs, run for ``sequence`` in
    order, then with zero factors) or ``merged`` (``tasks[0]`` folded into the weights)."""

    name: str
    method: str  # as in the merge registry ("hydraopt", "none")
    kind: str  # "switchable" | "merged"
    tasks: dict[str, dict[str, torch.Tensor]]  # task -> {"q_proj.A": (r, d_in), "q_proj.B": (d_out, r), ...}
    sequence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) or self.kind not in ("switchable", "merged"):
            raise UserError(f"layer variant {self.name!r} ({self.kind}): names use letters, digits, _ . - (they name files); "
                            "kind is switchable or merged")
        if self.kind == "merged" and len(self.tasks) != 1:
            raise UserError(f"layer variant {self.name!r}: a merged variant folds exactly one task, got {list(self.tasks)}")
        if missing := set(self.sequence) - set(self.tasks):
            raise UserError(f"layer variant {self.name!r}: sequence names tasks it has no factors for: {sorted(missing)}")


def bank_layer_tasks(bank: MergedBank, layer: int, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's dequantised factors of ``layer``'s q_proj and v_proj in ``bank`` (the LoRA scale
    folded into B); a module the bank lacks is a zero update of rank 1."""
    out = {}
    for task in tasks:
        factors = bank.task_factors(task)
        out[task] = {}
        for slot in SLOTS:
            f = factors.get(f"model.layers.{layer}.self_attn.{slot}")
            if f is None:
                raise UserError(f"bank ({bank.method}): no model.layers.{layer}.self_attn.{slot}; the ethos-u layer needs LoRA on q_proj and v_proj")
            out[task][f"{slot}.A"], out[task][f"{slot}.B"] = f.A.float(), f.B.float()
    return out


def switchable_variant(name: str, bank: MergedBank, layer: int, tasks: list[str]) -> LayerVariant:
    """``bank``'s per-task factors of ``layer`` as program inputs, run for ``tasks`` in order and,
    with two or more tasks, back to the first (a switch that leaks state then shows up)."""
    sequence = (*tasks, tasks[0]) if len(tasks) > 1 else tuple(tasks)
    return LayerVariant(name, bank.method, "switchable", bank_layer_tasks(bank, layer, tasks), sequence)


def prompt_ids(tokenizer, text: str, seq: int) -> list[int]:
    """The last ``seq`` token ids of ``text`` (no special tokens added: a chat-formatted text has its own)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < seq:
        raise UserError(f"the layer's prompt has {len(ids)} tokens, fewer than the {seq} the layer is compiled for "
                        "(--tokens): give a longer --prompt or fewer tokens")
    return list(ids[-seq:])


def layer_input(model: torch.nn.Module, ids: list[int], layer: int) -> torch.Tensor:
    """What decoder layer ``layer`` of the base model (no task) receives for ``ids`` at positions
    0..len-1: the token embeddings for layer 0, else the residual stream after the layers below."""
    n_layers = len(model.model.layers)
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer}: the base model has decoder layers 0..{n_layers - 1}")
    with torch.no_grad():
        if layer == 0:
            return model.get_input_embeddings()(torch.tensor(ids)).float()
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].float()


def padded_ranks(tasks: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    return {slot: max(t[f"{slot}.A"].shape[0] for t in tasks.values()) for slot in SLOTS}


def pad(task: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """Zero rows of A / columns of B up to the slot's rank: B A is unchanged."""
    out = {}
    for slot, r in ranks.items():
        a, b = task[f"{slot}.A"], task[f"{slot}.B"]
        out[f"{slot}.A"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])]).contiguous()
        out[f"{slot}.B"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1).contiguous()
    return out


def ensure_ready() -> Path:
    """The target's folder; :class:`UserError` with the reason and the command when not ready."""
    if not (ready := TARGET.readiness()).ready:
        raise UserError(f"target {NAME} is not ready: {ready.reason}; make it ready: {ready.command}")
    return TARGET.folder()


def compile_layer(weights: dict[str, torch.Tensor], x: torch.Tensor, cfg: LayerConfig, variants: list[LayerVariant],
                  npus: tuple[str, ...] = NPUS, quants: tuple[str, ...] = QUANTS, workdir: Path | None = None,
                  threads: int = 1, timeout_s: int = 3600, on_step: OnStep | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Build every variant of the layer (``weights``: a ``LlamaDecoderLayer`` state dict; ``x``:
    the layer's input, (seq, hidden)), compile it for every NPU x quantisation, run the lowered TOSA
    on the reference model; returns ``ethos_u_layer.main``'s report and the outputs by
    ``variant/npu/quant/run/task`` (TOSA) and ``variant/fp32/task``. ``on_step(done, total)`` after
    each compile (variants x NPUs x quants)."""
    from safetensors.torch import load_file, save_file

    folder = ensure_ready()
    with tempfile.TemporaryDirectory(prefix="hydraopt-ethosu-") as tmp:
        job_dir = Path(workdir or tmp)
        job_dir.mkdir(parents=True, exist_ok=True)
        save_file({**{k: v.float().contiguous() for k, v in weights.items()}, "x": x.float().contiguous()}, str(job_dir / "layer.safetensors"))
        specs = []
        for v in variants:
            ranks = padded_ranks(v.tasks)
            for task, tensors in v.tasks.items():
                save_file(pad(tensors, ranks), str(job_dir / f"{v.name}-{task}.safetensors"))
            specs.append({"name": v.name, "method": v.method, "kind": v.kind, "tasks": list(v.tasks),
                          "sequence": list(v.sequence), "ranks": ranks})
        job = {"site": str(site(folder)), "config": asdict(cfg), "variants": specs, "npus": list(npus), "quants": list(quants),
               "threads": threads}
        (job_dir / "job.json").write_text(json.dumps(job, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = run_streaming([sys.executable, str(SCRIPT), str(job_dir)], env=env, timeout=timeout_s, on_step=on_step)
        if r.returncode != 0:
            raise RuntimeError(f"ethos_u_layer.py failed: {r.stderr.strip()[-3000:]}")
        report = json.loads((job_dir / "report.json").read_text())
        report["log"] = [line for line in r.stdout.splitlines() if ": " in line]
        return report, load_file(job_dir / "outputs.safetensors")
