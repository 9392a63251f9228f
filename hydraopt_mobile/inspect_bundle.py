"""What ``hydraopt inspect`` reports about a bundle."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .bundle import MANIFEST, SHARED, bundle_file_bytes, read_manifest, verify_files


def inspect_bundle(path: Path) -> dict:
    """Tasks, layouts, exact bytes on disk (shared, per task, total) and per-task error."""
    manifest = read_manifest(path)
    verify_files(path, manifest)
    sizes = bundle_file_bytes(path, manifest)
    per_task = {t: sizes[f"tasks/{t}.safetensors"] for t in manifest["tasks"]}
    tensor_files = sizes[SHARED] + sum(per_task.values())
    ref = manifest["reference_fp16_bytes"]
    layouts = Counter(
        f"kA={len(m['A'])} kB={len(m['B'])} r'={m['A'][0]['shape'][0] if m['A'] else 0} {m['A'][0]['format'] if m['A'] else '-'}"
        for m in manifest["modules"].values()
    )
    return {
        "bundle": str(path),
        "method": manifest["method"],
        "params": manifest["params"],
        "tasks": manifest["tasks"],
        "n_modules": len(manifest["modules"]),
        "layouts": dict(layouts.most_common()),
        "bytes": {
            "shared": sizes[SHARED],
            "per_task": per_task,
            "manifest": sizes[MANIFEST],
            "total": sum(sizes.values()),
            "payload": manifest["payload_bytes"],
        },
        "reference_fp16_bytes": ref,
        "fraction_of_reference": {"payload": manifest["payload_bytes"] / ref if ref else None, "files": tensor_files / ref if ref else None},
        "rel_errors": manifest.get("rel_errors", {}),
    }
