"""Images in and out: ``[-1, 1]`` NCHW tensors to uint8 arrays, PIL images and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from imgdiff._checks import check_finite, check_int, check_tensor
from imgdiff.errors import InputValueError

__all__ = ["image_grid", "save_image_grid", "to_uint8"]


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in ``[-1, 1]`` (C = 1 or 3) to a uint8 array ``(B, H, W, C)``.

    Finite values outside ``[-1, 1]`` are clamped; NaN or infinite values (e.g. a diverged
    sample) raise :class:`~imgdiff.errors.InputValueError` instead of saving as black or white.
    """
    check_tensor("images", images, ndim=4, floating=True)
    if images.shape[1] not in (1, 3):
        raise InputValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}")
    x = images.detach().float().cpu()
    check_finite("images", x)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def image_grid(images: Tensor, *, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile ``(B, C, H, W)`` images in ``[-1, 1]`` into one uint8 array ``(H', W', C)``, ``nrow`` per row.

    ``B >= 1``; values as in :func:`to_uint8` (non-finite ones are refused).
    """
    nrow = check_int("nrow", nrow, min=1)
    padding = check_int("padding", padding, min=0)
    check_tensor("images", images, ndim=4, floating=True, nonempty=True)
    arr = to_uint8(images)
    B, H, W, C = arr.shape
    cols = min(nrow, B)
    rows = (B + cols - 1) // cols
    grid = np.full(
        (rows * (H + padding) + padding, cols * (W + padding) + padding, C), 255, np.uint8
    )
    for i in range(B):
        r, c = divmod(i, cols)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[top : top + H, left : left + W] = arr[i]
    return grid


def save_image_grid(images: Tensor, path: str | Path, *, nrow: int = 8, padding: int = 2) -> Path:
    """Write ``(B, C, H, W)`` images in ``[-1, 1]`` (``B >= 1``, finite) as one PNG grid; returns the path."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow, padding=padding)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out)
    return out
