"""Reading PEFT LoRA adapter folders into one validated bank of factors.

Every adapter is turned into per-module factors ``A`` (r x d_in) and ``B`` (d_out x r) in
float32 with the LoRA scale folded into ``B``, so that ``dW = B @ A`` (METHOD.md, notation).
All validation that can name a file or tensor happens here, before any merge work starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hydraopt_mobile.paths import MODULE_NAME_PATTERN, TASK_NAME_RULE, duplicate_ignoring_case, task_name_problem
from hydraopt_mobile.schemas import read_document
from hydraopt_mobile.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MODULE_NAME = re.compile(MODULE_NAME_PATTERN)


class AdapterError(UserError):
    """An adapter (or a set of adapters) that cannot be read or merged; the message names the culprit."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update ``dW = B @ A`` with the LoRA scale already folded into ``B``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """The dense update; only for tests, small sizes and the dense baselines."""
        return self.B @ self.A


@dataclass
class TaskAdapter:
    """One task's adapter as read from disk."""

    name: str
    path: Path
    base_model: str | None
    modules: dict[str, LoraFactors]
    config: dict = field(default_factory=dict, repr=False)

    def fp16_bytes(self) -> int:
        """Bytes of this adapter's factors stored in fp16 (the storage reference of METHOD.md)."""
        return sum(2 * f.rank * (f.shape[0] + f.shape[1]) for f in self.modules.values())


@dataclass
class AdapterSet:
    """Several tasks' adapters over the same base model and the same module set."""

    tasks: list[TaskAdapter]
    shapes: dict[str, tuple[int, int]]  # module -> (d_out, d_in)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def module_names(self) -> list[str]:
        return list(self.shapes)

    @property
    def base_model(self) -> str | None:
        return self.tasks[0].base_model if self.tasks else None

    def factors(self, module: str) -> list[LoraFactors]:
        """Every task's factors for ``module``; a task without it contributes a rank-0 (zero) update."""
        d_out, d_in = self.shapes[module]
        empty = LoraFactors(torch.zeros(0, d_in), torch.zeros(d_out, 0))
        return [t.modules.get(module, empty) for t in self.tasks]

    def fp16_bytes(self) -> int:
        return sum(t.fp16_bytes() for t in self.tasks)

    def reference_file_bytes(self) -> int:
        """File bytes of every adapter stored as it is, in fp16, one safetensors file per task,
        packed as a bundle packs (storage.py): the unit of budgets and storage fractions."""
        from hydraopt_mobile.storage import reference_file_bytes

        modules = [self.factors(name) for name in self.module_names]
        return reference_file_bytes([[(fs[t].rank, fs[t].shape) for fs in modules] for t in range(len(self.tasks))])

    def fingerprint(self) -> dict:
        """What identifies the base model these adapters were made for."""
        return {"base_model": self.base_model, "module_shapes": {m: list(s) for m, s in self.shapes.items()}}


def parse_task_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH`` (the task is then named after the folder)."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        if not name:
            raise AdapterError(f"task spec {spec!r}: empty task name before '='")
        problem = task_name_problem(name)
        if problem:
            raise AdapterError(f"task spec {spec!r}: {problem}")
        return name, Path(path)
    return None, Path(spec)


def task_name_for(path: Path, name: str | None) -> str:
    """``name``, or the folder's name; either must be a valid task name (paths.py)."""
    if name is not None:
        problem = task_name_problem(name)
        if problem:
            raise AdapterError(f"{path}: {problem}")
        return name
    folder = path.resolve().name
    if task_name_problem(folder):
        raise AdapterError(f"{path}: the folder name {folder!r} is not a valid task name ({TASK_NAME_RULE}); give one with NAME=PATH")
    return folder


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or its suffix."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module) or re.search(rf"(^|\.){key}$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    cfg_path = path / ADAPTER_CONFIG
    cfg = read_document(cfg_path, "adapter-config", AdapterError, f"{cfg_path}: missing; a PEFT adapter folder needs {ADAPTER_CONFIG}")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {peft_type!r} is not supported; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: use_dora=true; DoRA magnitude vectors cannot be carried by a LoRA bank")
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r}; fully trained modules cannot be carried by a LoRA bank"
        )
    if cfg.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r}; only bias='none' adapters can be merged")
    return cfg


def _read_tensors(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st = path / SAFETENSORS_FILE
    if st.is_file():
        try:
            return st, load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{st}: corrupt or truncated safetensors file ({e})") from e
    binf = path / BIN_FILE
    if binf.is_file():
        try:
            return binf, torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for bad pickles
            raise AdapterError(f"{binf}: cannot be read with weights_only=True ({e})") from e
    raise AdapterError(f"{path}: no {SAFETENSORS_FILE} (or {BIN_FILE})")


def load_adapter(path: str | Path, name: str | None = None) -> TaskAdapter:
    """Read one PEFT LoRA folder; scales (alpha/r or alpha/sqrt(r), per-module patterns) are folded into B."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder")
    name = task_name_for(path, name)
    cfg = _read_config(path)
    file, tensors = _read_tensors(path)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            kind = "bias" if key.endswith(".bias") else "non-LoRA"
            raise AdapterError(f"{file}: tensor {key!r} is a {kind} weight that a LoRA bank cannot carry")
        if not _MODULE_NAME.match(m["module"]):
            raise AdapterError(f"{file}: tensor {key!r}: module name {m['module']!r} is not a PyTorch module path")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{file}: tensor {key!r} contains NaN or Inf values")
        parts.setdefault(m["module"], {})[m["which"]] = tensor
    if not parts:
        raise AdapterError(f"{file}: holds no lora_A / lora_B tensors")

    modules: dict[str, LoraFactors] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{file}: module {module!r} has no lora_{missing} tensor")
        A, B = ab["A"].float(), ab["B"].float()
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterError(f"{file}: module {module!r}: only Linear LoRA (2-D A and B) is supported")
        if fan_in_fan_out:  # Conv1D-style storage (GPT-2): the update is transposed
            A, B = B.T.contiguous(), A.T.contiguous()
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(
                f"{file}: module {module!r}: lora_A has rank {r} but lora_B has {B.shape[1]} columns"
            )
        expected_r = int(_pattern_value(rank_pattern, module, r_default))
        if expected_r != r:
            raise AdapterError(f"{file}: module {module!r}: tensors have rank {r} but the config says {expected_r}")
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = LoraFactors(A.contiguous(), (B * scale).contiguous())
    return TaskAdapter(
        name=name,
        path=path,
        base_model=cfg.get("base_model_name_or_path"),
        modules=modules,
        config=cfg,
    )


def build_adapter_set(adapters: list[TaskAdapter], allow_missing: bool = False) -> AdapterSet:
    """Check that adapters can be merged together and return them as one set."""
    if not adapters:
        raise AdapterError("no adapters given")
    seen: dict[str, Path] = {}
    for a in adapters:
        if a.name in seen:
            raise AdapterError(f"duplicate task name {a.name!r} ({seen[a.name]} and {a.path}); use NAME=PATH")
        seen[a.name] = a.path
    clash = duplicate_ignoring_case([a.name for a in adapters])
    if clash:
        raise AdapterError(
            f"task names {clash[0]!r} and {clash[1]!r} differ only in case; they would be the same file on "
            "macOS and Windows: rename one with NAME=PATH"
        )
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        detail = ", ".join(f"{a.path}: {a.base_model}" for a in adapters)
        raise AdapterError(f"adapters were made for different base models ({detail})")

    all_modules = sorted(set().union(*(a.modules for a in adapters)))
    if not allow_missing:
        for a in adapters:
            missing = [m for m in all_modules if m not in a.modules]
            if missing:
                raise AdapterError(
                    f"{a.path}: task {a.name!r} lacks modules {missing[:5]}{'...' if len(missing) > 5 else ''} "
                    "that other adapters have; pass --allow-missing to treat them as zero updates"
                )
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, TaskAdapter] = {}
    for a in adapters:
        for m, f in a.modules.items():
            if m in shapes and shapes[m] != f.shape:
                raise AdapterError(
                    f"module {m!r}: shape (d_out, d_in)={f.shape} in {a.path} but {shapes[m]} in {owner[m].path}; "
                    "the adapters were made for different base models"
                )
            shapes.setdefault(m, f.shape)
            owner.setdefault(m, a)
    return AdapterSet(adapters, {m: shapes[m] for m in all_modules})


def load_adapter_set(specs: list[str], allow_missing: bool = False) -> AdapterSet:
    """Read ``NAME=PATH`` / ``PATH`` specs into a validated :class:`AdapterSet`."""
    adapters = []
    for spec in specs:
        name, path = parse_task_spec(spec)
        adapters.append(load_adapter(path, name))
    return build_adapter_set(adapters, allow_missing=allow_missing)


def load_adapter_folders(root: Path) -> AdapterSet:
    """Every PEFT folder directly under ``root`` (a sub-folder holding an adapter config), each task
    named after its folder, in name order: the layout the suite trains into (``<init>/<task>/``)."""
    folders = [p for p in sorted(Path(root).iterdir()) if (p / ADAPTER_CONFIG).is_file()]
    if not folders:
        raise AdapterError(f"{root}: no adapter folders in it (sub-folders holding {ADAPTER_CONFIG})")
    return build_adapter_set([load_adapter(p) for p in folders])
