"""Lean torch arithmetic for sampler updates (internal).

Coefficients are Python floats inside sampling loops (one set per step, precomputed) and
``(B, 1, ..., 1)`` tensors for per-sample timesteps; these helpers take either and use the
fewest torch calls for each case. Each returns a fresh tensor or updates only its own output.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Scalar", "add_scaled_", "lincomb"]

Scalar = float | Tensor
"""A per-step coefficient: a Python float, or a tensor broadcastable to the sample."""


def lincomb(x: Tensor, a: Scalar, y: Tensor, b: Scalar) -> Tensor:
    """``a * x + b * y`` as a new tensor."""
    if isinstance(b, Tensor):
        return torch.addcmul(x * a, y, b)
    return torch.mul(x, a).add_(y, alpha=b)


def add_scaled_(out: Tensor, y: Tensor, b: Scalar) -> Tensor:
    """``out += b * y`` in place; ``out`` must be a tensor the caller owns."""
    if isinstance(b, Tensor):
        return out.addcmul_(y, b)
    return out.add_(y, alpha=b)
