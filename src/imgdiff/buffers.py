"""Output buffers recycled across the steps of a sampling loop, so that a loop allocates once.

A sampler step returns new tensors (the next state, intermediates); the previous step's
tensors are then garbage. On a CPU every fresh output of 128 KiB and more is a new ``mmap`` in
glibc's default configuration, so a loop over 12 MB latents page-faults thousands of times per
step, and even a warm heap hands out cold cache lines. Inside :func:`reuse_buffers` (which
every sampler loop enters), imgdiff's updates on CPU tensors take their outputs from a
:class:`BufferPool` instead: a buffer the pool handed out earlier is handed out again once
nothing outside the pool refers to it, so a loop cycles through a few buffers.

"Nothing refers to it" is checked, not assumed: no Python reference to the tensor or its storage
besides the pool's, no other tensor on its memory (views, ``detach()``, ``numpy()``, DLPack), no
C++ holder of the tensor. A callback that keeps a step's state keeps it intact; the pool then
allocates a new buffer. Results are the same with and without the pool (tested); only memory
traffic changes. CUDA tensors always get fresh tensors (torch's caching allocator already
recycles them, and a CUDA graph has its own pool). On a free-threaded Python build the pool is
off (reference counts are not exact there).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from imgdiff._checks import check_int

__all__ = [
    "MIN_BYTES",
    "BufferPool",
    "active_pool",
    "empty",
    "empty_like",
    "out_like",
    "reuse_buffers",
]

_Key = tuple[torch.Size, torch.dtype, bool]  # shape, dtype, channels-last
_Entry = tuple[Tensor, torch.UntypedStorage]

MIN_BYTES = 1024 * 1024
"""Smallest tensor (in bytes) that :func:`empty_like`, :func:`empty` and :func:`out_like` take
from a pool. Smaller blocks stay in glibc's heap between steps, so a fresh one costs less than
a pool lookup (``benchmarks/buffers.py``: no gain at 512 KiB, up to 4x at 4 MiB)."""

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
# Exact reference counts need the GIL build; the pool also needs torch's use counts.
_SUPPORTED = (
    _storage_use_count is not None
    and hasattr(Tensor, "_use_count")
    and getattr(sys, "_is_gil_enabled", lambda: True)()
)


def _probe() -> tuple[int, int]:
    """The reference counts of an unshared pool entry as :meth:`BufferPool._take` sees them.

    Written with :meth:`BufferPool._take`'s loop shape, so that the interpreter's own references
    (the list, the loop variables, the call's argument) are counted the same way.
    """
    t = torch.empty(1)
    entries: list[_Entry] = [(t, t.untyped_storage())]
    del t
    for t, s in entries:
        return sys.getrefcount(t), sys.getrefcount(s)
    raise AssertionError("unreachable")


_TENSOR_REFS, _STORAGE_REFS = _probe() if _SUPPORTED else (-1, -1)


class BufferPool:
    """CPU tensors handed out again once nothing outside the pool refers to them.

    Args:
        capacity: buffers kept per shape, layout and dtype (default 8: EDICT's loop cycles
            through up to six). Beyond it the oldest is dropped from the pool (it lives on while
            someone holds it).

    Use it through :func:`reuse_buffers`; :meth:`empty_like` and :meth:`empty` work like
    ``torch.empty_like`` / ``torch.empty`` (uninitialised memory), for CPU tensors of any size.
    """

    __slots__ = ("_buffers", "capacity")

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = check_int("capacity", capacity, min=1)
        self._buffers: dict[_Key, list[_Entry]] = {}

    def __len__(self) -> int:
        """The number of buffers the pool holds (in use or free)."""
        return sum(len(v) for v in self._buffers.values())

    def empty_like(self, x: Tensor) -> Tensor:
        """An uninitialised tensor like a CPU tensor ``x``: its shape and dtype, and its layout
        when ``x`` is contiguous or channels-last, else contiguous (as ``torch.empty_like``)."""
        if not x.is_cpu or not _SUPPORTED:
            return torch.empty_like(x)
        if x.is_contiguous():
            key = (x.shape, x.dtype, False)
        elif x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            key = (x.shape, x.dtype, True)
        else:
            return self.empty(x.shape, x.dtype)
        return self._take(key)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``."""
        if not _SUPPORTED:
            return torch.empty(tuple(shape), dtype=dtype)
        return self._take((torch.Size(shape), dtype, False))

    def clear(self) -> None:
        """Drop every buffer from the pool (they live on while someone holds them)."""
        self._buffers.clear()

    def _take(self, key: _Key) -> Tensor:
        shape, dtype, channels_last = key
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        entries = self._buffers.get(key)
        if entries is None:
            entries = self._buffers[key] = []
        else:
            for t, s in entries:
                # cheapest test first; then no C++ holder of the tensor, and no other tensor on
                # the storage (the tensor and the pool's storage object are its only two users)
                if (
                    sys.getrefcount(t) == _TENSOR_REFS
                    and sys.getrefcount(s) == _STORAGE_REFS
                    and t._use_count() == 1
                    and _storage_use_count(s._cdata) == 2  # type: ignore[misc]
                ):
                    if t.shape == shape and t.is_contiguous(memory_format=fmt):
                        return t
                    # reshaped in place by its last holder (resize_, unsqueeze_, t_, ...)
                    entries.remove((t, s))
                    break
        t = torch.empty(shape, dtype=dtype, memory_format=fmt)
        if len(entries) >= self.capacity:
            del entries[0]
        entries.append((t, t.untyped_storage()))
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


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)``, from this thread's pool inside :func:`reuse_buffers` for CPU
    tensors of :data:`MIN_BYTES` and more."""
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


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor, from this thread's pool inside :func:`reuse_buffers`
    for CPU tensors of :data:`MIN_BYTES` and more."""
    pools = _ACTIVE.pools
    if pools and device.type == "cpu" and math.prod(shape) * dtype.itemsize >= MIN_BYTES:
        return pools[-1].empty(shape, dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
