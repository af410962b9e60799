"""Inpainting and uncropping masks (Palette, Saharia et al. 2022), and the ``make_mask`` entry.

Every mask is a float32 tensor ``(1, H, W)`` with values exactly 0 or 1, **1 = hole** (the
pixels to generate), as in Palette's ``bbox2mask``. Random masks draw every number from the
``generator`` (torch's global generator when ``None``), so a seeded generator reproduces them.
Sizes are ``n`` or ``(H, W)`` with sides of at least 8 pixels; lengths scale with the image
(Palette's pixel values are the defaults at 256 x 256). Where imgdiff departs from Palette's
code (``data/util/mask.py`` of Janspiry/Palette-Image-to-Image-Diffusion-Models) the docstring
says so; ``docs/degradations.md`` lists the differences.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_float, check_generator
from imgdiff.degradations._common import (
    check_size,
    check_unit_interval,
    draw_int,
    draw_uniform,
)
from imgdiff.degradations.strokes import brush_stroke_mask, irregular_mask
from imgdiff.errors import InputValueError

__all__ = [
    "MASK_KINDS",
    "MaskKind",
    "Side",
    "bbox_mask",
    "brush_stroke_mask",
    "center_mask",
    "four_direction_mask",
    "hybrid_mask",
    "irregular_mask",
    "make_mask",
    "one_direction_mask",
    "uncropping_mask",
]

MaskKind = Literal[
    "bbox",
    "center",
    "brush",
    "irregular",
    "hybrid",
    "one_direction",
    "four_direction",
    "uncrop",
]
"""Mask generators of :func:`make_mask`; ``"uncrop"`` is one or four directions, 50/50."""

MASK_KINDS: tuple[MaskKind, ...] = get_args(MaskKind)

Side = Literal["left", "top", "right", "bottom"]
_SIDES: tuple[Side, ...] = get_args(Side)


def _box(H: int, W: int, top: int, left: int, height: int, width: int) -> Tensor:
    mask = torch.zeros(1, H, W, dtype=torch.float32)
    mask[:, top : top + height, left : left + width] = 1.0
    return mask


def _to(mask: Tensor, device: torch.device | str | None) -> Tensor:
    return mask if device is None else mask.to(device)


def bbox_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    max_box: float = 0.5,
    max_delta: float = 40 / 256,
    margin: float = 20 / 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """A random box hole (Palette's ``random_bbox``): float32 ``(1, H, W)``, 1 = hole.

    Per axis (fractions of that side; Palette at 256: box 128, delta 40, margin 20): the full box
    has side ``round(max_box · H)``; its top-left corner is uniform such that the box keeps
    ``round(margin · H)`` pixels from both borders (both ends included); then it shrinks by
    ``d ~ U{0, ..., round(max_delta · H) // 2}`` pixels on each side, **keeping its centre**, so
    its side is uniform-ish in ``[box - delta, box]``. Palette's code instead moves the top-left
    corner by ``d`` and shrinks the side by ``d`` (its comment says the centre stays, it does not;
    the bottom-right corner does), and its ``randint`` never reaches the last corner position.
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    box_frac = check_unit_interval("max_box", max_box, open_low=True)
    delta_frac = check_unit_interval("max_delta", max_delta)
    margin_frac = check_float("margin", margin, min=0.0, max=0.5, max_open=True)
    corner, extent = [], []
    for axis, n in (("height", H), ("width", W)):
        box = max(round(box_frac * n), 1)
        shrink = round(delta_frac * n) // 2
        gap = round(margin_frac * n)
        if box + 2 * gap > n:
            raise InputValueError(
                f"margin: a box of {box} px with margins of {gap} px does not fit the image {axis} "
                f"of {n} px (max_box={box_frac}, margin={margin_frac})"
            )
        if 2 * shrink >= box:
            raise InputValueError(
                f"max_delta: expected a shrink smaller than the box ({box} px along the {axis}), "
                f"got max_delta={delta_frac} ({2 * shrink} px)"
            )
        start = draw_int(gen, gap, n - gap - box)
        d = draw_int(gen, 0, shrink)
        corner.append(start + d)
        extent.append(box - 2 * d)
    return _to(_box(H, W, corner[0], corner[1], extent[0], extent[1]), device)


def center_mask(size: int | tuple[int, int], *, device: torch.device | str | None = None) -> Tensor:
    """The centre box ``(H//4, W//4, H//2, W//2)`` (top, left, height, width): ``(1, H, W)``.

    The hole fraction is exactly 0.25 when ``H`` and ``W`` are even (Palette's ``center`` mask).
    """
    H, W = check_size(size)
    return _to(_box(H, W, H // 4, W // 4, H // 2, W // 2), device)


def one_direction_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    side: Side | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uncropping in one direction: the hole is the ``side`` half of the image, ``(1, H, W)``.

    ``side`` is ``"left"``, ``"top"``, ``"right"`` or ``"bottom"``, or ``None`` for a uniform
    random side. The hole has ``W // 2`` columns (left/right) or ``H // 2`` rows (top/bottom), so
    its fraction is exactly 0.5 when that side length is even (Palette's ``onedirection``).
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    if side is None:
        side = _SIDES[draw_int(gen, 0, 3)]
    side = check_choice("side", side, _SIDES)
    if side == "left":
        mask = _box(H, W, 0, 0, H, W // 2)
    elif side == "right":
        mask = _box(H, W, 0, W - W // 2, H, W // 2)
    elif side == "top":
        mask = _box(H, W, 0, 0, H // 2, W)
    else:
        mask = _box(H, W, H - H // 2, 0, H // 2, W)
    return _to(mask, device)


def four_direction_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    max_side: float = 0.85,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uncropping in all four directions: the hole is a border frame, ``(1, H, W)``.

    The known region is a centred rectangle of about half the image's area, so the model extends
    the image by the same amount on every side. Its height fraction ``f`` is log-uniform in
    ``[1 / (2 max_side), max_side]`` and its width fraction is ``1 / (2 f)`` (same range, so
    every border is at least ``(1 - max_side) / 2`` of its side thick); the sides are rounded to
    pixels, keeping at least one hole pixel on every side. The known width is rounded to make the
    area closest to ``H W / 2``, so the hole fraction is within ``h / (2 H W) < 1 / (2 W)`` of 0.5
    unless that width has to be cut to ``W - 2`` to keep the border. At the default ``max_side``
    that never happens for ``W >= 13`` (any ``H``), e.g. for every image with sides of at least 16
    (0.0017 at 256²); on narrower images the hole fraction can be up to 1/11 from 0.5 (0.591 at
    ``H, W = 11, 8``). A larger ``max_side`` needs wider images for the ``1 / (2 W)`` bound. Top
    and left margins are ``(H - h) // 2`` and ``(W - w) // 2``.

    Palette's ``fourdirection`` code instead makes the hole an interior box of area ``H·W/2`` at
    a random position, which is not uncropping; imgdiff implements the frame the task describes.
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    top_frac = check_float("max_side", max_side, min=math.sqrt(0.5), max=1.0, max_open=True)
    low = 1.0 / (2.0 * top_frac)
    f = math.exp(draw_uniform(gen, math.log(low), math.log(top_frac)))
    known_h = min(max(round(f * H), 1), H - 2)
    known_w = min(max(round(H * W / 2 / known_h), 1), W - 2)
    return _to(1.0 - _box(H, W, (H - known_h) // 2, (W - known_w) // 2, known_h, known_w), device)


def uncropping_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """One direction or four directions, 50/50 (Palette's uncropping ``hybrid`` mode): ``(1, H, W)``."""
    H, W = check_size(size)
    gen = check_generator(generator)
    if draw_int(gen, 0, 1) == 0:
        return one_direction_mask((H, W), gen, device=device)
    return four_direction_mask((H, W), gen, device=device)


def hybrid_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Union of a :func:`bbox_mask` and a :func:`brush_stroke_mask` (Palette's training default).

    Float32 ``(1, H, W)``, 1 = hole; the box is drawn first, then the strokes.
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    box = bbox_mask((H, W), gen)
    strokes = brush_stroke_mask((H, W), gen)
    return _to(torch.maximum(box, strokes), device)


def make_mask(
    kind: MaskKind,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """A mask of the given ``kind`` with default parameters: float32 ``(1, H, W)``, 1 = hole.

    ``kind`` is one of :data:`MASK_KINDS`: ``"bbox"``, ``"center"``, ``"brush"``,
    ``"irregular"``, ``"hybrid"`` (inpainting), ``"one_direction"``, ``"four_direction"``,
    ``"uncrop"`` (uncropping; ``"uncrop"`` picks one of the two 50/50). ``size`` is ``n`` or
    ``(H, W)``, sides at least 8; ``generator`` is ``None`` or one ``torch.Generator``. Call the
    kind's own function to change its parameters.
    """
    kind = check_choice("kind", kind, MASK_KINDS)
    H, W = check_size(size)
    gen = check_generator(generator)
    if kind == "bbox":
        mask = bbox_mask((H, W), gen)
    elif kind == "center":
        mask = center_mask((H, W))
    elif kind == "brush":
        mask = brush_stroke_mask((H, W), gen)
    elif kind == "irregular":
        mask = irregular_mask((H, W), gen)
    elif kind == "hybrid":
        mask = hybrid_mask((H, W), gen)
    elif kind == "one_direction":
        mask = one_direction_mask((H, W), gen)
    elif kind == "four_direction":
        mask = four_direction_mask((H, W), gen)
    else:
        mask = uncropping_mask((H, W), gen)
    return _to(mask, device)
