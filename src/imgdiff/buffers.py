"""Output buffers recycled across the steps of a sampling loop, so that a loop allocates once.

A sampler step returns new tensors (the next state, intermediates); the previous step's
tensors are then garbage. On a CPU a fresh output of a few megabytes is often, with glibc's
default ``malloc``, a new ``mmap`` that page-faults in page by page, so a loop over 12 MB latents
page-faults thousands of times per step. Inside :func:`reuse_buffers` (which every sampler loop
enters), imgdiff's updates on CPU tensors of :data:`MIN_BYTES` and more take their outputs from
a :class:`BufferPool` instead, so a loop cycles through a few buffers.

The pool keeps *memory* (storages), not tensor objects: every output is a new tensor object
(no ``requires_grad``, ``.grad``, hooks, attributes or weak references carried over), on a
storage that no tensor uses any more. That is checked, not assumed, each time: no tensor on the
storage (views, ``detach()``, ``numpy()``, DLPack exports, autograd's saved tensors all count),
no Python reference to the storage object besides the pool's, not moved to shared memory (by
``share_memory_()`` or a ``torch.multiprocessing`` queue). A callback may keep any tensor it is
given; the pool then allocates instead. Results are the same with and without the pool (tested);
only memory traffic changes. CUDA tensors always get fresh tensors (torch's caching allocator
already recycles them, and a CUDA graph has its own pool). On a free-threaded Python build, or
where the reference-count calibration does not hold (a tracer that holds frames' locals), the
pool allocates every time.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor

from imgdiff._checks import check_int

__all__ = [
    "MIN_BYTES",
    "BufferPool",
    "active_pool",
    "empty_like",
    "exclusive",
    "out_empty",
    "out_like",
    "reuse_buffers",
]

_Key = tuple[torch.Size, torch.dtype, bool]  # shape, dtype, channels-last

MIN_BYTES = 1024 * 1024
"""Smallest tensor (in bytes) that :func:`empty_like`, :func:`out_like` and :func:`out_empty` take
from a pool. Smaller blocks stay in glibc's heap between steps, so a fresh one costs less than
a pool lookup (``benchmarks/buffers.py``: pooling at 512 KiB is slower)."""

_use_count = getattr(torch._C, "_storage_Use_Count", None)
# Exact reference counts need the GIL build; the pool also needs torch's storage use counts.
_SUPPORTED = _use_count is not None and getattr(sys, "_is_gil_enabled", lambda: True)()
_storage_use_count = cast(Callable[[int], int], _use_count)  # called only when _SUPPORTED


def _unused(s: torch.UntypedStorage) -> bool:
    """Whether no tensor (nor anything else in C++) uses the storage besides its Python object."""
    return _storage_use_count(s._cdata) == 1


def _probe() -> int:
    """The reference count of an unused pooled storage as :meth:`BufferPool._take` sees it.

    Written with :meth:`BufferPool._take`'s loop shape, so that the interpreter's own references
    (the list, the loop variable, the call's argument) are counted the same way.
    """
    entries = [torch.empty(1, device="cpu").untyped_storage()]
    for s in entries:
        return sys.getrefcount(s)
    raise AssertionError("unreachable")


_STORAGE_REFS = _probe() if _SUPPORTED else -1


_WITNESS = torch.empty(1, device="cpu")
"""A tensor alone on its memory, which :func:`exclusive` counts beside the one it is asked about
(in the same frame, so a tracer holding that frame's locals adds the same to both)."""


class BufferPool:
    """CPU memory handed out again, as new tensors, once no tensor uses it any more.

    Args:
        capacity: buffers kept per shape, layout and dtype (default 8: EDICT's loop cycles
            through up to six). Beyond it the oldest is dropped from the pool (its memory lives
            on while a tensor uses it).

    Use it through :func:`reuse_buffers`; :meth:`empty_like` and :meth:`empty` work like
    ``torch.empty_like`` / ``torch.empty`` (uninitialised memory) for CPU tensors of any size.
    """

    __slots__ = ("_buffers", "_layouts", "_refs", "capacity")

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = check_int("capacity", capacity, min=1)
        self._buffers: dict[_Key, list[torch.UntypedStorage]] = {}
        self._layouts: dict[_Key, tuple[tuple[int, ...], int]] = {}  # strides, bytes
        # recalibrated here: a mismatch with the import-time count (a tracer holding frames'
        # locals at one of the two moments) turns the pool off rather than risk a wrong count
        probe = _probe() if _SUPPORTED else -1
        self._refs = probe if probe == _STORAGE_REFS else -1

    def __len__(self) -> int:
        """The number of buffers the pool holds (in use or free)."""
        return sum(len(v) for v in self._buffers.values())

    def empty_like(self, x: Tensor) -> Tensor:
        """An uninitialised CPU tensor of ``x``'s shape and dtype, channels-last when ``x`` is,
        else contiguous (``torch.empty_like`` would also keep other dense strides)."""
        if not x.is_cpu:
            return torch.empty_like(x)
        if x.ndim == 4 and not x.is_contiguous():
            cl = x.is_contiguous(memory_format=torch.channels_last)
            return self._take((x.shape, x.dtype, cl))
        return self._take((x.shape, x.dtype, False))

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``."""
        return self._take((torch.Size(shape), dtype, False))

    def clear(self) -> None:
        """Drop every buffer from the pool (memory a tensor still uses lives on)."""
        self._buffers.clear()

    def holds(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` (the object itself) is one of the pool's buffers."""
        return any(s is storage for entries in self._buffers.values() for s in entries)

    def _take(self, key: _Key) -> Tensor:
        shape, dtype, channels_last = key
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if self._refs < 0:  # pooling is off
            return torch.empty(shape, dtype=dtype, device="cpu", memory_format=fmt)
        entries = self._buffers.get(key)
        if entries is None:
            entries = self._buffers[key] = []
        else:
            stride, nbytes = self._layouts[key]
            dropped = None
            for s in entries:
                if sys.getrefcount(s) == self._refs and _unused(s):
                    # not moved to shared memory (another process may read it), not shrunk
                    if not s.is_shared() and s.nbytes() >= nbytes:
                        t = torch.empty(0, dtype=dtype, device="cpu")
                        return t.set_(s, 0, shape, stride)
                    dropped = s
                    break
            if dropped is not None:
                entries[:] = [e for e in entries if e is not dropped]
        t = torch.empty(shape, dtype=dtype, device="cpu", memory_format=fmt)
        self._layouts.setdefault(key, (t.stride(), t.nbytes))
        if len(entries) >= self.capacity:
            del entries[0]
        entries.append(t.untyped_storage())
        return t


class _Active(threading.local):
    def __init__(self) -> None:
        self.pools: list[BufferPool] = []


_ACTIVE = _Active()


def active_pool() -> BufferPool | None:
    """The innermost pool of :func:`reuse_buffers` on this thread, if any."""
    pools = _ACTIVE.pools
    return pools[-1] if pools else None


@contextmanager
def reuse_buffers(capacity: int = 8) -> Iterator[BufferPool]:
    """Within the block, imgdiff's updates on CPU tensors (the C kernels, the torch path's
    combinations, drawn noise) take their outputs from a new :class:`BufferPool` on this thread.

    Every sampler loop runs in one; use it around a loop of your own built from
    :mod:`imgdiff.kernels`. The pool is dropped at the end of the block (the tensors the block
    returned stay valid). Blocks nest; the innermost pool is used.
    """
    pool = BufferPool(capacity)
    pools = _ACTIVE.pools
    pools.append(pool)
    try:
        yield pool
    finally:
        pools.remove(pool)
        pool.clear()


def exclusive(t: Tensor) -> bool:
    """Whether ``t`` is the only tensor on its memory, so that an update may overwrite it once
    its holder drops every other reference to ``t`` itself.

    No view of ``t``, ``detach()`` of it, tensor autograd saved for backward, ``numpy()``, DLPack
    export (each of these is another tensor on the memory) nor Python reference to its storage
    object besides a :class:`BufferPool`'s may exist. Python references to the tensor object
    ``t`` itself are not seen: a caller that lends ``t`` out (to a model, say) lends
    ``t.detach()`` instead and asks after dropping it; whatever the borrower kept then counts.
    Memory moved to shared memory (``share_memory_()``, a ``torch.multiprocessing`` queue) is
    never exclusive: another process may read it. Nor is CUDA memory: torch reports every CUDA
    storage as shared (it may have been handed to another process through CUDA IPC), so on the
    GPU the steps that ask (EDICT's) always take new outputs. A weak reference to the storage
    object is not seen. ``False`` where the counts are not exact (a free-threaded Python build).
    """
    if not _SUPPORTED:
        return False
    s, w = t.untyped_storage(), _WITNESS.untyped_storage()
    held = sys.getrefcount(s) - sys.getrefcount(w)
    if held < 0 or _storage_use_count(s._cdata) != _storage_use_count(w._cdata) or s.is_shared():
        return False
    return held == 0 or (held == 1 and any(p.holds(s) for p in _ACTIVE.pools))


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)``; from this thread's pool inside :func:`reuse_buffers` for CPU
    tensors of :data:`MIN_BYTES` and more (see :meth:`BufferPool.empty_like` for the layout)."""
    pools = _ACTIVE.pools
    if pools and x.is_cpu and x.nbytes >= MIN_BYTES:
        return pools[-1].empty_like(x)
    return torch.empty_like(x)


def out_like(x: Tensor, *others: Tensor) -> Tensor | None:
    """An ``out=`` tensor for a torch operation on ``x`` and ``others``: from this thread's pool
    inside :func:`reuse_buffers` when they are CPU tensors of one shape and dtype and of
    :data:`MIN_BYTES` and more, and autograd need not see the operation; else ``None`` (torch
    allocates)."""
    pools = _ACTIVE.pools
    if not pools or not x.is_cpu or x.nbytes < MIN_BYTES:
        return None
    shape, dtype, grad = x.shape, x.dtype, torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    for t in others:
        if t.shape != shape or t.dtype != dtype or not t.is_cpu or (grad and t.requires_grad):
            return None
    return pools[-1].empty_like(x)


def out_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """An ``out=`` tensor of ``shape`` and ``dtype`` (contiguous) from this thread's pool inside
    :func:`reuse_buffers` for the CPU and :data:`MIN_BYTES` and more; else ``None`` (torch
    allocates)."""
    pools = _ACTIVE.pools
    if pools and device.type == "cpu" and math.prod(shape) * dtype.itemsize >= MIN_BYTES:
        return pools[-1].empty(shape, dtype)
    return None
