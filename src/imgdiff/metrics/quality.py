"""Full-reference image quality: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from torch import Tensor

from imgdiff._checks import check_float, check_int, check_same_shape, check_tensor

__all__ = ["psnr", "ssim"]


def _pair(a: object, b: object) -> tuple[Tensor, Tensor]:
    x = check_tensor("preds", a, ndim=4, floating=True)
    y = check_tensor("target", b, ndim=4, floating=True)
    check_same_shape("target", y, "preds", x)
    return x, y


def psnr(preds: Tensor, target: Tensor, *, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` per image, ``(B,)`` in dB.

    Images ``(B, C, H, W)``; ``data_range`` is the span of valid values (2 for images in
    [-1, 1]). Identical images give ``inf``.
    """
    x, y = _pair(preds, target)
    data_range = check_float("data_range", data_range, min=0.0, min_open=True)
    mse = (x.double() - y.double()).square().reshape(x.shape[0], -1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    preds: Tensor,
    target: Tensor,
    *,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity per image, ``(B,)`` (Wang et al. 2004, eq. 13).

    Gaussian window (11x11, sigma 1.5) per channel, valid region only, constants
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``L = data_range``; averaged over channels and
    positions. 1 for identical images. Images smaller than the window use a window of their size.
    """
    x, y = _pair(preds, target)
    data_range = check_float("data_range", data_range, min=0.0, min_open=True)
    window_size = check_int("window_size", window_size, min=1)
    sigma = check_float("sigma", sigma, min=0.0, min_open=True)
    k1 = check_float("k1", k1, min=0.0, min_open=True)
    k2 = check_float("k2", k2, min=0.0, min_open=True)
    size = min(window_size, x.shape[2], x.shape[3])
    C = x.shape[1]
    w = _gaussian_window(size, sigma, x.device).expand(C, 1, size, size)
    x, y = x.double(), y.double()

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, w, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.reshape(s.shape[0], -1).mean(dim=1)
