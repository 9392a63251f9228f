"""What ``hydraopt inspect`` reports about a bundle, or about an export and the bundle inside it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hydraopt_mobile.bundle import MANIFEST, open_bundle
from hydraopt_mobile.sharing import layout_summary, plan_label, saving_breakdown


def inspect_bundle(path: Path) -> dict:
    """Tasks, layouts, exact bytes on disk (shared, per task, total), what the plan shares, what
    sharing saved against rank/format, and per-task error. Reads the bundle as ``unpack`` does."""
    manifest, bank = open_bundle(path)
    sizes = {rel: (Path(path) / rel).stat().st_size for rel in manifest["files"]}
    per_task = {t: sizes.get(f"tasks/{t}.safetensors", 0) for t in bank.tasks}
    file_bytes = sum(sizes.values())
    layouts = Counter(f"kA={m.layout[0]} kB={m.layout[1]} r'={m.rank} {m.fmt.label() if m.A else '-'}" for m in bank.modules.values())
    return {
        "bundle": str(path),
        "method": bank.method,
        "params": bank.params,
        "plan": plan_label(bank),
        "tasks": bank.tasks,
        "n_modules": len(bank.modules),
        "layouts": dict(layouts.most_common()),
        "layout_summary": layout_summary(bank),
        "bytes": {
            "shared": sizes.get("shared.safetensors", 0),
            "per_task": per_task,
            "files": file_bytes,
            "manifest": (Path(path) / MANIFEST).stat().st_size,
            "payload": bank.payload_bytes(),
        },
        "file_bytes": file_bytes,
        "reference_file_bytes": bank.reference_file_bytes,
        "storage_fraction": file_bytes / bank.reference_file_bytes if bank.reference_file_bytes else None,
        "saving": saving_breakdown(bank),
        "rel_errors": bank.rel_errors,
    }


def is_export(path: Path) -> bool:
    """Whether ``path`` holds an export's manifest (``hydraopt export``'s output) rather than a bundle's."""
    import json

    try:
        doc = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("schema", "")).startswith("hydraopt-export/")


def inspect_export(path: Path) -> dict:
    """The export's program and files (its manifest, checked as a runtime would read it) and
    :func:`inspect_bundle` of the bank inside it (``bank/``, the bundle's files as they are)."""
    from exporters.manifest import Manifest

    m = Manifest.read(Path(path))
    return {
        "export": str(path),
        "export_id": m.export_id,
        "runtime": m.runtime,
        "quant": m.quant,
        "method": m.method,
        "tasks": m.tasks,
        "slot_signature": m.signature,
        "program_source": m.extra.get("program_source"),
        "max_cache_len": m.model.get("max_cache_len"),
        "bytes": {"program": m.bytes_of("program"), "shared": m.bytes_of("shared"), "resident": m.resident_bytes(),
                  "per_task": {t: m.task_bytes(t) for t in m.tasks}, "tokenizer": m.bytes_of("tokenizer")},
        "bank": inspect_bundle(Path(path) / "bank"),
    }
