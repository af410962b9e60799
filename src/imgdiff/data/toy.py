"""A procedural toy data set: coloured shapes on gradient backgrounds, any size, seeded, no download."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from imgdiff._checks import check_int, check_seed

__all__ = ["SHAPE_NAMES", "toy_shapes"]

SHAPE_NAMES = ("square", "disc")
"""Class names of :func:`toy_shapes`' labels, by label index."""


def toy_shapes(n: int, size: int = 32, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` RGB images in ``[-1, 1]``: a flat-coloured square or disc on a two-colour gradient.

    Returns ``images`` ``(n, 3, size, size)`` float32 and ``labels`` ``(n,)`` int64 (index into
    :data:`SHAPE_NAMES`; squares and discs alternate). The same ``seed`` gives the same images on
    every machine (all randomness comes from one CPU generator); ``seed`` is an int in
    ``[-2**63, 2**64 - 1]``, the range ``torch.Generator.manual_seed`` takes.
    """
    n = check_int("n", n, min=1)
    size = check_int("size", size, min=4)
    g = torch.Generator().manual_seed(check_seed("seed", seed))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        c0, c1, fg = (torch.rand(3, 1, 1, generator=g) for _ in range(3))
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        ramp = (math.cos(angle) * xx + math.sin(angle) * yy).clamp(0, 1)
        background = c0 * (1 - ramp) + c1 * ramp
        cx, cy = (0.3 + 0.4 * torch.rand(2, generator=g)).tolist()
        r = 0.15 + 0.15 * float(torch.rand(1, generator=g))
        label = i % 2
        if label == 1:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        else:
            inside = ((xx - cx).abs() < r) & ((yy - cy).abs() < r)
        images.append(torch.where(inside, fg.expand(3, size, size), background) * 2 - 1)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
