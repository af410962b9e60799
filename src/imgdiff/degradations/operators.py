"""Deterministic degradation operators on ``[-1, 1]`` RGB images: BT.601 grayscale and JPEG.

These are the sources of Palette's colorization and JPEG-restoration tasks
(:mod:`imgdiff.degradations.tasks` draws their random parameters).
"""

from __future__ import annotations

import io
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from imgdiff._checks import check_same_shape, check_tensor, describe, is_integer_dtype
from imgdiff.degradations._common import check_images
from imgdiff.errors import InputTypeError, InputValueError

__all__ = [
    "BT601_LUMA",
    "JPEG_QUALITY_RANGE",
    "check_quality",
    "check_quality_range",
    "jpeg_compress",
    "jpeg_round_trip",
    "luma",
    "to_grayscale",
    "with_luma",
]

BT601_LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B (what ``PIL.Image.convert("L")`` uses)."""

JPEG_QUALITY_RANGE = (1, 95)
"""Accepted JPEG quality factors; pillow advises against qualities above 95."""


def to_grayscale(images: Tensor) -> Tensor:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B``, replicated to 3 channels.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]`` to ``(B, 3, H, W)`` of the same dtype and device,
    with three equal channels. The weights sum to one, so computing the luma on ``[-1, 1]``
    values equals computing it on ``[0, 1]`` and mapping back. Palette's colorization source is a
    grayscale image loaded as RGB, i.e. replicated the same way.
    """
    x = check_images("images", images)
    return luma(x)


def luma(x: Tensor) -> Tensor:
    """:func:`to_grayscale` of checked images (internal)."""
    weights = torch.tensor(BT601_LUMA, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def with_luma(images: Tensor, gray: Tensor) -> Tensor:
    """``images`` with their BT.601 luma replaced by ``gray``'s: ``x + (gray - luma(x))`` per channel.

    The chroma ``x - luma(x)`` is kept and the luminance becomes the measured one, so
    ``to_grayscale(with_luma(x, g)) == g`` (the weights sum to one). For colorization, where the
    grayscale source is the measurement, this makes a sample consistent with it, as colorization
    methods that predict only chroma do (Zhang et al. 2016 predict ab given L). ``images`` and
    ``gray`` ``(B, 3, H, W)`` (``gray`` with equal channels, e.g. a colorization source);
    values are not range-checked and the result is not clamped.
    """
    x = check_tensor("images", images, ndim=4, floating=True)
    g = check_tensor("gray", gray, ndim=4, floating=True)
    if x.shape[1] != 3:
        raise InputValueError(f"images: expected (B, 3, H, W) RGB images, got {tuple(x.shape)}")
    check_same_shape("gray", g, "images", x)  # a grayscale image replicated to 3 channels
    return x + (g.to(x.dtype) - luma(x))


def check_quality(name: str, value: object) -> int:
    """A JPEG quality factor: an int in :data:`JPEG_QUALITY_RANGE`."""
    low, high = JPEG_QUALITY_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(
            f"{name}: expected an int JPEG quality in [{low}, {high}], got {describe(value)}"
        )
    q = int(value)
    if not low <= q <= high:
        raise InputValueError(f"{name}: expected a JPEG quality in [{low}, {high}], got {q}")
    return q


def check_quality_range(value: object) -> tuple[int, int]:
    """``quality``: one int or a pair ``(low, high)`` with ``1 <= low <= high <= 95``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise InputValueError(
                f"quality: expected one int or a pair (low, high) of ints, got {len(value)} values"
            )
        low, high = check_quality("quality", value[0]), check_quality("quality", value[1])
        if low > high:
            raise InputValueError(f"quality: expected low <= high, got ({low}, {high})")
        return low, high
    q = check_quality("quality", value)
    return q, q


def jpeg_compress(images: Tensor, quality: int | list[int] | Tensor) -> Tensor:
    """Encode every image as a JPEG file with pillow at ``quality`` and decode it again.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``. ``quality`` is one int in ``[1, 95]`` for the
    whole batch, or one per image as a **list** of ``B`` ints or a ``(B,)`` integer tensor. A
    tuple is refused: in :func:`~imgdiff.degradations.jpeg_pair` and
    :func:`~imgdiff.degradations.make_pairs` ``(low, high)`` is a range to draw from, so here it
    would be ambiguous. Images are quantised to uint8 first (``round((x + 1) · 127.5)``);
    pillow's default 4:2:0 chroma subsampling applies. Returns ``(B, 3, H, W)`` in ``[-1, 1]``
    with the dtype and device of ``images``, values on the uint8 grid ``k / 127.5 - 1``.
    """
    x = check_images("images", images)
    B = x.shape[0]
    value: object = quality  # checked at run time: a tuple is refused though no type allows it
    if isinstance(value, tuple):
        raise InputTypeError(
            f"quality: expected an int, or a list with one quality per image, got the tuple "
            f"{value!r}; a tuple (low, high) is a range to draw from in jpeg_pair and "
            f"make_pairs, so for per-image qualities pass a list, e.g. {list(value)!r}"
        )
    if isinstance(value, Tensor):
        if value.ndim != 1 or not is_integer_dtype(value.dtype):
            raise InputTypeError(
                f"quality: expected an int, a list or a (B,) integer tensor, got {describe(value)}"
            )
        value = [int(q) for q in value.tolist()]
    if isinstance(value, list):
        qualities = [check_quality(f"quality[{i}]", q) for i, q in enumerate(value)]
        if len(qualities) != B:
            raise InputValueError(
                f"quality: expected one quality per image ({B}), got {len(qualities)}"
            )
    else:
        qualities = [check_quality("quality", value)] * B
    return jpeg_round_trip(x, qualities)


def jpeg_round_trip(images: Tensor, qualities: Sequence[int]) -> Tensor:
    """:func:`jpeg_compress` of checked ``(N, 3, H, W)`` images, one quality per image (internal)."""
    from PIL import Image

    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    arrays = pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    decoded = np.empty_like(arrays)
    for i, (array, quality) in enumerate(zip(arrays, qualities, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as image:
            decoded[i] = np.asarray(image.convert("RGB"), dtype=np.uint8)
    out = torch.from_numpy(decoded).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return out.to(device=images.device, dtype=images.dtype)
