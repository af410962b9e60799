"""Memory layouts the fused kernels walk linearly (shared by the Triton and CPU kernels)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_like", "layout"]


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
