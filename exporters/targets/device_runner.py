#!/usr/bin/env python3
"""On-target runner for ONNX and ExecuTorch exports: the device-runner protocol ``hydraopt-device-runner/1``.

This file is copied to (or run on) the target as it is. It needs only the Python standard library,
numpy and the export's runtime (ONNX Runtime, or ExecuTorch's compiled bindings, which need torch
for their tensors): nothing from this project. Token ids go in, token
ids (and, on request, the logits needed for parity) come out; tokenising and scoring stay on the
host. It activates a task exactly as the host runtime does (``exporters/onnx_backend.py``,
``OrtSession``, which opens its session, decodes the bank's files and steps the decoder with this
file's :func:`open_ort_session`, :class:`BankSlots` and :class:`OrtDecoder`): the bank's shared
file and each task's own file are checked against the manifest (size, SHA-256) and decoded with
numpy once (shared: at open; the task's: on load), and the task's fp32 slots, every slot of the
program's signature, are bound to the decoder step on the switch (ONNX) or written by ``set_slots``
(ExecuTorch).

How the wire operations map to the in-process ``Backend`` / ``Session`` (``exporters/backend.py``):

- ``"export"`` (+ ``"threads"``): ``BACKENDS[...].open_session(export, threads)``; the manifest is
  read, the program opened and the shared file decoded (``session_ms``). ``onnxruntime`` exports
  (:class:`OrtRunner`) and ``executorch`` exports (:class:`EtRunner`: the switch runs the program's
  ``set_slots`` method, as ``exporters/executorch_backend.py``'s session does).
- each entry of ``"tasks"``: ``Session.load_task(task)`` (``load_ms``: verify, decode once), then
  ``Session.set_task(task)`` (``switch_ms``: the switch from the entry before).
- each prompt of ``"prompts"[task]``: ``exporters.runtime.greedy``: ``Session.prefill(prompt)``
  (``prefill_ms``), then ``Session.decode(token)`` per generated token (``decode_ms``) until an
  end-of-sequence token of the manifest or ``"max_new_tokens"``; ``tokens`` are the argmax tokens,
  and the optional logits are the rows ``greedy(..., keep_logits=True)`` returns.

Protocol (the same wire format as the Android app's benchmark mode,
``android_demo/.../DeviceRunner.java``; JSON files, UTF-8):

Request: ``{"protocol": "hydraopt-device-runner/1", "export": DIR, "tasks": [task, ...],
"prompts": {task: [[id, ...], ...]}, "max_new_tokens": N, "threads": T}``. ``tasks`` is run in
order: load the task's file, make it active (the switch), greedy-decode each of its prompts. A task
may appear more than once: ``[a, b, a]`` switches to ``b`` and back to ``a``.

Response: ``{"protocol", "target", "runtime", "export_id", "latency_kind", "threads",
"resident_bytes", "all_tasks_bytes", "session_ms", "tasks": [{"task", "task_bytes", "load_ms",
"switch_ms", "outputs": [{"prompt_tokens", "tokens", "prefill_ms", "decode_ms_per_token"}]}]}``,
or ``{"protocol", "error": MESSAGE}`` when the request, the export or a task file is refused.

Optional extensions (a runner that does not know them ignores them, as the Android app does; the
response lists the ones it honoured in ``"extensions"``):

- ``"logits_examples": K``: the logits of the first K outputs of every task entry are written to
  ``<response>.npz`` (key ``"<entry index>/<output index>"``, float32, one row per generated token:
  the row that predicted it); each such output gets ``"logits_key"``.
- ``"switch_samples": S``: ``switch_ms`` is the median of S switches to the task from the task
  before it (or from itself for the first entry), instead of one.
- ``"teacher_forced": true`` with ``"answers": {task: [[id, ...], ...]}`` (one reference answer per
  prompt): instead of generating, each example is one prefill-style pass over prompt + answer
  (its last token left out); ``tokens`` are the argmax of the rows that predict each answer token
  (:meth:`Runner.teacher_forced`) and the logits, when requested, are those rows. The response says
  ``"scoring": "teacher-forced"`` (else ``"generated"``). Exact = every ``tokens[i] == answer[i]``,
  judged on the host.
- progress: after each example the runner writes ``hydraopt-progress DONE TOTAL`` (examples of the
  whole request) as one line to stderr; the host shows it as it comes (:func:`report_progress`,
  ``protocol.run_streaming``). Not part of the response: a runner that writes none is still a runner.
- always reported: ``"process_threads"`` (threads of this process after the run), ``"torch_imported"``,
  ``"machine"`` (``platform.machine()``), ``"python"``, ``"peak_rss_mb"`` (VmHWM
  of this process; under qemu-user that is the emulator's process, the emulator included), and per
  output ``"decode_ms"`` (every step).

Usage: ``python device_runner.py REQUEST.json RESPONSE.json [--target NAME] [--latency-kind KIND]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time

PROTOCOL = "hydraopt-device-runner/1"
PROGRESS = "hydraopt-progress"  # stderr line: PROGRESS DONE TOTAL


def report_progress(done: int, total: int) -> None:
    """One progress line on stderr, flushed: the host reads it while the run goes on."""
    print(f"{PROGRESS} {done} {total}", file=sys.stderr, flush=True)
EXTENSIONS = ["logits_examples", "switch_samples", "decode_ms", "peak_rss_mb", "teacher_forced", "executorch"]
MANIFEST_SCHEMA = "hydraopt-export/4"


class Refused(Exception):
    """The request, the export or a task file is not acceptable; reported as ``"error"``."""


def open_ort_session(path: str, threads: int):
    """An ONNX Runtime CPU session on ``path``, opened as every ONNX session of this project opens one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # LoRA inputs with defaults are intended; ORT warns about each one
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


BANK_FILE_VERSION = "3"  # hydraopt_mobile/storage.py: FILE_METADATA


def _encoded_parts(label: str, rank: int, length: int) -> dict:
    """part -> (numpy dtype, shape) of one stored factor of ``rank`` vectors of ``length`` values,
    as ``hydraopt_mobile/formats.py: NumberFormat.encoded_shapes`` gives them."""
    if label == "fp16":
        return {"w": ("<f2", (rank, length))}
    if label == "int8":
        return {"q": ("i1", (rank, length)), "scale": ("<f2", (rank, 1))}
    group = label.removeprefix("int4-g")
    if not label.startswith("int4-g") or not group.isdigit() or int(group) < 2:
        raise Refused(f"the bank's format {label!r} is not one a device reads (fp16, int8, int4-g<G>)")
    padded = -(-length // int(group)) * int(group)
    return {"q": ("u1", (rank, padded // 2)), "scale": ("<f2", (rank, padded // int(group)))}


def bank_file_entries(blob: bytes, name: str, groups: dict) -> dict:
    """``{key: (dtype, shape, begin, end)}`` of the parts a bank file's bytes ``blob`` holds for the
    factors ``groups`` (group -> (items, blocks), ``BankSlots._plan``) expect; ``begin``/``end`` are
    offsets into ``blob``. A bank file (bundle format 3, ``hydraopt_mobile/storage.py``) is a
    safetensors file (an 8-byte little-endian header length, a JSON header, the bytes) holding one
    uint8 tensor ``data``: the parts back to back, larger dtypes first, then by key; their dtypes and
    shapes follow from the layouts, so its length is checked against them before any is read."""
    import numpy as np

    if len(blob) < 8:
        raise Refused(f"{name}: not a safetensors file (too short)")
    n = int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError as e:
        raise Refused(f"{name}: not a safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise Refused(f"{name}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None)
    version = metadata.get("hydraopt_bundle") if isinstance(metadata, dict) else None
    data = header.get("data")
    if version != BANK_FILE_VERSION or set(header) != {"data"} or not isinstance(data, dict):
        raise Refused(f"{name}: not a bank file of bundle format {BANK_FILE_VERSION} (one uint8 tensor 'data'; this one: format {version!r}, tensors {sorted(header)[:3]}): export the bank again")
    want = {}
    for (label, length), (items, _) in groups.items():
        for _, prefix, rank, *_ in items:
            want.update({prefix + part: (np.dtype(dtype), shape) for part, (dtype, shape) in _encoded_parts(label, rank, length).items()})
    order = sorted(want, key=lambda key: (-want[key][0].itemsize, key))
    sizes = [want[key][0].itemsize * want[key][1][0] * want[key][1][1] for key in order]
    total = sum(sizes)
    if data.get("dtype") != "U8" or data.get("shape") != [total] or data.get("data_offsets") != [0, total] or 8 + n + total != len(blob):
        raise Refused(f"{name}: tensor 'data' is not the {total} uint8 bytes the bank's layouts need (header {data}, {len(blob) - 8 - n} data bytes)")
    out, at = {}, 8 + n
    for key, size in zip(order, sizes):
        out[key] = (want[key][0], want[key][1], at, at + size)
        at += size
    return out


def decode_factor(parts: dict, label: str, length: int):
    """float32 component vectors (n, length) of one stored factor, as ``hydraopt_mobile/formats.py``
    encodes it: fp16 ``w``; int8 ``q`` times one scale per vector; int4 nibbles (low first,
    two's complement) times one scale per group, the padding cut. The rows of several factors of one
    format and length, concatenated, decode in the same single pass."""
    import numpy as np

    if label == "fp16":
        return parts["w"].astype(np.float32)
    q, scale = parts["q"], parts["scale"].astype(np.float32)
    if label.startswith("int4"):
        q = q.view(np.int8)
        low = (q << 4) >> 4  # arithmetic shifts sign-extend each nibble (two's complement)
        high = q >> 4
        q = np.stack([low, high], axis=2).reshape(q.shape[0], -1)
    n, padded = q.shape
    values = (q.reshape(n, scale.shape[1], -1) * scale[:, :, None]).reshape(n, padded)
    return values[:, :length]


# the parts a stored factor of each format has, and their dtypes
_PARTS = {"fp16": {"w": ("<f2",)}, "int": {"q": ("i1", "u1"), "scale": ("<f2",)}}


def _decoded_width(label: str, widths: dict) -> int | None:
    """The vector length that factors of format ``label`` whose parts are ``widths`` wide decode to
    (before the padding cut), or None when the parts do not fit together."""
    if label == "fp16":
        return widths["w"]
    padded = widths["q"] * (2 if label.startswith("int4") else 1)
    return padded if widths["scale"] and padded % widths["scale"] == 0 else None


class TaskSlots(dict):
    """slot -> array, as ``BankSlots.task_slots`` returns it; remembers the memory it decoded into."""

    layout: tuple = ()  # which loads may reuse its memory (BankSlots.task_slots)
    blocks: list = []  # the arrays its slots are views of: [block arrays, {shape: stacked family}] (empty: released)

    def __init__(self, values=(), layout: tuple = (), blocks: list | None = None) -> None:
        super().__init__(values)
        self.layout, self.blocks = layout, blocks or []


class BankSlots:
    """Every LoRA slot of a task, decoded from the bank's own files (the export's ``bank`` section:
    a bundle's ``modules`` and ``layouts``; key scheme of ``hydraopt_mobile/storage.py``).

    Per module, task t uses factor ``a_index[t]`` of A and ``b_index[t]`` of B. A factor used by one
    task lives in that task's file under ``<m>.<A|B>.<part>``, one used by several in the shared
    file under ``<m>.<A|B><i>.<part>``. Shared factors are decoded once (``load_shared``), a task's
    own on each load; each slot is written into the signature's shape, zero-padded where the factor's
    rank is smaller (``B A`` unchanged) and zero for modules the bank does not have. Where the
    program stacks several modules' slots into one input (the manifest's ``placement``: ONNX's q, k
    and v, ``exporters/onnx_fuse.py``), a task's own factors are decoded straight into their blocks
    of that input (stacked inputs of one shape live in one array per load) and shared ones copied in.

    Files come as ``(name, bytes)``: the caller reads each once and checks its digest on the same
    bytes. A caller done with a task's slots hands them back (``release``): the next load of a task
    of the same layout decodes into that memory. Fresh memory costs a page fault per 4 KiB page on
    first touch (about 1.4 ms for the 3.7 MB of a rank-16 signature on the host here), and whether
    the C allocator hands out fresh pages depends on the process's history. A task's own factors fall into a few groups of one format and vector length (whatever
    their rank or module). A file's *read plan* (per group and part: the byte runs of its factors,
    in order, checked against the bank's layout) depends only on the file's header, and tasks of one
    layout have identical headers: the plan is made once per distinct header and a load is then a
    join of byte runs, one numpy decode and one indexed write per group.
    """

    def __init__(self, manifest: dict) -> None:
        self.tasks: list = manifest["tasks"]
        self.inputs: dict = {name: tuple(shape) for name, shape in manifest["slots"]}  # the program's slot inputs
        self.placement: list = self._checked_placement(manifest.get("placement") or [])
        targets = {target for _, _, target, _, _ in self.placement}
        # the module slots the bank's factors are decoded into: placed ones and inputs that hold one module
        self.slots: dict = {slot: shape for slot, shape, *_ in self.placement}
        self.slots.update({name: shape for name, shape in self.inputs.items() if name not in targets})
        # stacked inputs of one shape form a family, held in one (n, *shape) array per task load
        self._family: dict = {}  # stacked input -> (its shape, its index in the family)
        self._family_sizes: dict = {}  # shape -> how many stacked inputs have it
        for target in sorted(targets, key=list(self.inputs).index):
            shape = self.inputs[target]
            self._family[target] = (shape, self._family_sizes.get(shape, 0))
            self._family_sizes[shape] = self._family[target][1] + 1
        self._place: dict = {slot: (target, row, col) for slot, _, target, row, col in self.placement}
        self.bank: dict = manifest["bank"]
        # Where every slot of every task comes from, worked out once (a load then only decodes):
        # per task, its own factors grouped by (format, length) -> [(slot, key prefix, rank, kind)],
        # and the shared factors it uses (slot, (module, kind, index)); other slots stay zero.
        own: list = [{} for _ in self.tasks]
        self._uses: list = [[] for _ in self.tasks]
        shared: dict = {}  # group -> [(slot, key prefix, rank, kind, (module, kind, index))] of the shared file
        for m, (name, d_out, d_in, layout_id) in enumerate(self.bank["modules"]):
            layout = self.bank["layouts"][layout_id]
            for kind, slot_kind, length in (("A", "lora_a", d_in), ("B", "lora_b", d_out)):
                index, ranks = layout[kind.lower() + "_index"], layout[kind.lower() + "_ranks"]
                slot = f"{name}.{slot_kind}"
                for i, rank in enumerate(ranks):
                    users = [t for t, g in enumerate(index) if g == i]
                    if not rank or not users:
                        continue
                    group = (layout["format"], length)
                    if len(users) == 1:
                        own[users[0]].setdefault(group, []).append((slot, f"{m}.{kind}.", rank, kind))
                    else:
                        shared.setdefault(group, []).append((slot, f"{m}.{kind}{i}.", rank, kind, (m, kind, i)))
                        for t in users:
                            self._uses[t].append((slot, (m, kind, i)))
        # tasks of one layout share one set of groups (and so one read plan per header)
        layouts: dict = {}
        self._layout_of = [layouts.setdefault(tuple((g, tuple(items)) for g, items in o.items()), len(layouts)) for o in own]
        self._layouts = [{g: self._plan(list(items), placed=True) for g, items in key} for key in layouts]
        self._shared_groups = {g: self._plan(items) for g, items in shared.items()}
        self._read_plans: dict = {}  # (layout, file length, header bytes) -> read plan
        self.shared: dict = {}  # (module, kind, index) -> the factor decoded into its slot's shape
        self._zeros: dict = {}  # shape -> one read-only zero array
        self._fixed: list = []  # per task: every slot that does not come from its own file (zero or shared)
        self._spare: dict = {}  # layout -> [block arrays of released results], reused by the next load

    def load_shared(self, stored: "tuple[str | os.PathLike, bytes] | None") -> None:
        """Decode every factor of the shared file ``(name, bytes)`` (None: the bank has none)."""
        name, blob = stored or ("the shared file (none in this export)", b"")
        if self._shared_groups:
            plan = self._read_plan(self._shared_groups, bank_file_entries(blob, name, self._shared_groups) if stored else {}, name, "the bank's shared file")
            for group, decoded in self._decode(plan, blob)[0].items():
                self.shared.update(zip((item[4] for item in self._shared_groups[group][0]), decoded))
        # stacked inputs' blocks are zero or written on each load (task_slots)
        self._fixed = [{slot: self._zero(slot) for slot in self.slots if slot not in self._place} for _ in self.tasks]
        for fixed, uses in zip(self._fixed, self._uses):
            fixed.update({slot: self.shared[source] for slot, source in uses if slot not in self._place})
        # per task, its shared factors that lie in stacked inputs: (slot, source, family shape, index, rows, cols)
        self._placed_uses = [[(slot, source, *self._family[self._place[slot][0]], *self._block(slot)) for slot, source in uses if slot in self._place]
                             for uses in self._uses]

    def task_slots(self, task: str, stored: "tuple[str | os.PathLike, bytes] | None") -> TaskSlots:
        """program slot input -> float32 array for ``task`` whose own file is ``(name, bytes)`` (None:
        it has none).

        Slots that come from the shared file (and zero slots) are the same arrays for every task
        that uses them, unless placed into a stacked input (a copy per load): a runtime feeds or
        copies them and never writes into them."""
        import numpy as np

        t = self.tasks.index(task)
        layout = self._layout_of[t]
        name, blob = stored or (f"task {task!r} (no file of its own)", b"")
        out = TaskSlots(self._fixed[t])
        # memory is reused between tasks that write the same positions: the same own factors and the same placed shared slots
        out.layout = (layout, tuple(use[0] for use in self._placed_uses[t]))
        plan: list = []
        if stored or self._layouts[layout]:
            n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else 0
            key = (layout, len(blob), blob[8:8 + n])
            plan = self._read_plans.get(key)
            if plan is None:
                entries = bank_file_entries(blob, name, self._layouts[layout]) if stored else {}
                plan = self._read_plan(self._layouts[layout], entries, name, f"task {task!r}")
                self._read_plans[key] = plan
        spare = self._spare.get(out.layout)
        arrays, families = spare.pop() if spare else ([], {})
        for shape, n_inputs in self._family_sizes.items():
            if shape not in families:
                families[shape] = np.zeros((n_inputs, *shape), dtype=np.float32)
        decoded, arrays = self._decode(plan, blob, arrays, families)
        out.blocks = [arrays, families]
        for group, values in decoded.items():
            out.update((item[0], a) for item, a in zip(self._layouts[layout][group][0], values) if a is not None)
        for _, source, shape, i, rows, cols in self._placed_uses[t]:  # shared factors of stacked inputs: copied into their blocks
            families[shape][i, rows, cols] = self.shared[source]
        out.update((target, families[shape][i]) for target, (shape, i) in self._family.items())
        return TaskSlots({name: out[name] for name in self.inputs}, layout=out.layout, blocks=out.blocks) if self._family else out

    def _block(self, slot: str) -> tuple[slice, slice]:
        """The rows and columns of ``slot``'s block in its stacked input."""
        (h, w), (_, row, col) = self.slots[slot], self._place[slot]
        return slice(row, row + h), slice(col, col + w)

    def _checked_placement(self, placement: list) -> list:
        """The manifest's ``placement`` as tuples, each block inside its program input and no module
        slot placed twice; refused otherwise, naming the entry."""
        out, seen = [], set()
        for entry in placement:
            try:
                slot, (h, w), target, row, col = entry
                shape, ok = (int(h), int(w)), all(type(v) is int and v >= 0 for v in (h, w, row, col))
            except (TypeError, ValueError):
                raise Refused(f"manifest placement entry {entry!r} is not [slot, [rows, columns], input, row, column]") from None
            rows, cols = self.inputs.get(target, (0, 0))
            if not ok or slot in seen or slot in self.inputs or row + h > rows or col + w > cols:
                raise Refused(f"manifest placement of {slot!r}: not a block inside the program input {target!r} {(rows, cols)}, or placed twice")
            seen.add(slot)
            out.append((slot, shape, target, row, col))
        return out

    def release(self, slots: "TaskSlots") -> None:
        """Take back a ``task_slots`` result that its caller no longer reads (nor keeps a view of):
        the next load of a task of the same layout writes into its memory. The same positions are
        written then, so padding stays zero."""
        if slots.blocks:
            self._spare.setdefault(slots.layout, []).append(slots.blocks)
            slots.blocks = []

    def _zero(self, slot: str):
        """The zero slot (modules the bank leaves to the base model), one array per shape."""
        import numpy as np

        shape = self.slots[slot]
        if shape not in self._zeros:
            self._zeros[shape] = np.zeros(shape, dtype=np.float32)
        return self._zeros[shape]

    def _plan(self, items: list, placed: bool = False) -> tuple[list, list]:
        """``items`` [(slot, key prefix, rank, kind, ...)] of one group, sorted so that factors of one
        kind, slot shape and (``placed``) place in a stacked input are neighbours, and per such run a
        block: (kind, shape, first and last decoded row, for every row the slot it goes to and its
        row (A) or column (B) there, and where the run lies in the stacked inputs: None, or the
        family's shape, the first row and column, and per row the stacked input's index in its
        family). A load then writes a run's rows in one indexed assignment, into one zero array
        (n, *shape), or straight into the family's array (n_family, *stacked shape)."""
        import numpy as np

        def place(item):
            if not placed or item[0] not in self._place:
                return None
            target, row, col = self._place[item[0]]
            return self._family[target][0], row, col

        items = sorted(items, key=lambda item: (item[3], self.slots[item[0]], place(item) or ()))
        blocks, start, row = [], 0, 0
        while start < len(items):
            run = (items[start][3], self.slots[items[start][0]], place(items[start]))
            stop = start
            while stop < len(items) and (items[stop][3], self.slots[items[stop][0]], place(items[stop])) == run:
                stop += 1
            ranks = [item[2] for item in items[start:stop]]
            which = np.repeat(np.arange(stop - start), ranks)
            within = np.concatenate([np.arange(r) for r in ranks])
            where = None
            if run[2] is not None:
                index = np.repeat([self._family[self._place[item[0]][0]][1] for item in items[start:stop]], ranks)
                where = (*run[2], index)
            blocks.append((run[0], run[1], row, row + sum(ranks), which, within, where))
            start, row = stop, row + sum(ranks)
        return items, blocks

    def _read_plan(self, groups: dict, entries: dict, name: str, owner: str) -> list:
        """Check a file's ``entries`` (``bank_file_entries``) against the factors ``groups``
        (group -> (items, blocks)) expect, and say where each lies: per group, per stored part its
        dtype, width and byte runs (adjacent runs merged), in item order. Every refusal names the
        file and the tensors."""
        expected = set()
        plan = []
        for (label, length), (items, blocks) in groups.items():
            want = _PARTS["fp16" if label == "fp16" else "int"]
            parts = {k: [] for k in want}
            for _, prefix, rank, *_ in items:
                found = [entries.get(prefix + k) for k in want]
                if any(f is None for f in found):
                    raise Refused(f"{name}: tensors {prefix}* are not a {label} factor of this bank")
                for k, (dtype, shape, begin, end) in zip(want, found):
                    if len(shape) != 2 or shape[0] != rank:
                        raise Refused(f"{name}: tensors {prefix}* are not a {label} factor of rank {rank} of this bank")
                    if dtype.str.lstrip("|") not in want[k]:
                        raise Refused(f"{name}: tensors {prefix}*: {k} stored as {dtype}, format {label} needs {want[k][0]}")
                    parts[k].append((dtype, shape[1], begin, end))
                    expected.add(prefix + k)
            stored = {}
            for k, runs in parts.items():
                if len({(dtype, width) for dtype, width, _, _ in runs}) > 1:
                    raise Refused(f"{name}: tensors {items[0][1]}*...: stored factors of format {label} disagree in {k}'s dtype or width")
                merged: list = []
                for _, _, begin, end in runs:
                    if merged and merged[-1][1] == begin:
                        merged[-1][1] = end
                    else:
                        merged.append([begin, end])
                stored[k] = (runs[0][0], runs[0][1], merged)
            width = _decoded_width(label, {k: v[1] for k, v in stored.items()})
            if width is None or width < length or (label == "fp16" and width != length):
                raise Refused(f"{name}: {items[0][1]}* decodes to vectors of {width}, the bank's layout says {length}")
            plan.append(((label, length), stored, sum(item[2] for item in items), blocks))
        unexpected = set(entries) - expected
        if unexpected:
            raise Refused(f"{name}: tensors {sorted(unexpected)[0].rpartition('.')[0]}.* are not factors of {owner}")
        return plan

    @staticmethod
    def _decode(plan: list, blob: bytes, reuse: list | None = None, families: dict | None = None) -> tuple[dict, list]:
        """group -> its factors decoded from ``blob`` along ``plan`` (``_read_plan``), each as its
        slot's array: A's (R, d_in) rows or B's (d_out, R) columns, zero-padded where the factor's
        rank is below the signature's R (``B A`` unchanged), or None for a factor written straight
        into its block of a stacked input (``families``: shape -> (n, *shape) arrays); and the
        block arrays they are views of. ``reuse``: block arrays of an earlier decode along a plan
        of the same layout (written at the same positions: their padding is zero), else fresh
        zero arrays."""
        import numpy as np

        view, out, arrays = memoryview(blob), {}, []
        for (label, length), stored, n_rows, blocks in plan:
            joined = {k: np.frombuffer(b"".join([view[b:e] for b, e in runs]), dtype).reshape(n_rows, width)
                      for k, (dtype, width, runs) in stored.items()}
            rows = decode_factor(joined, label, length)
            decoded = out[(label, length)] = []
            for kind, shape, first, last, which, within, where in blocks:
                if where is not None:  # straight into the stacked inputs: A's rows, B's columns, at their offsets
                    family, row, col, index = where
                    if kind == "A":
                        families[family][index, row + within, col:col + shape[1]] = rows[first:last]
                    else:
                        families[family][index, row:row + shape[0], col + within] = rows[first:last]
                    decoded.extend([None] * (which[-1] + 1))
                    continue
                block = reuse[len(arrays)] if reuse else np.zeros((which[-1] + 1, *shape), dtype=np.float32)
                if kind == "A":
                    block[which, within] = rows[first:last]
                else:
                    block[which, :, within] = rows[first:last]
                arrays.append(block)
                decoded.extend(block)
        return out, arrays


class OrtDecoder:
    """The decoder step of ``model.onnx`` through one ONNX Runtime IOBinding.

    ``session.run(None, feeds)`` converts every numpy feed on every call (about 2.5 us per input on
    the x86 host here): with 120 slot inputs beside the 60 KV tensors, that per-step cost alone was
    about a third of what the slots added to a 4-bit decode step. Here the active task's slots are
    bound once per switch (:meth:`set_slots`), the KV cache stays in ONNX Runtime's own values from
    one step to the next, and a step binds only the token ids, the cache and the outputs: a merged
    export (no slots) takes the same path, so both sides of a comparison step alike."""

    def __init__(self, session, model: dict) -> None:
        """``model``: the manifest's ``model`` section (``n_layers``, ``kv_heads``, ``head_dim``)."""
        import numpy as np

        self.session = session
        self.io = session.io_binding()
        self.outputs = [o.name for o in session.get_outputs()]
        self.n_kv = 2 * model["n_layers"]
        self.empty = np.zeros((1, model["kv_heads"], 0, model["head_dim"]), dtype=np.float32)
        self.past: list | None = None  # None: a new sequence, else the cache the last step returned

    @staticmethod
    def slot_values(slots: dict) -> dict:
        """A task's decoded slots (name -> float32 array, as :class:`BankSlots` decodes them) as ONNX
        Runtime values over the same memory (no copy; each keeps its array alive). Made once per load:
        ``OrtValue.ortvalue_from_numpy_with_onnx_type`` (element type 1, FLOAT) takes about 3 us per
        slot on the host here, ``ortvalue_from_numpy`` twice that (it builds a device object per call)."""
        import numpy as np
        import onnxruntime

        for name, value in slots.items():
            if value.dtype != np.float32 or not value.flags.c_contiguous:
                layout = "C-contiguous" if value.flags.c_contiguous else "not C-contiguous"
                raise Refused(f"slot {name!r}: expected a C-contiguous float32 array, got {value.dtype}, {layout}")
        return {name: onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(value, 1) for name, value in slots.items()}

    def set_slots(self, values: dict) -> None:
        """Bind a task's :meth:`slot_values` and unbind every slot of the previous task: an
        unbound slot input takes its zero default."""
        self.io.clear_binding_inputs()
        for name, value in values.items():
            self.io.bind_ortvalue_input(name, value)

    def reset(self) -> None:
        """Start a new sequence: the next step reads an empty cache."""
        self.past = None

    def step(self, ids: list[int]):
        """Logits (n, vocab) of ``ids`` after the cache; the cache it returns stays in ONNX Runtime's
        values and is bound, not copied, on the next step."""
        import numpy as np

        io = self.io
        io.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        if self.past is None:
            for i in range(self.n_kv):
                io.bind_cpu_input(f"past.{i}", self.empty)
        else:
            for i, value in enumerate(self.past):
                io.bind_ortvalue_input(f"past.{i}", value)
        for name in self.outputs:  # unallocated each step: the cache grows, and the last values live on as `past`
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        self.past = out[1:]
        return out[0].numpy()[0]


def _status_field(name: str) -> int | None:
    """An integer field of ``/proc/self/status`` (None where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float | None:
    kb = _status_field("VmHWM")
    return None if kb is None else kb / 1024


class Export:
    """The parts of an export's ``manifest.json`` a runner needs (exporters/manifest.py writes it)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise Refused(f"{folder}: no manifest.json; not an export folder")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("schema") != MANIFEST_SCHEMA:
            raise Refused(f"{path}: not a {MANIFEST_SCHEMA} manifest")
        if raw["runtime"] not in RUNNERS:
            raise Refused(f"export {raw['export_id']} is for {raw['runtime']}; this runner runs {', '.join(RUNNERS)} exports")
        self.raw = raw
        self.export_id: str = raw["export_id"]
        self.tasks: list[str] = raw["tasks"]
        self.files: list[dict] = raw["files"]
        self.switchable = bool(raw["slots"])
        self.model: dict = raw["model"]

    def check_merged(self, task: str) -> None:
        """A merged export (no slots) serves its one task only."""
        if task not in self.tasks:
            raise Refused(f"this merged export serves only {self.tasks[0]!r}, not {task!r}")

    def entry(self, role: str, task: str | None = None) -> dict:
        for f in self.files:
            if f["role"] == role and f.get("task") == task:
                return f
        raise Refused(f"export {self.export_id}: no {role} file" + (f" for task {task!r}" if task else ""))

    def find(self, role: str, task: str | None = None) -> dict | None:
        """The file entry of ``role`` (and ``task``), or None when the export has none."""
        return next((f for f in self.files if f["role"] == role and f.get("task") == task), None)

    def bytes_of(self, role: str) -> int:
        return sum(f["bytes"] for f in self.files if f["role"] == role)

    def resident_bytes(self) -> int:
        """The program and the bank's shared file: loaded once, whatever the task."""
        return self.bytes_of("program") + self.bytes_of("shared")

    def task_bytes(self, task: str) -> int:
        entry = self.find("task", task)
        return entry["bytes"] if entry else 0

    def verified(self, entry: dict | None, what: str) -> tuple[str, bytes] | None:
        """``(path, bytes)`` of ``entry``'s file, read once, after checking its size and the SHA-256
        of those same bytes against the manifest (None: no entry)."""
        if entry is None:
            return None
        path = os.path.join(self.folder, entry["path"])
        if not os.path.isfile(path):
            raise Refused(f"{path}: {what} is missing")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                raise Refused(f"{path}: {size} bytes, but the export wrote {entry['bytes']} for {what}")
            blob = f.read()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise Refused(f"{path}: SHA-256 does not match export {self.export_id}'s {what}; refusing to load it")
        return path, blob

    def verified_task_file(self, task: str) -> tuple[str, bytes] | None:
        """``task``'s own file ``(path, bytes)``, checked (None: every factor it uses is shared)."""
        if task not in self.tasks:
            raise Refused(f"task {task!r} is not in export {self.export_id} (tasks: {', '.join(self.tasks)})")
        return self.verified(self.find("task", task), f"task file for {task!r}")


class Runner:
    """What every runtime's runner shares: greedy decoding and teacher-forced scoring, both over
    ``prefill`` (a new sequence: logits (n, vocab)) and ``decode`` (one more token: (vocab,))."""

    eos: set
    np: object
    export: "Export"
    bank: "BankSlots | None"
    slots: dict

    def _open_bank(self) -> None:
        """The bank's slot map and its shared file, decoded once (a merged export has neither)."""
        self.bank = BankSlots(self.export.raw) if self.export.switchable else None
        if self.bank is not None:
            self.bank.load_shared(self.export.verified(self.export.find("shared"), "the shared file"))
        self.slots = {}

    def load_task(self, task: str) -> float:
        """Verify and read the task's own file, decode its slots once; milliseconds."""
        t0 = time.perf_counter()
        if not self.export.switchable:
            self.export.check_merged(task)
        else:
            self.slots[task] = self._runtime_form(self.bank.task_slots(task, self.export.verified_task_file(task)))
        return (time.perf_counter() - t0) * 1e3

    def _runtime_form(self, slots: dict):
        """A task's decoded slots (slot -> array) as the runtime takes them."""
        return slots

    def prefill(self, ids: list[int]):
        raise NotImplementedError

    def decode(self, token: int):
        raise NotImplementedError

    def greedy(self, prompt: list[int], max_new: int) -> dict:
        """Greedy decoding; stops at an end-of-sequence token of the manifest or after ``max_new``."""
        np = self.np
        t0 = time.perf_counter()
        rows = [self.prefill(prompt)[-1]]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        tokens: list[int] = []
        decode_ms: list[float] = []
        token = int(np.argmax(rows[-1]))
        while True:
            tokens.append(token)
            if token in self.eos or len(tokens) >= max_new:
                break
            t0 = time.perf_counter()
            rows.append(self.decode(token))
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            token = int(np.argmax(rows[-1]))
        return {"tokens": tokens, "prefill_ms": prefill_ms, "decode_ms": decode_ms, "rows": np.stack(rows).astype(np.float32)}

    def teacher_forced(self, prompt: list[int], answer: list[int]) -> dict:
        """One prefill-style pass over ``prompt + answer[:-1]``: row ``len(prompt) - 1 + i`` is the
        logits that predict ``answer[i]`` with every earlier answer token given (teacher forcing), so
        the ``len(answer)`` rows from there on are what greedy decoding would compute for as long as
        its tokens agree with the answer. ``tokens``: the argmax of each of those rows."""
        np = self.np
        if not prompt or not answer:
            raise Refused("teacher-forced scoring needs a non-empty prompt and answer for every example")
        t0 = time.perf_counter()
        rows = self.prefill(prompt + answer[:-1])[len(prompt) - 1:]
        ms = (time.perf_counter() - t0) * 1e3
        return {"tokens": [int(t) for t in np.argmax(rows, axis=-1)], "prefill_ms": ms, "decode_ms": [],
                "rows": np.asarray(rows, dtype=np.float32)}


class OrtRunner(Runner):
    """ONNX Runtime session on the export; the KV cache is explicit (``past.*`` in, ``present.*`` out)."""

    def __init__(self, export: Export, threads: int) -> None:
        import numpy as np
        import onnxruntime

        self.np, self.export, self.threads = np, export, threads
        self.runtime = f"onnxruntime {onnxruntime.__version__}"
        t0 = time.perf_counter()
        self.session = open_ort_session(os.path.join(export.folder, export.entry("program")["path"]), threads)
        self._open_bank()
        self.session_ms = (time.perf_counter() - t0) * 1e3
        self.eos = set(export.model["eos_token_id"])
        self.decoder = OrtDecoder(self.session, export.model)

    def _runtime_form(self, slots: dict) -> dict:
        return OrtDecoder.slot_values(slots)

    def set_task(self, task: str) -> float:
        """Make a loaded task active: its slots are bound to the decoder step; milliseconds."""
        t0 = time.perf_counter()
        if self.export.switchable:
            self.decoder.set_slots(self.slots[task])
        return (time.perf_counter() - t0) * 1e3

    def prefill(self, ids: list[int]):
        self.decoder.reset()
        return self.decoder.step(ids)

    def decode(self, token: int):
        return self.decoder.step([token])[-1]


def executorch_bindings():
    """ExecuTorch's compiled Python bindings (``_C`` since 1.2, ``_portable_lib`` before), imported
    directly: ``executorch.runtime`` imports them through ``portable_lib.py``, which also imports the
    exporter (``exir``) and its dependencies, which a target does not install. They link libtorch
    and take torch tensors, so torch is imported first."""
    import importlib

    import torch  # noqa: F401  (loads libtorch for the bindings)

    for name in ("_C", "_portable_lib"):
        try:
            return importlib.import_module(f"executorch.extension.pybindings.{name}")
        except ModuleNotFoundError:
            continue
    raise Refused("no ExecuTorch bindings (executorch.extension.pybindings._C or _portable_lib) in this Python")


def load_llm_custom_ops() -> str:
    """Register ExecuTorch's LLM kernels (``llama::update_cache``, ``llama::custom_sdpa``: the
    ``custom-ops`` attention of ``exporters/et_attention.py``) by loading the wheel's
    ``libcustom_ops_aot_lib`` directly: ``executorch.extension.llm.custom_ops.custom_ops``, which
    does the same, also imports torch's compiler (inductor). Returns the library's path."""
    import glob
    import importlib.util

    import torch

    spec = importlib.util.find_spec("executorch")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    libs = [p for root in roots for p in glob.glob(os.path.join(root, "extension", "llm", "custom_ops", "*custom_ops_aot_lib.*"))]
    if not libs:
        raise Refused("this ExecuTorch has no LLM custom-ops library (libcustom_ops_aot_lib), which the export's "
                      "custom-ops attention needs: export with --attention portable for this runtime")
    torch.ops.load_library(libs[0])
    return libs[0]


class ExecuTorchProgram:
    """One ``.pte`` through ``_load_program`` (what ``executorch.runtime.Runtime.load_program`` calls):
    the methods of one program share their memory arenas, so ``set_slots``'s writes reach ``forward``.
    (``_load_for_executorch``, the older module API, gives each method its own copy: no switch.)
    ``custom_ops``: register ExecuTorch's LLM kernels first (:func:`load_llm_custom_ops`)."""

    def __init__(self, path: str, threads: int, custom_ops: bool = False) -> None:
        import importlib.metadata

        import torch

        et = executorch_bindings()
        if custom_ops:
            load_llm_custom_ops()
        et._unsafe_reset_threadpool(threads)
        self.torch = torch
        self.name = f"executorch {importlib.metadata.version('executorch')} (torch {torch.__version__}, XNNPACK)"
        self.program = et._load_program(path)

    def method(self, name: str):
        """``f(list of numpy arrays) -> list of numpy arrays`` running method ``name``."""
        m = self.program.load_method(name)
        return lambda arrays: [t.numpy() for t in m(tuple(self.torch.from_numpy(a) for a in arrays))]


class EtRunner(Runner):
    """ExecuTorch program of the export (``exporters/executorch_backend.py``): ``forward(input_ids,
    cache_position)`` over a static KV cache inside the program, and ``set_slots(*slots)``, which
    writes every LoRA slot (manifest order) into the buffers ``forward`` reads: the switch."""

    def __init__(self, export: Export, threads: int) -> None:
        import numpy as np

        self.np, self.export, self.threads = np, export, threads
        t0 = time.perf_counter()
        rt = ExecuTorchProgram(os.path.join(export.folder, export.entry("program")["path"]), threads,
                               custom_ops=export.model.get("attention", "portable") == "custom-ops")
        self.runtime = rt.name
        self.forward = rt.method("forward")
        self.setter = rt.method("set_slots") if export.switchable else None
        self._open_bank()
        self.session_ms = (time.perf_counter() - t0) * 1e3
        self.max_len = int(export.model["max_cache_len"])
        self.eos = set(export.model["eos_token_id"])
        self.pos = 0

    def _runtime_form(self, slots: dict) -> list:
        """``set_slots`` takes every slot positionally, in the manifest's (the program's) order."""
        return [slots[name] for name in self.bank.slots]

    def set_task(self, task: str) -> float:
        """Run ``set_slots`` with the task's slots; milliseconds."""
        t0 = time.perf_counter()
        if self.setter is not None:
            self.setter(self.slots[task])
        return (time.perf_counter() - t0) * 1e3

    def _step(self, ids: list[int]):
        np = self.np
        if self.pos + len(ids) > self.max_len:
            raise Refused(f"a sequence of {self.pos + len(ids)} tokens exceeds the export's KV cache ({self.max_len})")
        out = self.forward([np.array([ids], dtype=np.int64), np.arange(self.pos, self.pos + len(ids), dtype=np.int64)])[0]
        self.pos += len(ids)
        return out[0]

    def prefill(self, ids: list[int]):
        self.pos = 0  # positions past the new sequence are masked by the static cache's cache_position
        return self._step(ids)

    def decode(self, token: int):
        return self._step([token])[-1]


RUNNERS = {"onnxruntime": OrtRunner, "executorch": EtRunner}


def run(request: dict, target: str, latency_kind: str) -> tuple[dict, dict]:
    """The response and the logits arrays (``"<entry>/<output>"`` -> rows) for one request."""
    out: dict = {"protocol": PROTOCOL}
    arrays: dict = {}
    try:
        if request.get("protocol") != PROTOCOL:
            raise Refused(f"request protocol is {request.get('protocol')!r}, expected {PROTOCOL}")
        export = Export(request["export"])
        threads = int(request.get("threads", 1))
        max_new = int(request["max_new_tokens"])
        prompts = request.get("prompts") or {}
        keep = int(request.get("logits_examples", 0))
        samples = max(1, int(request.get("switch_samples", 1)))
        answers = request.get("answers") if request.get("teacher_forced") else None
        if answers is not None and any(len(answers.get(t, [])) != len(p) for t, p in prompts.items()):
            raise Refused("teacher_forced: \"answers\" must hold one answer per prompt of every task")
        runner = RUNNERS[export.raw["runtime"]](export, threads)
        out.update({
            "target": target, "runtime": runner.runtime, "export_id": export.export_id,
            "scoring": "teacher-forced" if answers is not None else "generated",
            "latency_kind": latency_kind, "threads": threads, "resident_bytes": export.resident_bytes(),
            "all_tasks_bytes": export.bytes_of("task"), "session_ms": runner.session_ms,
            "machine": platform.machine(), "python": platform.python_version(), "extensions": EXTENSIONS,
        })
        entries = []
        previous = None
        total, done = sum(len(prompts.get(task, [])) for task in request["tasks"]), 0
        for index, task in enumerate(request["tasks"]):
            entry: dict = {"task": task, "task_bytes": export.task_bytes(task), "load_ms": runner.load_task(task)}
            times = []
            for _ in range(samples):
                runner.set_task(previous or task)
                times.append(runner.set_task(task))
            entry["switch_ms"] = statistics.median(times)
            outputs = []
            for i, ids in enumerate(prompts.get(task, [])):
                ids = [int(t) for t in ids]
                if answers is None:
                    g = runner.greedy(ids, max_new)
                else:
                    g = runner.teacher_forced(ids, [int(t) for t in answers[task][i]])
                o = {"prompt_tokens": len(ids), "tokens": g["tokens"], "prefill_ms": g["prefill_ms"],
                     "decode_ms_per_token": statistics.median(g["decode_ms"]) if g["decode_ms"] else None,
                     "decode_ms": g["decode_ms"]}
                if i < keep:
                    o["logits_key"] = f"{index}/{i}"
                    arrays[o["logits_key"]] = g["rows"]
                outputs.append(o)
                done += 1
                report_progress(done, total)
            entry["outputs"] = outputs
            entries.append(entry)
            previous = task
        out["tasks"] = entries
        out["peak_rss_mb"] = _peak_rss_mb()
        out["process_threads"] = _status_field("Threads")
        out["torch_imported"] = "torch" in sys.modules
    except Refused as e:
        out = {"protocol": PROTOCOL, "error": f"Refused: {e}"}
        arrays = {}
    except Exception as e:  # the host reads the error; the runner must always answer
        out = {"protocol": PROTOCOL, "error": f"{type(e).__name__}: {e}"}
        arrays = {}
    return out, arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="hydraopt device runner (ONNX Runtime, ExecuTorch)")
    parser.add_argument("request")
    parser.add_argument("response")
    parser.add_argument("--target", default=platform.machine())
    parser.add_argument("--latency-kind", default="measured", choices=["measured", "emulated", "estimated"])
    args = parser.parse_args(argv)
    try:
        with open(args.request, encoding="utf-8") as f:
            request = json.load(f)
    except (OSError, ValueError) as e:
        request = {"protocol": f"unreadable request: {e}"}
    response, arrays = run(request, args.target, args.latency_kind)
    if arrays:
        import numpy as np

        npz = args.response + ".npz"
        with open(npz + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(npz + ".tmp", npz)
        response["logits_file"] = os.path.basename(npz)
    with open(args.response + ".tmp", "w", encoding="utf-8") as f:
        json.dump(response, f)
    os.replace(args.response + ".tmp", args.response)  # written whole, then renamed
    return 1 if "error" in response else 0


if __name__ == "__main__":
    sys.exit(main())
