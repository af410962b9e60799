"""Shared helpers of :mod:`imgdiff.degradations` (internal): argument checks and scalar draws.

Every random number of the mask generators and task builders comes from one ``torch.Generator``
(or torch's global generator when ``None``) through the scalar draws below, so a seeded
generator reproduces a mask exactly and no numpy or Python global RNG is involved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from imgdiff._checks import check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError

__all__ = [
    "MIN_SIZE",
    "check_images",
    "check_size",
    "check_unit_interval",
    "draw_int",
    "draw_normal",
    "draw_uniform",
]

MIN_SIZE = 8
"""Smallest image height and width (pixels) that the masks and tasks accept."""


def check_size(size: object, name: str = "size") -> tuple[int, int]:
    """``size`` as ``(H, W)``: an int ``n`` means ``(n, n)``; both sides at least :data:`MIN_SIZE`."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        pair = tuple(size)
    elif isinstance(size, bool) or not isinstance(size, int):
        raise InputTypeError(
            f"{name}: expected an int or a pair (H, W) of ints, got {describe(size)}"
        )
    else:
        pair = (size, size)
    for side in pair:
        if isinstance(side, bool) or not isinstance(side, int):
            raise InputTypeError(
                f"{name}: expected an int or a pair (H, W) of ints, got {describe(side)} in {size!r}"
            )
        if side < MIN_SIZE:
            raise InputValueError(
                f"{name}: expected sides of at least {MIN_SIZE} pixels, got {size!r}"
            )
    return pair[0], pair[1]


def check_images(name: str, images: object) -> Tensor:
    """Check a batch of RGB images: floating ``(B, 3, H, W)``, finite, in ``[-1, 1]``, ``H, W >= 8``.

    Reads the values, so it synchronises with the device (data preparation, not a sampling loop).
    """
    x = check_tensor(name, images, ndim=4, floating=True)
    B, C, H, W = x.shape
    if B < 1:
        raise InputValueError(f"{name}: expected at least one image, got shape {tuple(x.shape)}")
    if C != 3:
        raise InputValueError(
            f"{name}: expected 3 (RGB) channels in (B, 3, H, W), got {C} channels "
            f"(shape {tuple(x.shape)})"
        )
    if H < MIN_SIZE or W < MIN_SIZE:
        raise InputValueError(
            f"{name}: expected height and width of at least {MIN_SIZE} pixels, "
            f"got shape {tuple(x.shape)}"
        )
    values = x.detach()  # read without autograd (a tensor that requires grad warns on float())
    if not bool(torch.isfinite(values).all()):
        raise InputValueError(f"{name}: expected finite values in [-1, 1], got NaN or inf")
    lo, hi = float(values.min()), float(values.max())
    if lo < -1.0 or hi > 1.0:
        raise InputValueError(
            f"{name}: expected values in [-1, 1], got values from {lo:.4g} to {hi:.4g}"
        )
    return x


def check_unit_interval(
    name: str, value: object, *, low: float = 0.0, high: float = 1.0, open_low: bool = False
) -> float:
    """Check that ``value`` is a real number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name}: expected a float, got {describe(value)}")
    v = float(value)
    if not math.isfinite(v) or v > high or v < low or (open_low and v == low):
        bracket = "(" if open_low else "["
        raise InputValueError(f"{name}: expected a float in {bracket}{low}, {high}], got {v}")
    return v


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def draw_int(generator: torch.Generator | None, low: int, high: int) -> int:
    """A uniform integer in ``[low, high]`` (both ends included)."""
    if high <= low:
        return low
    out = torch.randint(low, high + 1, (1,), generator=generator, device=_device(generator))
    return int(out)


def draw_uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """A uniform float in ``[low, high)``, drawn in float64."""
    u = torch.rand((1,), generator=generator, device=_device(generator), dtype=torch.float64)
    return low + (high - low) * float(u)


def draw_normal(generator: torch.Generator | None, mean: float, std: float) -> float:
    """A normal float ``N(mean, std²)``, drawn in float64."""
    z = torch.randn((1,), generator=generator, device=_device(generator), dtype=torch.float64)
    return mean + std * float(z)
