"""Running independent per-module work on the caller's torch threads, one module per thread.

A merge's per-module arithmetic is on small matrices (a few hundred rows), where splitting each op
over threads gains little and costs a barrier per op; running ``n`` modules at a time, each op on
one thread, keeps ``n`` cores busy instead. It also makes every module's result independent of the
thread count: a reduction split over threads adds in an order that depends on their number, and
then so would the bytes a merge writes.

The thread count is what the caller gave torch (``torch.get_num_threads()``, set at the command
line or benchmark boundary); for the duration of the work torch and the BLAS libraries behind
scipy run one thread each, and the caller's setting is restored afterwards.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

import torch
from threadpoolctl import threadpool_limits

R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")


_WORKERS: ContextVar[int | None] = ContextVar("hydraopt_workers", default=None)


@contextmanager
def one_thread_per_op() -> Iterator[int]:
    """Torch's and the BLAS libraries' threads at 1 for the block, so that every op in it (not
    only the per-module work: task weights, allocation, reports too) gives the same bits whatever
    the caller's thread count; yields that count (the workers :func:`map_in_order` runs). Nested
    blocks keep the outermost one's count."""
    outer = _WORKERS.get()
    if outer is not None:
        yield outer
        return
    before = torch.get_num_threads()
    token = _WORKERS.set(before)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield before
    finally:
        torch.set_num_threads(before)
        _WORKERS.reset(token)


TRIM_GROWTH_BYTES = 256 << 20
"""Resident growth since the last trim that makes :func:`_release_freed_memory` trim again."""

_trimmed_at = 0  # resident bytes just after the last trim


def _release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing elsewhere)
    once the process has grown by :data:`TRIM_GROWTH_BYTES` since the last trim. A module's work
    frees many tensors of a few MB, which glibc keeps in its heaps (one per thread) rather than
    returning; trimmed, the merge's resident memory stays near the modules in flight instead of
    growing with the heaps. A trim walks every heap while the workers wait for its locks (8 ms per
    module, 5 % of benchmarks/merge_speed.py's merge, when it ran after every module), so small
    modules are trimmed every few modules and large ones (Llama-3-8B shapes) after each."""
    global _trimmed_at
    if _LIBC is None or _resident_bytes() - _trimmed_at < TRIM_GROWTH_BYTES:
        return
    _LIBC.malloc_trim(0)
    _trimmed_at = _resident_bytes()


def _resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``; Linux, where :data:`_LIBC` is set)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if _LIBC is not None else 0


def map_in_order(items: list[K], load: Callable[[K], V], work: Callable[[int, K, V], R], then: Callable[[int, K, V, R], None]) -> None:
    """``then(i, item, load(item), work(i, item, loaded))`` for every item, in order, in the calling
    thread; ``load`` also runs in the calling thread (reading inputs), ``work`` on as many threads
    as the caller gave torch. At most one item per thread plus one is loaded at a time, so memory
    stays at a few items' working sets."""
    def finish(i: int, item: K, loaded: V, result: R) -> None:
        then(i, item, loaded, result)
        _release_freed_memory()

    with one_thread_per_op() as workers:
        if workers <= 1 or len(items) < 2:
            for i, item in enumerate(items):
                loaded = load(item)
                finish(i, item, loaded, work(i, item, loaded))
            return
        pending: deque[tuple[int, K, V, Future[R]]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="hydraopt-module", initializer=torch.set_num_threads, initargs=(1,)) as pool:  # MKL keeps a count per thread: a new thread would run LAPACK (geqrf) on its default
            try:
                for i, item in enumerate(items):
                    loaded = load(item)
                    pending.append((i, item, loaded, pool.submit(work, i, item, loaded)))
                    while len(pending) > workers or (pending and i == len(items) - 1):
                        j, done_item, done_loaded, future = pending.popleft()
                        finish(j, done_item, done_loaded, future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
