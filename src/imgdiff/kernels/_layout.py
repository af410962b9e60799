"""Memory layouts the fused kernels walk linearly (shared by the Triton and CPU kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "MASK_BROADCAST_CHANNELS_LAST",
    "MASK_BROADCAST_CONTIGUOUS",
    "MASK_FULL",
    "aligned",
    "aligned_to",
    "dense_alike",
    "dense_like",
    "layout",
    "mask_operand",
    "substep_mix_outputs",
]

MASK_FULL = 0
"""Mask mode: the mask has ``x``'s shape and layout."""
MASK_BROADCAST_CONTIGUOUS = 1
"""Mask mode: a ``(B, 1, *spatial)`` mask against contiguous ``(B, C, *spatial)`` memory."""
MASK_BROADCAST_CHANNELS_LAST = 2
"""Mask mode: a ``(B, 1, *spatial)`` mask against channels-last ``(B, *spatial, C)`` memory."""


def layout(x: Tensor) -> torch.memory_format:
    """``x``'s dense layout: channels-last for a 4-D channels-last tensor, else contiguous."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_like(t: Tensor, like: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` with ``like``'s strides (a copy only when they differ)."""
    if t.stride() == like.stride() and t.is_contiguous(memory_format=fmt):
        return t
    return t.contiguous(memory_format=fmt)


def dense_alike(x: Tensor, *others: Tensor | None, cast: bool = False) -> bool:
    """Whether ``x`` and ``others`` (``None``: absent) are contiguous, and with ``cast`` of
    ``x``'s dtype: the common case, where :func:`aligned` returns them as they are. Cheap (no
    generator), for callers in inner loops that skip :func:`aligned` then."""
    if not x.is_contiguous():
        return False
    dtype = x.dtype
    for t in others:
        if t is not None and (not t.is_contiguous() or (cast and t.dtype is not dtype)):
            return False  # dtypes are singletons
    return True


def aligned(
    x: Tensor, *others: Tensor, cast: bool = False
) -> tuple[torch.memory_format, Tensor, tuple[Tensor, ...]]:
    """``x`` in its dense layout and ``others`` with ``x``'s strides (and dtype, with ``cast``),
    so a kernel can walk all of them with one linear index; copies only what is not laid out.

    Returns the layout, ``x`` and the others. An optional operand joins with :func:`aligned_to`.
    """
    if dense_alike(x, *others, cast=cast):
        return torch.contiguous_format, x, others
    fmt = layout(x)
    x = x.contiguous(memory_format=fmt)
    return fmt, x, tuple(aligned_to(t, x, fmt, cast=cast) for t in others)


def aligned_to(t: Tensor, x: Tensor, fmt: torch.memory_format, *, cast: bool = False) -> Tensor:
    """``t`` with the strides of ``x`` (already dense in layout ``fmt``), and its dtype with
    ``cast``."""
    if fmt == torch.contiguous_format and t.is_contiguous() and (not cast or t.dtype == x.dtype):
        return t  # the common case, checked cheaply (inner loops)
    return dense_like(t.to(x.dtype) if cast else t, x, fmt)


def mask_operand(mask: Tensor, x: Tensor, fmt: torch.memory_format) -> tuple[Tensor, int]:
    """An inpainting mask (``x``'s shape or ``(B, 1, ...)``) laid out for ``x`` (of layout
    ``fmt``), and its mask mode (``MASK_*``).

    A contiguous ``x`` whose plane is one element (``(B, C)``, ``(B, C, 1, 1)``) holds each
    sample's ``C`` values together, as channels-last memory does: it gets that mode, whose walk
    takes a mask value per ``C`` consecutive values (mode 1's would take rows of one element)."""
    if mask.numel() == x.numel():  # x's shape (cheaper to ask than comparing shapes)
        full = mask if fmt == torch.contiguous_format and mask.is_contiguous() else None
        return (dense_like(mask, x, fmt) if full is None else full), MASK_FULL
    mask = mask.contiguous()  # (B, 1, ...): as it is in the common case
    if fmt == torch.channels_last or x.stride(1) == 1:
        return mask, MASK_BROADCAST_CHANNELS_LAST
    return mask, MASK_BROADCAST_CONTIGUOUS


def substep_mix_outputs(
    x: Tensor, y: Tensor, update_x: bool, in_place: bool, empty: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The outputs of EDICT's fused sub-step and mixing pair for aligned ``x``, ``y``: two from
    ``empty``, or with ``in_place`` the input the sub-step does not move (its values are read
    before they are written, element by element) and one from ``empty``."""
    if not in_place:
        return empty(x), empty(x)
    return (empty(x), y) if update_x else (x, empty(x))
