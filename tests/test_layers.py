"""The layering the README draws, checked on the source: data flows one way.

    library (hydraopt_mobile, minus app/ and suite/)   knows nothing above it
    suite (hydraopt_mobile/suite)                       -> library
    exporters                                           -> library
    app (hydraopt_mobile/app)                           -> library, suite, exporters

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def layer_of(module: str) -> str | None:
    if module == "exporters" or module.startswith("exporters."):
        return "exporters"
    if module.startswith("hydraopt_mobile.app"):
        return "app"
    if module.startswith("hydraopt_mobile.suite"):
        return "suite"
    if module == "hydraopt_mobile" or module.startswith("hydraopt_mobile."):
        return "library"
    return None


ALLOWED = {
    "library": {"library"},
    "suite": {"library", "suite"},
    "exporters": {"library", "exporters"},
    "app": {"library", "suite", "exporters", "app"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import statement in ``path``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one
            out += [(node.lineno, f"{mod}.{a.name}" if (ROOT / Path(*f"{mod}.{a.name}".split("."))).with_suffix(".py").exists() else mod) for a in node.names]
    return out


SOURCES = sorted(p for d in ("hydraopt_mobile", "exporters") for p in (ROOT / d).rglob("*.py"))


def test_the_scan_sees_every_layer() -> None:
    layers = {layer_of(module_name(p)) for p in SOURCES}
    assert layers == {"library", "suite", "exporters", "app"}
    assert any(m.startswith("exporters") for p in SOURCES if layer_of(module_name(p)) == "app" for _, m in imports(p))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    layer = layer_of(module_name(path))
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {mod} ({layer_of(mod)})"
             for line, mod in imports(path) if layer_of(mod) not in (None, *ALLOWED[layer])]
    assert not wrong, "\n".join(wrong)


def test_device_runner_needs_only_the_runtime_and_numpy() -> None:
    """What runs on a phone or an emulated root: the standard library, numpy and the runtimes."""
    runner = ROOT / "exporters" / "targets" / "device_runner.py"
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "executorch", "torch", "__future__"}  # torch: ExecuTorch's bindings take torch tensors
    foreign = sorted({m for _, m in imports(runner) if m.split(".")[0] not in allowed})
    assert not foreign, foreign
