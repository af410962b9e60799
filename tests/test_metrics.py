"""PSNR and SSIM: identities and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import imgdiff
from imgdiff.metrics import psnr, ssim


def test_psnr_closed_form() -> None:
    """A constant error e gives 10 log10(range^2 / e^2); identical images give inf."""
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(
        psnr(x + 0.1, x), torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64)
    )
    assert bool(torch.isinf(psnr(x, x)).all())


def test_ssim_identities() -> None:
    """SSIM(x, x) = 1; SSIM is symmetric, below 1 for noisy copies, lower for more noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    noisier = x + 0.5 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(ssim(noisy, x), ssim(x, noisy))
    assert bool((ssim(noisier, x) < ssim(noisy, x)).all())
    assert bool((ssim(noisy, x) < 1).all())


def test_ssim_of_a_brightness_shift_is_the_luminance_term() -> None:
    """For y = x + c the structure and contrast terms are 1: SSIM is the mean luminance term,
    computed on the [0, 1] image (C1 = 0.01^2) whatever range the values are stored in."""
    x01 = torch.rand(1, 1, 16, 16) * 0.5  # a [0, 1] image
    c1 = 0.01**2
    from imgdiff.metrics.quality import _gaussian_window

    w = _gaussian_window(11, 1.5, x01.device)[None, None]
    mu = torch.nn.functional.conv2d(x01.double(), w)  # the local means shift by exactly 0.15
    lum = ((2 * mu * (mu + 0.15) + c1) / (mu**2 + (mu + 0.15) ** 2 + c1)).mean().reshape(1)
    s01 = ssim(x01 + 0.15, x01, value_range=(0.0, 1.0))
    torch.testing.assert_close(s01, lum, rtol=1e-6, atol=1e-6)  # var via E[x^2] - mu^2
    x = x01 * 2 - 1  # the same image stored in [-1, 1] (the default)
    torch.testing.assert_close(ssim(x + 0.3, x), lum, rtol=1e-6, atol=1e-6)
    x255 = x01 * 255
    torch.testing.assert_close(
        ssim(x255 + 0.15 * 255, x255, value_range=(0, 255)), lum, rtol=1e-6, atol=1e-6
    )


def test_psnr_depends_only_on_the_range_span() -> None:
    """PSNR of the same images stored in [-1, 1] and [0, 1] agree."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(psnr(a * 2 - 1, b * 2 - 1), psnr(a, b, value_range=(0.0, 1.0)))


def test_bad_input() -> None:
    """Mismatched shapes and non-positive ranges are named."""
    with pytest.raises(imgdiff.InputValueError, match=r"^target: expected shape \(1, 3, 8, 8\)"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    z = torch.zeros(1, 3, 8, 8)
    with pytest.raises(imgdiff.InputValueError, match=r"^value_range: expected low < high"):
        ssim(z, z, value_range=(1.0, 1.0))
    with pytest.raises(imgdiff.InputTypeError, match=r"^value_range: expected a pair"):
        psnr(z, z, value_range=2.0)  # type: ignore[arg-type]
    z = torch.zeros(1, 3, 8, 8)
    with pytest.raises(imgdiff.InputValueError, match=r"^window_size: expected an int >= 1, got 0"):
        ssim(z, z, window_size=0)
    with pytest.raises(imgdiff.InputValueError, match=r"^sigma: expected a float > 0"):
        ssim(z, z, sigma=0.0)
    with pytest.raises(imgdiff.InputValueError, match=r"^k2: expected a float > 0"):
        ssim(z, z, k2=-0.1)


def _ssim_oracle(
    x: list,
    y: list,
    low: float,
    high: float,
    *,
    size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Wang et al. (2004) SSIM of one image pair, one ``size x size`` window at a time, in float64.

    ``x``, ``y``: nested lists ``[C][H][W]`` of values in ``[low, high]``, mapped to ``[0, 1]``
    (L = 1). Gaussian weights exp(-d^2 / (2 sigma^2)) about the window centre (size - 1) / 2,
    normalised to sum 1; weighted (population) means, variances and covariance; C1 = k1^2,
    C2 = k2^2; valid windows only; mean over channels and window positions (skimage's
    gaussian_weights=True, use_sample_covariance=False).
    """
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    total = sum(a * b for a in g for b in g)
    w = [[a * b / total for b in g] for a in g]
    c1, c2 = k1**2, k2**2
    values = []
    for xc, yc in zip(x, y, strict=True):
        H, W = len(xc), len(xc[0])
        for i in range(H - size + 1):
            for j in range(W - size + 1):
                px = [
                    (xc[i + u][j + v] - low) / (high - low)
                    for u in range(size)
                    for v in range(size)
                ]
                py = [
                    (yc[i + u][j + v] - low) / (high - low)
                    for u in range(size)
                    for v in range(size)
                ]
                pw = [w[u][v] for u in range(size) for v in range(size)]
                mx = sum(k * a for k, a in zip(pw, px, strict=True))
                my = sum(k * b for k, b in zip(pw, py, strict=True))
                vx = sum(k * (a - mx) ** 2 for k, a in zip(pw, px, strict=True))
                vy = sum(k * (b - my) ** 2 for k, b in zip(pw, py, strict=True))
                cxy = sum(k * (a - mx) * (b - my) for k, a, b in zip(pw, px, py, strict=True))
                values.append(
                    (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                )
    return sum(values) / len(values)


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 255.0)])
def test_ssim_matches_a_per_window_oracle(value_range: tuple[float, float]) -> None:
    """SSIM against an independent per-window loop (Gaussian window, C2 = 0.03^2, covariance)
    for a noisy, contrast-scaled and shifted copy, where luminance, contrast and structure all
    differ from 1; in float64 to 1e-10."""
    low, high = value_range
    g = torch.Generator().manual_seed(7)
    x01 = torch.rand(2, 2, 15, 13, generator=g, dtype=torch.float64)
    y01 = 0.6 * x01 + 0.15 + 0.12 * torch.randn(x01.shape, generator=g, dtype=torch.float64)
    x, y = low + (high - low) * x01, low + (high - low) * y01.clamp(0, 1)
    got = ssim(y, x, value_range=value_range)
    want = torch.tensor(
        [_ssim_oracle(y[b].tolist(), x[b].tolist(), low, high) for b in range(2)],
        dtype=torch.float64,
    )
    assert float(want.min()) > 0.1  # far from the identities
    assert float(want.max()) < 0.9
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # float32 input is computed in float64 too.
    torch.testing.assert_close(
        ssim(y.float(), x.float(), value_range=value_range), want, rtol=1e-5, atol=1e-5
    )
