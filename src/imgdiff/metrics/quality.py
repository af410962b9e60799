"""Full-reference image quality: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from torch import Tensor

from imgdiff._checks import check_float, check_int, check_same_shape, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["psnr", "ssim"]


def _pair(a: object, b: object) -> tuple[Tensor, Tensor]:
    x = check_tensor("preds", a, ndim=4, floating=True, nonempty=True)
    y = check_tensor("target", b, ndim=4, floating=True)
    check_same_shape("target", y, "preds", x)
    return x, y


def _value_range(value_range: object) -> tuple[float, float]:
    """``(low, high)`` with ``low < high``: the span of valid pixel values."""
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
        raise InputTypeError(
            f"value_range: expected a pair (low, high) such as (-1, 1) or (0, 1), "
            f"got {describe(value_range)}"
        )
    low = check_float("value_range[0]", value_range[0])
    high = check_float("value_range[1]", value_range[1])
    if not low < high:
        raise InputValueError(f"value_range: expected low < high, got ({low}, {high})")
    return low, high


def psnr(
    preds: Tensor, target: Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(L^2 / MSE)`` per image, ``(B,)`` in dB.

    Images ``(B, C, H, W)`` with values in ``value_range`` (imgdiff's ``[-1, 1]`` by default);
    ``L = high - low``. Identical images give ``inf``.
    """
    x, y = _pair(preds, target)
    low, high = _value_range(value_range)
    mse = (x.double() - y.double()).square().reshape(x.shape[0], -1).mean(dim=1)
    return 10.0 * torch.log10((high - low) ** 2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    preds: Tensor,
    target: Tensor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity per image, ``(B,)`` (Wang et al. 2004, eq. 13).

    Images ``(B, C, H, W)`` with values in ``value_range`` (imgdiff's ``[-1, 1]`` by default) are
    first mapped to ``[0, 1]``, so the result is the standard SSIM of the image however it is
    stored: SSIM's luminance term is not shift-invariant, and computing it on ``[-1, 1]`` values
    (mid-grey near 0) gives other, lower numbers. Gaussian window (11x11, sigma 1.5) per
    channel, valid region only, ``C1 = k1^2``, ``C2 = k2^2`` (``L = 1``); averaged over channels
    and positions. 1 for identical images. Images smaller than the window use a window of their
    size.
    """
    x, y = _pair(preds, target)
    low, high = _value_range(value_range)
    window_size = check_int("window_size", window_size, min=1)
    sigma = check_float("sigma", sigma, min=0.0, min_open=True)
    k1 = check_float("k1", k1, min=0.0, min_open=True)
    k2 = check_float("k2", k2, min=0.0, min_open=True)
    size = min(window_size, x.shape[2], x.shape[3])
    C = x.shape[1]
    w = _gaussian_window(size, sigma, x.device).expand(C, 1, size, size)
    x, y = (x.double() - low) / (high - low), (y.double() - low) / (high - low)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, w, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.reshape(s.shape[0], -1).mean(dim=1)
