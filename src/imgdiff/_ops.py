"""Lean, well-conditioned torch arithmetic for sampler updates (internal).

Coefficients are Python floats inside sampling loops (one set per step, precomputed) and
``(B, 1, ..., 1)`` tensors for per-sample timesteps; these helpers take either and use the
fewest torch calls for each case. Each returns a new tensor (inside a sampling loop, a recycled
buffer: :mod:`imgdiff.buffers`) or updates only its own output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imgdiff.buffers import out_like

__all__ = ["FUSE_LIMIT", "Scalar", "add_scaled_", "fusable", "lincomb", "per_sample"]

Scalar = float | Tensor
"""A per-step coefficient: a Python float, or a tensor broadcastable to the sample."""

FUSE_LIMIT = 2.0
"""Largest coefficient magnitude for which a step is applied as one combination of ``(x, out)``.

Above it the two products are large and cancel (epsilon prediction at tiny ``alpha_bar``), so
samplers go through ``x0_hat`` formed as ``(x - sigma eps) / alpha`` instead.
"""


def fusable(a: Scalar, b: Scalar) -> bool:
    """Whether ``a x + b y`` with these (float) coefficients is well conditioned enough to fuse."""
    return (
        isinstance(a, float)
        and isinstance(b, float)
        and abs(a) <= FUSE_LIMIT
        and abs(b) <= FUSE_LIMIT
    )


def lincomb(x: Tensor, a: Scalar, y: Tensor, b: Scalar) -> Tensor:
    """``a * x + b * y`` as a new tensor, formed as ``a (x + (b/a) y)`` with ``|a| >= |b|``.

    Factoring out the larger coefficient first forms the combination at the scale of the smaller
    one, so ``(x - sigma eps) / alpha`` keeps float32 accuracy when ``1/alpha`` is huge. Two
    memory passes for float coefficients; per-sample tensors pick the factor per sample.
    """
    if isinstance(a, float) and isinstance(b, float):
        out = out_like(x, y)  # a recycled buffer inside a sampling loop (CPU), else None
        if abs(a) >= abs(b):
            if b == 0.0:
                return torch.mul(x, a, out=out)
            return torch.add(x, y, alpha=b / a, out=out).mul_(a)
        if a == 0.0:
            return torch.mul(y, b, out=out)
        return torch.add(y, x, alpha=a / b, out=out).mul_(b)
    ta = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    tb = torch.as_tensor(b, dtype=x.dtype, device=x.device)
    a_is_big = ta.abs() >= tb.abs()
    big = torch.where(a_is_big, ta, tb)
    safe = torch.where(big == 0, torch.ones_like(big), big)
    wx = torch.where(a_is_big, torch.ones_like(ta), ta / safe)
    wy = torch.where(a_is_big, tb / safe, torch.ones_like(tb))
    return torch.addcmul(x * wx, y, wy).mul_(big)


def add_scaled_(out: Tensor, y: Tensor, b: Scalar) -> Tensor:
    """``out += b * y`` in place; ``out`` must be a tensor the caller owns."""
    if isinstance(b, Tensor):
        return out.addcmul_(y, b)
    return out.add_(y, alpha=b)


def per_sample(values: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-sample values ``(B,)`` as ``(B, 1, ..., 1)`` on ``like``'s device, in ``dtype`` (``like``'s).

    The one place imgdiff broadcasts a per-sample scalar against a sample: never ``(B,)``
    against ``(B, C, H, W)`` directly, which broadcasts along W when B == W.
    """
    out = values.to(device=like.device, dtype=dtype or like.dtype)
    return out.reshape((-1,) + (1,) * (like.ndim - 1))
