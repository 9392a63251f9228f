"""The planner's encoded A's, kept on disk from the candidate pass for the build pass.

A budgeted merge passes over the modules twice (candidates.py): the first measures every candidate
the allocator may pick, encoding each closed-form layout's A's once (``StoredA``); the allocator then
picks one candidate per module and budget; the second builds the picks. Encoding A's needs the
module's factored space (a QR of the stacked A's) and the layout's row spaces (eigendecompositions);
fitting B's to encoded A's needs neither (``solver.fit_to_stored``). So the first pass writes each
module's encoded A's here, and the second builds from them: the same codes, hence the same module,
bit for bit, without the QR and eigendecompositions a second time. One safetensors file per module
(each key's factors stacked, one tensor per encoded part: a few dozen entries, not thousands),
written by the worker that measured it, so memory stays at one module's working set; the build reads
only the keys its plans chose. The files are as large as the encoded A's of every measured layout
and format: at Llama-3-8B shapes with 100 tasks 26-94 MB per module (7 GB for 224 modules, in the
system's temporary folder, ``TMPDIR``, deleted when the merge ends); at Llama-3.2-1B attention shapes
with 40 tasks 5.4 MB per module (0.35 GB for 64 modules).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.merge.solver import StoredA

Key = tuple[int, int, str, int]
"""(k_A, k_B, number format label, rank the A's were encoded at)."""


class StoredASpill:
    """Per module: the tasks' ``sq_norms`` and ``b_grams`` (``FactoredModule``'s) and the encoded A's
    of each key, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, module: int) -> Path:
        return self.folder / f"{module}.safetensors"

    def put(self, module: int, sq_norms: torch.Tensor, b_grams: torch.Tensor, stored: dict[Key, StoredA]) -> None:
        tensors: dict[str, torch.Tensor] = {"sq_norms": sq_norms.contiguous(), "b_grams": b_grams.contiguous()}
        keys = []
        for i, (key, a) in enumerate(stored.items()):
            tensors[f"{i}.cross"], tensors[f"{i}.gram"] = a.cross.contiguous(), a.gram.contiguous()
            tensors[f"{i}.index"] = torch.tensor(a.index, dtype=torch.int64)
            if a.factors:  # a key's factors have one shape: each part stacked into one tensor
                tensors.update({f"{i}.{part}": torch.cat([f.data[part] for f in a.factors]) for part in a.factors[0].data})
            keys.append({"key": list(key), "factors": len(a.factors), "shape": list(a.factors[0].shape) if a.factors else None})
        save_file(tensors, str(self._path(module)), metadata={"keys": json.dumps(keys)})

    def get(self, module: int, wanted: set[Key]) -> tuple[torch.Tensor, torch.Tensor, dict[Key, StoredA]] | None:
        """What :meth:`put` wrote for ``module``, the ``wanted`` keys only (the others are not
        read), or None if nothing was written."""
        path = self._path(module)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            stored: dict[Key, StoredA] = {}
            for i, entry in enumerate(keys):
                k_a, k_b, fmt_label, a_rows = entry["key"]
                if (k_a, k_b, fmt_label, a_rows) not in wanted:
                    continue
                fmt = NumberFormat.parse(fmt_label)
                n = entry["factors"]
                parts = {part: f.get_tensor(f"{i}.{part}").chunk(n) for part in fmt.encoded_shapes(1, 1)} if n else {}  # the tensor names this format writes
                factors = [StoredFactor(fmt, {part: chunks[j] for part, chunks in parts.items()}, tuple(entry["shape"]), False) for j in range(n)]
                stored[(k_a, k_b, fmt_label, a_rows)] = StoredA(factors, f.get_tensor(f"{i}.cross"), f.get_tensor(f"{i}.gram"), f.get_tensor(f"{i}.index").tolist())
            return f.get_tensor("sq_norms"), f.get_tensor("b_grams"), stored
