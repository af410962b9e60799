"""Free-form masks drawn from random strokes: Palette's brush strokes and irregular masks.

Both generators follow ``data/util/mask.py`` of the unofficial Palette code
(Janspiry/Palette-Image-to-Image-Diffusion-Models; its ``brush_stroke_mask`` is the free-form
mask of Yu et al., "Free-Form Image Inpainting with Gated Convolution", 2019). Lengths and widths are
given as fractions of ``sqrt(H W)`` (the side of a square image), so the defaults reproduce
Palette's pixel values at 256 x 256 and the hole fraction does not depend on the image size. A stroke of width ``w`` is the set of pixels whose centre
lies within ``w / 2`` of a segment of its polyline (a line with round joins and caps, what
Palette gets from ``ImageDraw.line`` plus a disc at every vertex, or from thick ``cv2.line``).
The strokes are rasterised here with torch, so the masks do not depend on a drawing library.

Masks are float32 ``(1, H, W)`` with values exactly 0 or 1, 1 = hole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from imgdiff._checks import check_generator, check_int, describe
from imgdiff.degradations._common import (
    check_size,
    check_unit_interval,
    draw_int,
    draw_normal,
    draw_uniform,
)
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["brush_stroke_mask", "irregular_mask"]

Point = tuple[float, float]


def _int_range(name: str, value: object, *, min: int) -> tuple[int, int]:
    """A pair ``(low, high)`` of ints with ``min <= low <= high`` (both ends included)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise InputTypeError(f"{name}: expected a pair (low, high) of ints, got {describe(value)}")
    low = check_int(name, value[0], min=min)
    high = check_int(name, value[1], min=min)
    if low > high:
        raise InputValueError(f"{name}: expected low <= high, got ({low}, {high})")
    return low, high


def _fraction_range(name: str, value: object) -> tuple[float, float]:
    """A pair ``(low, high)`` of fractions in ``(0, 1]`` with ``low <= high``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise InputTypeError(
            f"{name}: expected a pair (low, high) of fractions of the image side, got {describe(value)}"
        )
    low = check_unit_interval(name, value[0], open_low=True)
    high = check_unit_interval(name, value[1], open_low=True)
    if low > high:
        raise InputValueError(f"{name}: expected low <= high, got ({low}, {high})")
    return low, high


def draw_polyline(mask: Tensor, points: Sequence[Point], width: float) -> None:
    """Set to 1 the pixels of ``mask`` ``(H, W)`` within ``width / 2`` of the polyline ``points``.

    Points are ``(x, y)`` in pixel units, pixel ``(i, j)`` has its centre at ``(x, y) = (j, i)``;
    points may lie outside the image. A single point draws a disc. Writes ``mask`` in place.
    """
    H, W = mask.shape
    r = width / 2.0
    segments = list(itertools.pairwise(points)) or [(points[0], points[0])]
    for (ax, ay), (bx, by) in segments:
        x0, x1 = max(math.floor(min(ax, bx) - r), 0), min(math.ceil(max(ax, bx) + r), W - 1)
        y0, y1 = max(math.floor(min(ay, by) - r), 0), min(math.ceil(max(ay, by) + r), H - 1)
        if x0 > x1 or y0 > y1:
            continue  # the segment and its width lie outside the image
        xs = torch.arange(x0, x1 + 1, dtype=torch.float64).reshape(1, -1) - ax
        ys = torch.arange(y0, y1 + 1, dtype=torch.float64).reshape(-1, 1) - ay
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        if length2 > 0.0:
            t = ((xs * dx + ys * dy) / length2).clamp(0.0, 1.0)
            xs, ys = xs - t * dx, ys - t * dy
        inside = xs * xs + ys * ys <= r * r
        window = mask[y0 : y1 + 1, x0 : x1 + 1]
        window.masked_fill_(inside, 1.0)


def brush_stroke_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    strokes: tuple[int, int] = (1, 3),
    vertices: tuple[int, int] = (4, 11),
    width: tuple[float, float] = (12 / 256, 39 / 256),
    mean_angle: float = 2 * math.pi / 5,
    angle_range: float = 2 * math.pi / 15,
    flip: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Free-form brush strokes (Palette's ``brush_stroke_mask``): float32 ``(1, H, W)``, 1 = hole.

    Draws ``strokes`` polylines (ints, both ends included; Palette: 1-3). Each has ``vertices``
    segments (Palette: 4-11) starting at a uniform pixel; a stroke picks
    ``[mean_angle - a, mean_angle + b]`` with ``a, b ~ U(0, angle_range)`` and every segment turns
    by an angle drawn there, mirrored (``2π - angle``) on even segments; segment lengths are
    ``N(r̄, r̄/2)`` clipped to ``[0, 2 r̄]`` with ``r̄ = sqrt(H² + W²) / 8``; vertices are clipped to
    the image. The width is uniform in ``width`` times ``sqrt(H W)`` (Palette: 12-39 px at 256),
    at least one pixel. With ``flip`` the mask is flipped left-right and top-bottom, each with
    probability 1/2 (for real: Palette's code discards the flipped images).

    ``size`` is ``n`` or ``(H, W)``, sides at least 8. Reproducible for a seeded ``generator``.
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    n_strokes = _int_range("strokes", strokes, min=1)
    n_vertices = _int_range("vertices", vertices, min=1)
    w_low, w_high = _fraction_range("width", width)
    mean = check_unit_interval("mean_angle", mean_angle, low=0.0, high=2 * math.pi)
    spread = check_unit_interval("angle_range", angle_range, low=0.0, high=math.pi)
    if not isinstance(flip, bool):
        raise InputTypeError(f"flip: expected a bool, got {describe(flip)}")

    mask = torch.zeros(H, W, dtype=torch.float32)
    radius = math.sqrt(H * H + W * W) / 8.0
    side = math.sqrt(H * W)
    for _ in range(draw_int(gen, *n_strokes)):
        count = draw_int(gen, *n_vertices)
        angle_min = mean - draw_uniform(gen, 0.0, spread)
        angle_max = mean + draw_uniform(gen, 0.0, spread)
        points: list[Point] = [(float(draw_int(gen, 0, W - 1)), float(draw_int(gen, 0, H - 1)))]
        for k in range(count):
            angle = draw_uniform(gen, angle_min, angle_max)
            if k % 2 == 0:
                angle = 2 * math.pi - angle
            step = min(max(draw_normal(gen, radius, radius / 2), 0.0), 2 * radius)
            x, y = points[-1]
            points.append(
                (
                    min(max(x + step * math.cos(angle), 0.0), W - 1.0),
                    min(max(y + step * math.sin(angle), 0.0), H - 1.0),
                )
            )
        stroke_width = max(draw_uniform(gen, w_low, w_high) * side, 1.0)
        draw_polyline(mask, points, stroke_width)
    if flip:
        if draw_int(gen, 0, 1):
            mask = mask.flip(1)
        if draw_int(gen, 0, 1):
            mask = mask.flip(0)
    return mask.unsqueeze(0).to(device if device is not None else "cpu")


def _random_irregular(
    H: int,
    W: int,
    gen: torch.Generator | None,
    starts: tuple[int, int],
    directions: tuple[int, int],
    max_angle: float,
    length: tuple[float, float],
    width: tuple[float, float],
) -> Tensor:
    """One unconstrained irregular mask ``(H, W)`` (Palette's ``random_irregular_mask``)."""
    mask = torch.zeros(H, W, dtype=torch.float32)
    side = math.sqrt(H * W)
    for i in range(draw_int(gen, *starts)):
        x, y = float(draw_int(gen, 0, W - 1)), float(draw_int(gen, 0, H - 1))
        for _ in range(draw_int(gen, *directions)):
            angle = draw_uniform(gen, 0.0, max_angle)
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            step = draw_uniform(gen, *length) * side
            stroke_width = max(draw_uniform(gen, *width) * side, 1.0)
            end = (x + step * math.cos(angle), y + step * math.sin(angle))
            draw_polyline(mask, [(x, y), end], stroke_width)
            x, y = end  # Palette chains the segments and lets them leave the image
    return mask


def irregular_mask(
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    hole_range: tuple[float, float] = (0.15, 0.5),
    starts: tuple[int, int] = (4, 7),
    directions: tuple[int, int] = (1, 5),
    max_angle: float = 4.0,
    length: tuple[float, float] = (10 / 256, 99 / 256),
    width: tuple[float, float] = (10 / 256, 39 / 256),
    max_tries: int = 200,
    device: torch.device | str | None = None,
) -> Tensor:
    """Irregular mask with hole fraction strictly inside ``hole_range``: float32 ``(1, H, W)``.

    Palette's ``get_irregular_mask``: from each of ``starts`` random pixels (Palette: 4-7) a
    chain of ``directions`` segments (1-5) at angles ``U(0, max_angle)`` (mirrored for even
    starts), lengths uniform in ``length`` and widths uniform in ``width`` (fractions of
    ``sqrt(H W)``; Palette: 10-99 px and 10-39 px at 256). The mask is redrawn until its hole
    fraction lies in the open interval ``hole_range`` (Palette: (0.15, 0.5)); after ``max_tries``
    draws an :class:`~imgdiff.InputValueError` says so (Palette loops forever). Palette draws
    integer angles ``{0, 1, 2, 3} + 0.01``; here they are continuous.

    ``size`` is ``n`` or ``(H, W)``, sides at least 8. Reproducible for a seeded ``generator``.
    """
    H, W = check_size(size)
    gen = check_generator(generator)
    low, high = _fraction_range("hole_range", hole_range)
    if low >= high:
        raise InputValueError(
            f"hole_range: expected an open interval (low, high) with low < high, got ({low}, {high})"
        )
    n_starts = _int_range("starts", starts, min=1)
    n_directions = _int_range("directions", directions, min=1)
    angle = check_unit_interval("max_angle", max_angle, low=0.0, high=2 * math.pi)
    lengths = _fraction_range("length", length)
    widths = _fraction_range("width", width)
    tries = check_int("max_tries", max_tries, min=1)

    for _ in range(tries):
        mask = _random_irregular(H, W, gen, n_starts, n_directions, angle, lengths, widths)
        fraction = float(mask.sum()) / (H * W)  # exact: a float32 mean can round past a bound
        if low < fraction < high:
            return mask.unsqueeze(0).to(device if device is not None else "cpu")
    raise InputValueError(
        f"hole_range: could not draw an irregular {H}x{W} mask with hole fraction in "
        f"({low}, {high}) in max_tries={tries} tries; widen hole_range, raise max_tries, or "
        f"change the stroke lengths and widths"
    )
