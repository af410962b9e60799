"""Palette's tasks and masks (spec 2.6): PAL-5 mask properties, the four tasks, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor

import imgdiff
from imgdiff.data import toy_shapes
from imgdiff.degradations import (
    MASK_KINDS,
    TASKS,
    bbox_mask,
    brush_stroke_mask,
    center_mask,
    colorization_pair,
    four_direction_mask,
    hybrid_mask,
    inpainting_pair,
    irregular_mask,
    jpeg_compress,
    jpeg_pair,
    make_mask,
    make_pairs,
    one_direction_mask,
    sample_tasks,
    to_grayscale,
    uncropping_mask,
    uncropping_pair,
    with_luma,
)
from imgdiff.degradations.operators import luma

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError

RANDOM_KINDS = ("bbox", "brush", "irregular", "hybrid", "four_direction")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hole_fraction(mask: Tensor) -> float:
    return float(mask.double().mean())


@pytest.fixture(scope="module")
def images() -> Tensor:
    return toy_shapes(6, 32, seed=3)[0]


# ------------------------------------------------------------------ PAL-5 and the masks


def test_center_hole_fraction_is_exactly_a_quarter_at_256() -> None:
    mask = center_mask(256)
    assert hole_fraction(mask) == 0.25
    assert torch.equal(mask[0, 64:192, 64:192], torch.ones(128, 128))


def test_irregular_hole_fraction_in_open_interval_at_256() -> None:
    for seed in range(6):
        assert 0.15 < hole_fraction(irregular_mask(256, gen(seed))) < 0.5


@pytest.mark.parametrize("side", ["left", "top", "right", "bottom"])
def test_one_direction_is_exactly_half_at_256(side: str) -> None:
    mask = one_direction_mask(256, side=side)  # type: ignore[arg-type]
    assert hole_fraction(mask) == 0.5
    half = {
        "left": mask[0, :, :128],
        "right": mask[0, :, 128:],
        "top": mask[0, :128],
        "bottom": mask[0, 128:],
    }[side]
    assert bool((half == 1).all())


def test_four_direction_is_a_border_frame_within_one_percent_of_half_at_256() -> None:
    for seed in range(10):
        mask = four_direction_mask(256, gen(seed))[0]
        assert abs(hole_fraction(mask) - 0.5) <= 0.005
        # every border row and column is hole; the known pixels form one centred rectangle
        for border in (mask[0], mask[-1], mask[:, 0], mask[:, -1]):
            assert bool((border == 1).all())
        rows = torch.nonzero((mask == 0).any(dim=1)).flatten()
        cols = torch.nonzero((mask == 0).any(dim=0)).flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        assert bool((mask[top : bottom + 1, left : right + 1] == 0).all())
        assert abs(top - (255 - bottom)) <= 1
        assert abs(left - (255 - right)) <= 1


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(16, 96),
    width=st.integers(16, 96),
    kind=st.sampled_from(MASK_KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_mask_is_binary_float_1hw(height: int, width: int, kind: str, seed: int) -> None:
    mask = make_mask(kind, (height, width), gen(seed))  # type: ignore[arg-type]
    assert mask.shape == (1, height, width)
    assert mask.dtype == torch.float32
    assert bool(((mask == 0) | (mask == 1)).all())


def four_direction_bound(width: int) -> float:
    """The documented bound on ``|hole fraction - 0.5|`` of a default four-direction mask."""
    return 1 / (2 * width) if width >= 13 else 1 / 11


@settings(max_examples=40, deadline=None)
@given(height=st.integers(16, 96), width=st.integers(16, 96), seed=st.integers(0, 2**31 - 1))
def test_uncropping_fractions_over_sizes(height: int, width: int, seed: int) -> None:
    frame = four_direction_mask((height, width), gen(seed))
    assert abs(hole_fraction(frame) - 0.5) <= 1 / (2 * width) + 1e-12
    assert bool((frame[0, :, [0, -1]] == 1).all())
    assert bool((frame[0, [0, -1]] == 1).all())
    assert abs(hole_fraction(irregular_mask((height, width), gen(seed))) - 0.325) < 0.175


def test_four_direction_fraction_on_every_small_size() -> None:
    """Every size from 8 to 24 per side, 12 seeds each: within 1/(2W) of 0.5 for W >= 13, and
    within 1/11 below, where the one-pixel border can push it past 1/(2W) (11 x 8: 0.591)."""
    for height in range(8, 25):
        for width in range(8, 25):
            for seed in range(12):
                frame = four_direction_mask((height, width), gen(seed))
                assert abs(hole_fraction(frame) - 0.5) <= four_direction_bound(width) + 1e-12, (
                    height,
                    width,
                    seed,
                )
                assert bool((frame[0, :, [0, -1]] == 1).all())
                assert bool((frame[0, [0, -1]] == 1).all())
                if height % 2 == 0 and width % 2 == 0:
                    assert hole_fraction(one_direction_mask((height, width), gen(seed))) == 0.5
                    assert hole_fraction(center_mask((height, width))) == 0.25
    narrow = [hole_fraction(four_direction_mask((11, 8), gen(seed))) for seed in range(40)]
    assert max(abs(f - 0.5) for f in narrow) > 1 / 16  # the 1/(2W) bound does not hold at W = 8
    assert max(narrow) == pytest.approx(65 / 110)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_are_reproducible_for_a_seed(kind: str) -> None:
    first = make_mask(kind, (48, 64), gen(7))  # type: ignore[arg-type]
    again = make_mask(kind, (48, 64), gen(7))  # type: ignore[arg-type]
    assert torch.equal(first, again)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_masks_differ_across_seeds(kind: str) -> None:
    masks = [make_mask(kind, 64, gen(seed)) for seed in range(4)]  # type: ignore[arg-type]
    assert not all(torch.equal(masks[0], m) for m in masks[1:])


def _is_frame(mask: Tensor) -> bool:
    m = mask[0]
    return all(bool((edge == 1).all()) for edge in (m[0], m[-1], m[:, 0], m[:, -1]))


def test_one_direction_and_uncrop_cover_their_choices() -> None:
    g = gen(0)
    corners = {
        tuple(one_direction_mask(16, g)[0, ::15, ::15].flatten().tolist()) for _ in range(40)
    }
    assert len(corners) == 4  # the hole is the left, top, right or bottom half
    frames = [_is_frame(uncropping_mask(16, g)) for _ in range(40)]
    assert 5 < sum(frames) < 35  # four directions about half the time, one direction otherwise


def test_bbox_stays_inside_margins_and_keeps_its_centre() -> None:
    for seed in range(20):
        mask = bbox_mask(256, gen(seed))[0]
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        assert bool((mask[top : bottom + 1, left : right + 1] == 1).all())  # one box
        assert hole_fraction(mask) == (bottom - top + 1) * (right - left + 1) / 256**2
        for lo, hi in ((top, bottom), (left, right)):
            assert lo >= 20
            assert hi <= 255 - 20
            assert 128 - 40 <= hi - lo + 1 <= 128  # box 128 px shrunk by at most 40
            assert (hi - lo + 1) % 2 == 0  # shrunk by the same d on both sides


def test_brush_strokes_flip_for_real() -> None:
    outcomes = set()
    for seed in range(16):
        plain = brush_stroke_mask(64, gen(seed), flip=False)
        flipped = brush_stroke_mask(64, gen(seed))
        options = {
            "none": plain,
            "lr": plain.flip(-1),
            "tb": plain.flip(-2),
            "both": plain.flip(-1, -2),
        }
        matches = [name for name, m in options.items() if torch.equal(m, flipped)]
        assert matches
        outcomes.update(matches)
    assert {"lr", "tb", "both"} & outcomes


def test_brush_width_scales_with_the_image() -> None:
    small = np.mean([hole_fraction(brush_stroke_mask(64, gen(s))) for s in range(12)])
    large = np.mean([hole_fraction(brush_stroke_mask(256, gen(s))) for s in range(12)])
    assert 0.02 < small < 0.5
    assert 0.02 < large < 0.5
    assert abs(small - large) < 0.1  # same fraction at both sizes, not 16x more at 64


def test_hybrid_is_the_union_of_a_box_and_strokes() -> None:
    g = gen(5)
    expected = torch.maximum(bbox_mask(64, g), brush_stroke_mask(64, g))
    assert torch.equal(hybrid_mask(64, gen(5)), expected)


def test_make_mask_device_argument() -> None:
    assert make_mask("center", 16, device="cpu").device.type == "cpu"


# ------------------------------------------------------------------ the tasks


def test_inpainting_source_is_target_outside_and_noise_inside(images: Tensor) -> None:
    before = images.clone()
    pair = inpainting_pair(images, [gen(i) for i in range(6)])
    assert pair.source.shape == images.shape
    assert pair.mask.shape == (6, 1, 32, 32)
    assert pair.target is images
    assert torch.equal(images, before)
    known = pair.mask.expand_as(images) == 0
    assert torch.equal(pair.source[known], images[known])
    assert bool((pair.source[~known] != images[~known]).all())
    assert pair.tasks == ("inpainting",) * 6


def test_inpainting_hole_holds_standard_normal_noise_from_the_generator() -> None:
    x = toy_shapes(4, 64, seed=1)[0]
    mask = center_mask(64)
    pair = inpainting_pair(x, [gen(i) for i in range(4)], mask=mask)
    hole = mask.bool().expand(3, -1, -1)
    for b in range(4):
        noise = torch.randn(3, 64, 64, generator=gen(b))
        assert torch.equal(pair.source[b][hole], noise[hole])
    values = pair.source[:, hole]
    assert abs(float(values.mean())) < 0.05
    assert abs(float(values.std()) - 1) < 0.05


def test_inpainting_takes_the_masks_the_rest_of_the_library_takes() -> None:
    """bool, integer and floating 0/1 masks, (1, H, W), (1, 1, H, W) or (B, 1, H, W), as
    KnownRegion and the Trainer accept them: all give the same pair, and none is modified."""
    x = toy_shapes(3, 16, seed=2)[0]
    hole = center_mask(16)  # (1, H, W) float32
    want = inpainting_pair(x, [gen(i) for i in range(3)], mask=hole)
    shared = hole[None]  # (1, 1, H, W)
    for mask in (
        shared,
        shared.bool(),
        shared.to(torch.uint8),
        shared.long(),
        hole.bool(),
        shared.expand(3, 1, 16, 16).to(torch.uint8),
        shared.double(),
    ):
        before = mask.clone()
        got = inpainting_pair(x, [gen(i) for i in range(3)], mask=mask)
        assert got.mask.shape == (3, 1, 16, 16)
        assert got.mask.dtype == x.dtype
        assert torch.equal(got.mask, want.mask)
        assert torch.equal(got.source, want.source)
        assert torch.equal(mask, before)
    imgdiff.conditioning.KnownRegion(x, shared.to(torch.uint8))  # the same masks are accepted there
    bad = shared.to(torch.uint8) * 2
    with pytest.raises(IVE, match=r"^mask: expected a binary mask of 0 and 1 .*got the value 2"):
        inpainting_pair(x, mask=bad)
    with pytest.raises(ITE, match=r"^mask: expected a bool or real 0/1 mask, got dtype"):
        inpainting_pair(x, mask=shared.to(torch.complex64))


def test_colorization_source_is_bt601_luma_on_three_equal_channels(images: Tensor) -> None:
    pair = colorization_pair(images)
    r, g, b = images.unbind(dim=1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    for c in range(3):
        torch.testing.assert_close(pair.source[:, c], luma, atol=1e-6, rtol=0)
    assert torch.equal(pair.mask, torch.ones(6, 1, 32, 32))
    assert torch.equal(to_grayscale(images), pair.source)
    # agrees with PIL's "L" conversion (also BT.601) up to uint8 rounding
    pixels = ((images[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float64) / 127.5 - 1
    assert np.abs(pair.source[0, 0].double().numpy() - pil).max() <= 1.5 / 127.5


def test_jpeg_is_a_real_compression() -> None:
    x = toy_shapes(4, 64, seed=2)[0]
    errors = {q: float((jpeg_compress(x, q) - x).abs().mean()) for q in (5, 10, 30, 95)}
    out = jpeg_compress(x, 10)
    assert not torch.equal(out, x)
    assert float(out.min()) >= -1
    assert float(out.max()) <= 1
    assert torch.equal(((out + 1) * 127.5).round() / 127.5 - 1, out)  # decoded uint8 values
    assert errors[5] > errors[10] > errors[30] > errors[95]
    assert errors[95] < 0.03
    # matches pillow directly
    pixels = ((x[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=10)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    expected = torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out[0], expected)


def test_jpeg_pair_quality_and_per_sample_qualities(images: Tensor) -> None:
    fixed = jpeg_pair(images, gen(0), quality=20)
    assert torch.equal(fixed.source, jpeg_compress(images, 20))
    assert torch.equal(fixed.mask, torch.ones(6, 1, 32, 32))
    mixed = jpeg_compress(images[:2], [5, 90])
    assert torch.equal(mixed[1], jpeg_compress(images[1:2], 90)[0])
    assert torch.equal(jpeg_compress(images[:2], torch.tensor([5, 90])), mixed)
    assert torch.equal(jpeg_compress(images[:2], np.int64(90)), jpeg_compress(images[:2], 90))


def test_jpeg_compress_refuses_a_tuple_that_is_a_range_elsewhere(images: Tensor) -> None:
    """``(5, 30)`` is a range in jpeg_pair and make_pairs; jpeg_compress takes per-image
    qualities as a list only, so the same tuple is refused at every batch size."""
    for batch in (1, 2, 3):
        with pytest.raises(
            ITE,
            match=r"^quality: expected an int, or a list with one quality per image, got the "
            r"tuple \(5, 30\); a tuple \(low, high\) is a range to draw from in jpeg_pair and "
            r"make_pairs, so for per-image qualities pass a list, e\.g\. \[5, 30\]",
        ):
            jpeg_compress(images[:batch], (5, 30))  # type: ignore[arg-type]
    with pytest.raises(ITE, match=r"^quality: expected an int, a list or a \(B,\) integer tensor"):
        jpeg_compress(images[:2], torch.tensor([5.0, 30.0]))
    with pytest.raises(IVE, match=r"^quality: expected one quality per image \(2\), got 3"):
        jpeg_compress(images[:2], torch.tensor([5, 30, 10]))
    drawn = jpeg_pair(images, gen(1))  # qualities in [5, 30]
    assert torch.equal(drawn.source, jpeg_pair(images, gen(1)).source)
    assert float((drawn.source - images).abs().mean()) > float(
        (jpeg_compress(images, 95) - images).abs().mean()
    )


def test_jpeg_pair_draws_each_quality_from_the_range() -> None:
    """Every source of a 40-image jpeg_pair (one image repeated) is that image compressed at a
    quality in [5, 30], and the qualities vary across the batch, covering both ends of the range;
    with one generator per image, image b uses the quality drawn from generator b."""
    image = toy_shapes(1, 32, seed=4)[0]
    by_quality = {q: jpeg_compress(image, q)[0] for q in range(1, 96)}
    batch = image.expand(40, -1, -1, -1).contiguous()
    pair = jpeg_pair(batch, gen(11))
    candidates = [
        frozenset(q for q, out in by_quality.items() if torch.equal(out, source))
        for source in pair.source
    ]
    assert all(c and min(c) >= 5 and max(c) <= 30 for c in candidates), candidates
    assert len(set(candidates)) >= 8  # many distinct qualities, not one fixed value
    assert min(min(c) for c in candidates) <= 8
    assert max(max(c) for c in candidates) >= 27
    per_image = jpeg_pair(batch[:6], [gen(s) for s in range(6)], quality=(5, 30))
    drawn = [int(torch.randint(5, 31, (1,), generator=gen(s))) for s in range(6)]
    assert len(set(drawn)) > 1
    assert torch.equal(per_image.source, jpeg_compress(batch[:6], drawn))


def test_uncropping_pair_uses_uncropping_masks(images: Tensor) -> None:
    pair = uncropping_pair(images, gen(3))
    for m in pair.mask:
        assert abs(hole_fraction(m) - 0.5) <= 1 / 64
    frames = uncropping_pair(images, gen(3), mask_kind="four_direction").mask
    assert bool((frames[:, :, 0] == 1).all())
    assert bool((frames[:, :, -1] == 1).all())


def test_mixed_tasks_match_single_images_with_per_sample_generators(images: Tensor) -> None:
    tasks = sample_tasks(6, gen(9))
    pair = make_pairs(images, tasks, [gen(10 + b) for b in range(6)])
    assert pair.tasks == tasks
    for b in range(6):
        alone = make_pairs(images[b : b + 1], tasks[b], [gen(10 + b)])
        assert torch.equal(pair.source[b], alone.source[0])
        assert torch.equal(pair.mask[b], alone.mask[0])


def test_pairs_are_reproducible_and_differ_across_seeds(images: Tensor) -> None:
    tasks = ["inpainting", "uncropping", "jpeg", "inpainting", "uncropping", "colorization"]
    a = make_pairs(images, tasks, gen(0))  # type: ignore[arg-type]
    b = make_pairs(images, tasks, gen(0))  # type: ignore[arg-type]
    c = make_pairs(images, tasks, gen(1))  # type: ignore[arg-type]
    assert torch.equal(a.source, b.source)
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.source, c.source)


def test_pairs_keep_dtype_and_leave_the_input_alone() -> None:
    x = toy_shapes(4, 16, seed=0)[0].double()
    before = x.clone()
    pair = make_pairs(x, list(TASKS), gen(0))
    assert pair.source.dtype == pair.mask.dtype == torch.float64
    assert torch.equal(x, before)


def test_global_generator_when_none() -> None:
    torch.manual_seed(123)
    first = make_mask("hybrid", 32)
    torch.manual_seed(123)
    assert torch.equal(make_mask("hybrid", 32), first)


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    tasks=st.lists(st.sampled_from(TASKS), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pairs_over_sizes_and_task_mixes(
    height: int, width: int, tasks: list[str], seed: int
) -> None:
    x = torch.rand(len(tasks), 3, height, width, generator=gen(seed)) * 2 - 1
    pair = make_pairs(x, tasks, gen(seed))  # type: ignore[arg-type]
    assert pair.source.shape == x.shape
    assert pair.mask.shape == (len(tasks), 1, height, width)
    assert bool(((pair.mask == 0) | (pair.mask == 1)).all())
    known = pair.mask.expand_as(x) == 0
    assert torch.equal(pair.source[known], x[known])
    for b, task in enumerate(tasks):
        if task in ("colorization", "jpeg"):
            assert bool((pair.mask[b] == 1).all())
            assert float(pair.source[b].abs().max()) <= 1


def test_sample_tasks_is_uniform_over_choices() -> None:
    names = sample_tasks(400, gen(0))
    assert set(names) == set(TASKS)
    assert all(60 < names.count(t) < 140 for t in TASKS)
    assert sample_tasks(400, gen(0)) == names
    assert set(sample_tasks(50, gen(1), choices=["jpeg", "inpainting"])) == {"jpeg", "inpainting"}


# ------------------------------------------------------------------ bad input

X = toy_shapes(2, 16, seed=0)[0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: make_mask("star", 64), IVE, r"kind: expected one of 'bbox'.*got 'star'"),  # type: ignore[arg-type]
        (lambda: make_mask("center", 4), IVE, r"size: expected sides of at least 8 pixels, got 4"),
        (lambda: make_mask("bbox", (64, 7)), IVE, r"size: expected sides of at least 8"),
        (lambda: make_mask("bbox", 64.0), ITE, r"size: expected an int or a pair"),  # type: ignore[arg-type]
        (
            lambda: make_mask("bbox", 64, 3),
            ITE,
            r"generator: expected None or a torch.Generator, got 3",
        ),  # type: ignore[arg-type]
        (lambda: bbox_mask(64, margin=0.5), IVE, r"margin: expected a float < 0.5"),
        (lambda: bbox_mask(64, max_box=0.9, margin=0.1), IVE, r"margin: a box of 58 px"),
        (lambda: bbox_mask(64, max_delta=1.0), IVE, r"max_delta: expected a shrink smaller"),
        (lambda: brush_stroke_mask(64, strokes=(3, 1)), IVE, r"strokes: expected low <= high"),
        (lambda: brush_stroke_mask(64, width=(0.0, 0.1)), IVE, r"width: expected a float in \(0"),
        (lambda: brush_stroke_mask(64, flip=1), ITE, r"flip: expected a bool"),  # type: ignore[arg-type]
        (
            lambda: irregular_mask(64, hole_range=(0.3, 0.3)),
            IVE,
            r"hole_range: expected an open interval",
        ),
        (
            lambda: irregular_mask(32, gen(0), hole_range=(0.98, 0.99), max_tries=3),
            IVE,
            r"hole_range: could not draw .* in max_tries=3 tries",
        ),
        (lambda: one_direction_mask(64, side="middle"), IVE, r"side: expected one of 'left'"),  # type: ignore[arg-type]
        (lambda: four_direction_mask(64, max_side=0.5), IVE, r"max_side: expected a float >="),
        (
            lambda: make_pairs(X, "denoise"),
            IVE,
            r"tasks: expected one of 'colorization', 'inpainting', 'uncropping', 'jpeg', got 'denoise'",
        ),  # type: ignore[arg-type]
        (lambda: make_pairs(X, ["jpeg"]), IVE, r"tasks: expected one task per image \(2\), got 1"),
        (lambda: make_pairs(X, ["jpeg", 3]), IVE, r"tasks\[1\]: expected one of"),  # type: ignore[list-item]
        (lambda: make_pairs(X, 3), ITE, r"tasks: expected a task name or a sequence"),  # type: ignore[arg-type]
        (
            lambda: colorization_pair(X[0]),
            IVE,
            r"images: expected a tensor with 4 dimensions, got shape \(3, 16, 16\)",
        ),
        (
            lambda: colorization_pair(X[:, :1]),
            IVE,
            r"images: expected 3 \(RGB\) channels .* got 1 channels",
        ),
        (
            lambda: colorization_pair(X * 2),
            IVE,
            r"images: expected values in \[-1, 1\], got values from",
        ),
        (
            lambda: colorization_pair((X * 100).long()),
            ITE,
            r"images: expected a floating-point tensor, got dtype torch.int64",
        ),
        (
            lambda: colorization_pair(X.numpy()),
            ITE,
            r"images: expected a torch.Tensor, got object of type ndarray",
        ),  # type: ignore[arg-type]
        (
            lambda: colorization_pair(X.new_full((1, 3, 8, 8), float("nan"))),
            IVE,
            r"images: expected finite values",
        ),
        (
            lambda: colorization_pair(X[:, :, :4]),
            IVE,
            r"images: expected height and width of at least 8",
        ),
        (
            lambda: jpeg_pair(X, quality=0),
            IVE,
            r"quality: expected a JPEG quality in \[1, 95\], got 0",
        ),
        (
            lambda: jpeg_pair(X, quality=96),
            IVE,
            r"quality: expected a JPEG quality in \[1, 95\], got 96",
        ),
        (
            lambda: jpeg_pair(X, quality=(30, 5)),
            IVE,
            r"quality: expected low <= high, got \(30, 5\)",
        ),
        (lambda: jpeg_pair(X, quality=(5, 10, 20)), IVE, r"quality: expected one int or a pair"),  # type: ignore[arg-type]
        (lambda: jpeg_pair(X, quality=10.5), ITE, r"quality: expected an int JPEG quality"),  # type: ignore[arg-type]
        (
            lambda: make_pairs(X, "jpeg", jpeg_quality=(5, 100)),
            IVE,
            r"quality: expected a JPEG quality in \[1, 95\], got 100",
        ),
        (
            lambda: jpeg_compress(X, [10]),
            IVE,
            r"quality: expected one quality per image \(2\), got 1",
        ),
        (lambda: jpeg_compress(X, [10, 0]), IVE, r"quality\[1\]: expected a JPEG quality"),
        (
            lambda: inpainting_pair(X, [gen(0)]),
            IVE,
            r"generator: expected one generator per sample \(2\), got 1",
        ),
        (lambda: inpainting_pair(X, "seed"), ITE, r"generator: expected None, a torch.Generator"),  # type: ignore[arg-type]
        (lambda: inpainting_pair(X, mask_kind="star"), IVE, r"mask_kind: expected one of"),  # type: ignore[arg-type]
        (
            lambda: inpainting_pair(X, mask=torch.ones(2, 16, 16)),
            IVE,
            r"mask: expected shape \(1, 16, 16\), \(1, 1, 16, 16\) or \(2, 1, 16, 16\) "
            r"\(1 = hole\), got \(2, 16, 16\)",
        ),
        (
            lambda: inpainting_pair(X, mask=torch.ones(3, 1, 16, 16)),
            IVE,
            r"mask: expected shape \(1, 16, 16\), \(1, 1, 16, 16\) or \(2, 1, 16, 16\)",
        ),
        (
            lambda: inpainting_pair(X, mask=torch.full((1, 16, 16), 0.5)),
            IVE,
            r"mask: expected a binary mask of 0 and 1 \(1 = missing\), got the value 0.5",
        ),
        (
            lambda: inpainting_pair(X, mask=torch.full((1, 16, 16), float("nan"))),
            IVE,
            r"mask: expected a binary mask of 0 and 1 \(1 = missing\), got the value nan",
        ),
        (
            lambda: inpainting_pair(X, mask=center_mask(16).numpy()),
            ITE,
            r"mask: expected a torch.Tensor, got object of type ndarray",
        ),  # type: ignore[arg-type]
        (
            lambda: uncropping_pair(X, mask_kind="bbox"),
            IVE,
            r"mask_kind: expected one of 'one_direction', 'four_direction', 'uncrop', got 'bbox'",
        ),
        (
            lambda: make_pairs(X, "uncropping", uncropping_mask="center"),
            IVE,
            r"uncropping_mask: expected one of",
        ),
        (lambda: sample_tasks(0), IVE, r"n: expected an int >= 1, got 0"),
        (lambda: sample_tasks(3, choices=[]), IVE, r"choices: expected at least one task name"),
        (lambda: sample_tasks(3, choices=["sr"]), IVE, r"choices\[0\]: expected one of"),  # type: ignore[list-item]
    ],
)
def test_bad_input_names_the_argument(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


def test_toy_shapes_seed_range_is_checked() -> None:
    """Seeds outside what torch.Generator.manual_seed takes are named, not a raw overflow."""
    assert toy_shapes(1, 8, seed=2**64 - 1)[0].shape == (1, 3, 8, 8)
    assert toy_shapes(1, 8, seed=-(2**63))[0].shape == (1, 3, 8, 8)
    with pytest.raises(
        IVE, match=r"^seed: expected an int <= 18446744073709551615, got 1180591620717411303424$"
    ):
        toy_shapes(1, 8, seed=2**70)
    with pytest.raises(IVE, match=r"^seed: expected an int >= -9223372036854775808, got -9\d+$"):
        toy_shapes(1, 8, seed=-(2**63) - 1)
    with pytest.raises(ITE, match=r"^seed: expected an int, got 1.5"):
        toy_shapes(1, 8, seed=1.5)  # type: ignore[arg-type]


def test_errors_are_imgdiff_errors() -> None:
    with pytest.raises(imgdiff.ImgdiffError):
        make_mask("star", 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(X, 0)


def test_with_luma_takes_the_measured_luminance_and_keeps_the_chroma() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    gray = to_grayscale(torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1)
    y = with_luma(x, gray)  # may leave [-1, 1]: measure with the unchecked luma
    torch.testing.assert_close(luma(y), gray)
    torch.testing.assert_close(y - luma(y), x - luma(x))
    torch.testing.assert_close(with_luma(x, to_grayscale(x)), x)
    with pytest.raises(imgdiff.InputValueError, match="gray"):
        with_luma(x, gray[:, :1])
    with pytest.raises(imgdiff.InputValueError, match="images"):
        with_luma(x[:, :2], gray[:, :2])


def test_bbox_shrinks_around_the_centre_of_a_box_inside_the_margins() -> None:
    """The drawn box is a full box (side round(0.5 n), inside the margins) shrunk by d on *both*
    ends, so growing it back by d = (box - side) / 2 still respects the margins."""
    n, box, gap = 64, 32, 5  # max_box 0.5, margin 20/256 of 64 -> 5 px
    for seed in range(150):
        mask = bbox_mask(n, gen(seed))[0]
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        for lo, hi in ((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))):
            d, odd = divmod(box - (hi - lo + 1), 2)
            assert odd == 0
            assert 0 <= d <= 5
            assert lo - d >= gap, (seed, lo, hi)
            assert hi + d <= n - 1 - gap, (seed, lo, hi)


@pytest.mark.parametrize("size", [(9, 11), (11, 9), (13, 13)])
def test_one_direction_sides_mirror_each_other_on_odd_sizes(size: tuple[int, int]) -> None:
    """right == left mirrored, bottom == top mirrored, the hole a W // 2 (H // 2) wide band."""
    H, W = size
    m = {s: one_direction_mask(size, side=s)[0] for s in ("left", "right", "top", "bottom")}  # type: ignore[arg-type]
    assert torch.equal(m["right"], m["left"].flip(1))
    assert torch.equal(m["bottom"], m["top"].flip(0))
    assert bool((m["left"][:, : W // 2] == 1).all())
    assert float(m["left"].sum()) == H * (W // 2)
    assert bool((m["top"][: H // 2] == 1).all())
    assert float(m["top"].sum()) == W * (H // 2)


def _segment_distance(H: int, W: int, a: tuple[float, float], b: tuple[float, float]) -> Tensor:
    """Distance of every pixel centre (x, y) = (j, i) to the segment ab, float64 (H, W)."""
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    p = torch.stack([xs, ys], dim=-1)
    A, B = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    d = B - A
    t = (((p - A) @ d) / d.dot(d)).clamp(0, 1) if d.dot(d) > 0 else torch.zeros(H, W)
    return (p - A - t[..., None] * d).norm(dim=-1)


@pytest.mark.parametrize("width", [1.0, 3.0, 4.0, 7.5])
def test_stroke_of_width_w_covers_pixels_within_w_over_2(width: float) -> None:
    from imgdiff.degradations.strokes import draw_polyline

    H, W = 24, 30
    # a slanted and an axis-aligned segment (pixels exactly at w / 2 from it are inside)
    for a, b in (((4.0, 6.5), (23.0, 15.0)), ((5.0, 10.0), (15.0, 10.0))):
        mask = torch.zeros(H, W)
        draw_polyline(mask, [a, b], width)
        expected = (_segment_distance(H, W, a, b) <= width / 2).float()
        assert torch.equal(mask, expected)
    dot = torch.zeros(H, W)
    draw_polyline(dot, [(10.0, 12.0)], 1.0)  # width 1: the pixel itself, not its neighbours
    assert float(dot.sum()) == 1.0
    assert dot[12, 10] == 1.0


def _one_thin_segment(size: int, seed: int) -> torch.Tensor:
    """A brush mask of one stroke of one 1-px segment at exactly the mean angle, unflipped."""
    return brush_stroke_mask(
        size,
        gen(seed),
        strokes=(1, 1),
        vertices=(1, 1),
        width=(1 / size, 1 / size),
        angle_range=0.0,
        flip=False,
    )[0]


def test_brush_first_segment_is_mirrored_and_thin_strokes_are_one_pixel() -> None:
    """One stroke of one segment at exactly mean_angle (72 degrees): the first segment (k = 0,
    even) is mirrored to 2 pi - 72 degrees, i.e. up and to the right (y decreases as x grows), so
    the hole's x and y are negatively correlated; a width of 1 px covers about a pixel per row."""
    negative = 0
    for seed in range(40):
        mask = _one_thin_segment(64, seed)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        rows, cols = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        if rows < 6:
            continue  # a short (or border-clipped) segment: mostly its round caps
        cov = float(((xs - xs.float().mean()) * (ys - ys.float().mean())).float().mean())
        assert cov <= 0, seed  # 0: a vertical segment, its end clipped at the right border
        negative += cov < 0
        assert float(mask.sum()) <= 1.6 * max(rows, cols), seed
    assert negative >= 10


def test_irregular_hole_range_is_open_at_both_ends() -> None:
    """A draw whose hole fraction equals a bound of hole_range is rejected (open interval)."""
    first = irregular_mask(64, gen(0), hole_range=(0.001, 0.999))
    f = float(first.sum()) / 64**2
    assert 0.02 < f < 0.9
    above = irregular_mask(64, gen(0), hole_range=(f, 0.999))
    below = irregular_mask(64, gen(0), hole_range=(0.001, f))
    assert float(above.sum()) / 64**2 > f
    assert float(below.sum()) / 64**2 < f


def test_brush_segment_lengths_are_clipped_to_twice_the_mean() -> None:
    """Segment lengths are N(r, r/2) clipped to [0, 2 r], r = sqrt(H^2 + W^2) / 8 (16 sqrt 2 at 128)."""
    r = (2 * 128**2) ** 0.5 / 8
    longest = 0.0
    for seed in range(300):
        mask = _one_thin_segment(128, seed)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # the segment spans the hole's bounding box, less the round caps (width 1: radius 0.5)
        length = float(torch.hypot((xs.max() - xs.min()).float(), (ys.max() - ys.min()).float()))
        longest = max(longest, length)
    assert longest <= 2 * r + 1.0
    assert longest > 1.5 * r  # the upper part of the range is reached
