"""Reading PEFT LoRA adapter folders into one validated bank of factors.

Every adapter is turned into per-module factors ``A`` (r x d_in) and ``B`` (d_out x r) in
float32 with the LoRA scale folded into ``B``, so that ``dW = B @ A`` (METHOD.md, notation).
All validation that can name a file or tensor happens here, before any merge work starts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors import safe_open
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
    modules: Mapping[str, LoraFactors]  # a dict, or LazyModules reading each module from disk when asked
    config: dict = field(default_factory=dict, repr=False)

    def module_meta(self) -> dict[str, tuple[int, tuple[int, int]]]:
        """Per module (rank, (d_out, d_in)), without reading tensors when the modules are lazy."""
        if isinstance(self.modules, LazyModules):
            return self.modules.meta
        return {m: (f.rank, f.shape) for m, f in self.modules.items()}

    def fp16_bytes(self) -> int:
        """Bytes of this adapter's factors stored in fp16 (the storage reference of METHOD.md)."""
        return sum(2 * rank * (shape[0] + shape[1]) for rank, shape in self.module_meta().values())


@dataclass
class AdapterSet:
    """Several tasks' adapters over the same base model and the same module set."""

    tasks: list[TaskAdapter]
    shapes: dict[str, tuple[int, int]]  # module -> (d_out, d_in)
    _reference_bytes: int | None = field(default=None, init=False, repr=False, compare=False)

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

        if self._reference_bytes is None:  # a set is not changed once built; a merge asks for this once per bank
            metas = [t.module_meta() for t in self.tasks]
            self._reference_bytes = reference_file_bytes([[meta.get(m, (0, self.shapes[m])) for m in self.module_names] for meta in metas])
        return self._reference_bytes

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


class LazyModules(Mapping[str, LoraFactors]):
    """An adapter's modules read from its safetensors file only when asked for (one module's two
    tensors at a time, the file closed again), so a merge holds one module of every adapter in
    memory, not every module. Structure (keys, shapes, ranks) was checked on opening; values
    (NaN/Inf) are checked on each read, naming the file and tensor.

    A read takes the tensors' bytes at the offsets the header gave on opening (:class:`_Placed`)
    instead of ``safe_open`` again: that parses the whole header and maps the file on every call,
    0.5-0.7 ms for an adapter of 448 tensors, which at Llama-3-8B shapes (100 adapters x 224
    modules, read twice) was 20-30 s of a 10-minute merge."""

    def __init__(self, file: Path, keys: dict[str, dict[str, str]], finish: "_Finish", meta: dict[str, tuple[int, tuple[int, int]]], placed: dict[str, "_Placed"]):
        self.file, self._keys, self._finish, self.meta, self._placed = file, keys, finish, meta, placed

    def __getitem__(self, module: str) -> LoraFactors:
        keys = self._keys[module]
        with open(self.file, "rb", buffering=0) as f:
            return self._finish(module, {which: (key, self._placed[key].read(f, self.file, key)) for which, key in keys.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class _Placed:
    """Where a tensor's bytes lie in its safetensors file (the header's ``data_offsets`` past the
    header), with its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def read(self, f, file: Path, key: str) -> torch.Tensor:
        buf = bytearray(self.nbytes)
        f.seek(self.offset)
        if f.readinto(buf) != self.nbytes:
            raise AdapterError(f"{file}: tensor {key!r} is cut short (the file changed since it was opened)")
        return torch.frombuffer(buf, dtype=self.dtype).reshape(self.shape) if self.nbytes else torch.empty(self.shape, dtype=self.dtype)


class _Finish:
    """Turns one module's raw tensors into LoraFactors: values checked, fan_in_fan_out undone,
    the LoRA scale folded into B."""

    def __init__(self, file: Path, cfg: dict):
        self.file, self.cfg = file, cfg
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))

    def __call__(self, module: str, ab: dict[str, tuple[str, torch.Tensor]]) -> LoraFactors:
        A, B = ab["A"][1].float(), ab["B"][1].float()
        for (key, _), values in zip((ab["A"], ab["B"]), (A, B)):
            if not _all_finite(values):
                raise AdapterError(f"{self.file}: tensor {key!r} contains NaN or Inf values")
        if self.fan_in_fan_out:  # Conv1D-style storage (GPT-2): the update is transposed
            A, B = B.T.contiguous(), A.T.contiguous()
        return LoraFactors(A.contiguous(), (B * _scale(self.cfg, module, A.shape[0])).contiguous())


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or an infinity makes the sum NaN or infinite, so a
    finite sum settles it in one pass (``torch.isfinite`` takes three, 20x as long on a 16 x 14,336
    float32 factor); only a sum that overflowed or met a non-finite value is checked value by value."""
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def _scale(cfg: dict, module: str, r: int) -> float:
    r_default = int(cfg.get("r", 8))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, float(cfg.get("lora_alpha", r_default))))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _index_modules(file: Path, cfg: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, dict[str, str]], dict[str, tuple[int, tuple[int, int]]]]:
    """Per module its lora_A / lora_B keys and (rank, (d_out, d_in)), checked from the tensors'
    shapes alone: key forms, module names, both factors present, 2-D, ranks against the config."""
    keys: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = _LORA_KEY.match(key)
        if m is None:
            kind = "bias" if key.endswith(".bias") else "non-LoRA"
            raise AdapterError(f"{file}: tensor {key!r} is a {kind} weight that a LoRA bank cannot carry")
        if not _MODULE_NAME.match(m["module"]):
            raise AdapterError(f"{file}: tensor {key!r}: module name {m['module']!r} is not a PyTorch module path")
        keys.setdefault(m["module"], {})[m["which"]] = key
    if not keys:
        raise AdapterError(f"{file}: holds no lora_A / lora_B tensors")
    r_default = int(cfg.get("r", 8))
    rank_pattern = cfg.get("rank_pattern") or {}
    meta: dict[str, tuple[int, tuple[int, int]]] = {}
    for module, ab in sorted(keys.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{file}: module {module!r} has no lora_{missing} tensor")
        a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(f"{file}: module {module!r}: only Linear LoRA (2-D A and B) is supported")
        if cfg.get("fan_in_fan_out", False):
            a_shape, b_shape = (b_shape[1], b_shape[0]), (a_shape[1], a_shape[0])
        r = a_shape[0]
        if b_shape[1] != r:
            raise AdapterError(f"{file}: module {module!r}: lora_A has rank {r} but lora_B has {b_shape[1]} columns")
        expected_r = int(_pattern_value(rank_pattern, module, r_default))
        if expected_r != r:
            raise AdapterError(f"{file}: module {module!r}: tensors have rank {r} but the config says {expected_r}")
        meta[module] = (r, (b_shape[0], a_shape[1]))
    return dict(sorted(keys.items())), meta


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _placed_tensors(st: Path) -> dict[str, _Placed]:
    """Every tensor's place in ``st``: the file is first opened by the library (``safe_open``), which
    checks the header (offsets in order, inside the file, sizes matching dtype and shape); the
    offsets are then read from that header as the format defines it (a little-endian u64 length,
    then the JSON), since the library does not expose them."""
    try:
        with safe_open(str(st), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        with open(st, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{st}: corrupt or truncated safetensors file ({e})") from e
    placed = {}
    for key, shape in shapes.items():
        entry = header.get(key)
        if not isinstance(entry, dict) or tuple(entry.get("shape", ())) != shape:
            raise AdapterError(f"{st}: tensor {key!r}: the header changed while it was read")
        if entry.get("dtype") not in _DTYPES:
            raise AdapterError(f"{st}: tensor {key!r} has dtype {entry.get('dtype')!r}, which adapters are not read in")
        begin, end = entry["data_offsets"]
        placed[key] = _Placed(_DTYPES[entry["dtype"]], shape, 8 + size + begin, end - begin)
    return placed


def load_adapter(path: str | Path, name: str | None = None, lazy: bool = False) -> TaskAdapter:
    """Read one PEFT LoRA folder; scales (alpha/r or alpha/sqrt(r), per-module patterns) are folded into B.

    ``lazy``: read only the safetensors header now and each module's tensors when it is used
    (:class:`LazyModules`); a ``.bin`` adapter is always read whole."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder")
    name = task_name_for(path, name)
    cfg = _read_config(path)
    st = path / SAFETENSORS_FILE
    modules: Mapping[str, LoraFactors]
    if lazy and st.is_file():
        placed = _placed_tensors(st)
        keys, meta = _index_modules(st, cfg, {key: p.shape for key, p in placed.items()})
        modules = LazyModules(st, keys, _Finish(st, cfg), meta, placed)
    else:
        file, tensors = _read_tensors(path)
        keys, _ = _index_modules(file, cfg, {k: tuple(t.shape) for k, t in tensors.items()})
        finish = _Finish(file, cfg)
        modules = {module: finish(module, {which: (key, tensors[key]) for which, key in ab.items()}) for module, ab in keys.items()}
    return TaskAdapter(name=name, path=path, base_model=base_model_name(cfg.get("base_model_name_or_path")), modules=modules, config=cfg)


def base_model_name(value: str | None) -> str | None:
    """The base model an adapter was made for, as bundles and exports record it: a model id as it
    is; a local folder (PEFT writes the folder a model was loaded from, ``/home/me/models/X``)
    by its name only, so no bundle or export carries the folders of the machine that made it."""
    if not value:
        return value
    local = value.startswith(("/", "~", "./", "../", ".\\", "..\\")) or bool(PureWindowsPath(value).drive)
    if not local:
        return value
    path = PureWindowsPath(value) if PureWindowsPath(value).drive else PurePosixPath(value)
    return path.name or value


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
        for m, (_, shape) in a.module_meta().items():
            if m in shapes and shapes[m] != shape:
                raise AdapterError(
                    f"module {m!r}: shape (d_out, d_in)={shape} in {a.path} but {shapes[m]} in {owner[m].path}; "
                    "the adapters were made for different base models"
                )
            shapes.setdefault(m, shape)
            owner.setdefault(m, a)
    return AdapterSet(adapters, {m: shapes[m] for m in all_modules})


def load_adapter_set(specs: list[str], allow_missing: bool = False, lazy: bool = False) -> AdapterSet:
    """Read ``NAME=PATH`` / ``PATH`` specs into a validated :class:`AdapterSet` (``lazy``: modules
    read from disk when used, see :class:`LazyModules`)."""
    adapters = []
    for spec in specs:
        name, path = parse_task_spec(spec)
        adapters.append(load_adapter(path, name, lazy=lazy))
    return build_adapter_set(adapters, allow_missing=allow_missing)


def load_adapter_folders(root: Path) -> AdapterSet:
    """Every PEFT folder directly under ``root`` (a sub-folder holding an adapter config), each task
    named after its folder, in name order: the layout the suite trains into (``<init>/<task>/``)."""
    folders = [p for p in sorted(Path(root).iterdir()) if (p / ADAPTER_CONFIG).is_file()]
    if not folders:
        raise AdapterError(f"{root}: no adapter folders in it (sub-folders holding {ADAPTER_CONFIG})")
    return build_adapter_set([load_adapter(p) for p in folders])
