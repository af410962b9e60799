"""PaletteNet-style palettes: Lab conversion, deterministic k-means extraction, adapters (COND-7)."""

from __future__ import annotations

import pytest
import torch

import imgdiff
from imgdiff.conditioning.palette import (
    LAB_SCALE,
    PALETTE_SIZE,
    PaletteEmbedding,
    denormalize_palette,
    extract_palette,
    lab_to_rgb,
    normalize_palette,
    rgb_to_lab,
    tile_palette,
)
from imgdiff.data.toy import toy_shapes

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError

# Six sRGB colours (in [0, 1]) with distinct Lab values, and the pixel areas of a 12 x 12 image.
COLOURS = torch.tensor(
    [
        [0.9, 0.1, 0.1],
        [0.1, 0.6, 0.2],
        [0.2, 0.3, 0.9],
        [0.95, 0.9, 0.2],
        [0.5, 0.5, 0.5],
        [0.1, 0.05, 0.2],
    ],
    dtype=torch.float64,
)
AREAS = [40, 32, 28, 20, 16, 8]  # sums to 144 = 12 * 12


def _flat_colour_image(perm: list[int]) -> torch.Tensor:
    """``(1, 3, 12, 12)`` image made of the six colours; colour ``i`` covers ``AREAS[i]`` pixels.

    The pixels are laid out in the order ``perm`` (so the layout differs while the areas do not).
    """
    pixels = torch.cat([COLOURS[i].expand(AREAS[i], 3) for i in perm])
    return (pixels.T.reshape(1, 3, 12, 12) * 2 - 1).to(torch.float32)


# -- Lab ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rgb01", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ],
)
def test_known_lab_values(rgb01: tuple[float, ...], lab: tuple[float, ...]) -> None:
    """White, black and the sRGB primaries against the standard D65 values (2 decimals)."""
    x = torch.tensor(rgb01, dtype=torch.float64) * 2 - 1
    out = rgb_to_lab(x[None], dim=-1)[0]
    torch.testing.assert_close(out, torch.tensor(lab, dtype=torch.float64), atol=6e-3, rtol=0)


def test_white_is_exact() -> None:
    out = rgb_to_lab(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([100.0, 0.0, 0.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lab_round_trip(dtype: torch.dtype) -> None:
    """sRGB -> Lab -> sRGB is the identity (1e-5), also slightly outside [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=dtype) * 2.2 - 1.1
    back = lab_to_rgb(rgb_to_lab(x))
    assert back.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(back, x, atol=tol, rtol=0)


def test_lab_is_differentiable_without_nan() -> None:
    x = torch.tensor([[-1.0, -0.999, 0.0, 1.0, 1.2, -1.2]], dtype=torch.float64)
    x = x.reshape(1, 1, 6).expand(3, 1, 6).reshape(1, 3, 1, 6).clone().requires_grad_(True)
    rgb_to_lab(x).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(
        lambda t: rgb_to_lab(t), (x.detach()[..., :4].requires_grad_(),)
    )


def test_palette_normalisation_round_trip() -> None:
    p = torch.tensor([[[100.0, 128.0, -128.0]]])
    torch.testing.assert_close(normalize_palette(p), torch.tensor([[[1.0, 1.0, -1.0]]]))
    torch.testing.assert_close(denormalize_palette(normalize_palette(p)), p)
    assert LAB_SCALE == (100.0, 128.0, 128.0)


# -- extraction --------------------------------------------------------------------------------


def test_flat_colours_recovered_and_sorted_by_area() -> None:
    """An image of six flat colours gives exactly those colours, largest area first."""
    expected = rgb_to_lab(COLOURS * 2 - 1, dim=-1).to(torch.float32)
    for perm in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 4, 2]):
        palette, weights = extract_palette(_flat_colour_image(perm), return_weights=True)
        assert palette.shape == (1, 6, 3)
        assert palette.dtype == torch.float32
        torch.testing.assert_close(palette[0], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            weights[0], torch.tensor(AREAS, dtype=torch.float32) / 144, atol=1e-6, rtol=0
        )


def test_equal_areas_are_ordered_by_lightness() -> None:
    """Ties in cluster size are broken by L (descending)."""
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.9, 0.9], [0.5, 0.2, 0.2]])
    image = colours.repeat_interleave(4, dim=0).T.reshape(1, 3, 3, 4) * 2 - 1
    palette = extract_palette(image, k=3)
    L = palette[0, :, 0]
    assert bool((L[:-1] > L[1:]).all())


def test_fewer_colours_than_k_repeat_cyclically_with_zero_weight() -> None:
    """Two flat colours (equal areas): [light, dark] then repeated, weights 1/2, 1/2, 0, ..."""
    image = torch.cat([torch.full((1, 3, 4, 2), 0.5), torch.full((1, 3, 4, 2), -0.5)], dim=3)
    palette, weights = extract_palette(image, return_weights=True)
    light, dark = rgb_to_lab(torch.tensor([[0.5] * 3, [-0.5] * 3]), dim=-1)
    torch.testing.assert_close(palette[0], torch.stack([light, dark] * 3), atol=1e-4, rtol=0)
    assert torch.equal(weights[0], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    one = extract_palette(torch.zeros(2, 3, 2, 2))
    torch.testing.assert_close(one, rgb_to_lab(torch.zeros(2, 6, 3), dim=-1), atol=1e-4, rtol=0)


def test_extractor_is_deterministic_and_batch_independent() -> None:
    """Same seed, same palette; each image's palette does not depend on its batch companions."""
    images, _ = toy_shapes(4, 24, seed=3)
    a, wa = extract_palette(images, max_pixels=256, seed=7, return_weights=True)
    b, wb = extract_palette(images, max_pixels=256, seed=7, return_weights=True)
    assert torch.equal(a, b)
    assert torch.equal(wa, wb)
    for i in range(4):
        alone = extract_palette(images[i : i + 1], max_pixels=256, seed=7)
        assert torch.equal(alone[0], a[i])
    # stable order: weights are non-increasing
    assert bool((wa[:, :-1] >= wa[:, 1:]).all())
    torch.testing.assert_close(wa.sum(1), torch.ones(4))


def test_pixel_order_does_not_change_the_palette() -> None:
    """Shuffling the pixels of an image (no subsampling) keeps the same sorted palette."""
    images, _ = toy_shapes(1, 16, seed=1)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    shuffled = images.flatten(2)[:, :, perm].reshape(images.shape)
    a = extract_palette(images, k=3, max_pixels=None)
    b = extract_palette(shuffled, k=3, max_pixels=None)
    torch.testing.assert_close(a, b, atol=0.5, rtol=0)  # k-means optima may differ slightly


def test_palette_does_not_track_gradients() -> None:
    images, _ = toy_shapes(1, 8)
    out = extract_palette(images.requires_grad_(True), k=2)
    assert not out.requires_grad


# -- adapters (COND-7) -------------------------------------------------------------------------


def test_tile_shape_layout_and_order() -> None:
    """(B, 6, 3) -> (B, 18, H, W); channel 3i + c is colour i's component c; order matters."""
    g = torch.Generator().manual_seed(0)
    palette = torch.rand(2, 6, 3, generator=g) * torch.tensor([100.0, 200.0, 200.0]) - torch.tensor(
        [0.0, 100.0, 100.0]
    )
    tiled = tile_palette(palette, (5, 7))
    assert tiled.shape == (2, 18, 5, 7)
    expected = normalize_palette(palette).reshape(2, 18)
    assert torch.equal(tiled[:, :, 3, 4], expected)
    assert torch.equal(tiled, expected[:, :, None, None].expand(2, 18, 5, 7))
    raw = tile_palette(palette, 4, normalize=False)
    assert torch.equal(raw[1, 3:6, 0, 0], palette[1, 1])
    permuted = tile_palette(palette[:, [1, 0, 2, 3, 4, 5]], (5, 7))
    assert not torch.equal(permuted, tiled)
    x = torch.zeros(2, 3, 5, 7)
    assert torch.cat([x, tiled], dim=1).shape == (2, 21, 5, 7)


def test_embedding_shapes_null_and_order() -> None:
    torch.manual_seed(0)
    emb = PaletteEmbedding(16)
    palette = extract_palette(toy_shapes(3, 16)[0], max_pixels=64)
    out = emb(palette)
    assert out.shape == (3, 16)
    assert out.dtype == torch.float32
    # the null embedding starts at zero and is learned
    assert torch.equal(emb(None, batch_size=2), torch.zeros(2, 16))
    assert emb.null_embedding.requires_grad
    with torch.no_grad():
        emb.null_embedding.fill_(0.25)
    mixed = emb(palette, torch.tensor([False, True, False]))
    torch.testing.assert_close(mixed[0], out[0])
    torch.testing.assert_close(mixed[1], torch.full((16,), 0.25))
    torch.testing.assert_close(emb(palette, torch.tensor([0.0, 1.0, 0.0])), mixed)
    # a null sample's output does not depend on its palette
    other = palette.clone()
    other[1] = 0.0
    torch.testing.assert_close(emb(other, torch.tensor([False, True, False])), mixed)
    # order matters to the MLP
    assert not torch.allclose(emb(palette[:, [1, 0, 2, 3, 4, 5]]), out)


def test_embedding_with_classifier_free_guidance() -> None:
    """The documented CFG recipe: a palette_null flag next to the palette, both batch 1 in null."""
    torch.manual_seed(0)
    emb = PaletteEmbedding(4)
    with torch.no_grad():
        emb.null_embedding.fill_(1.0)

    def model(
        x: torch.Tensor, t: torch.Tensor, *, palette: torch.Tensor, palette_null: torch.Tensor
    ) -> torch.Tensor:
        return x + emb(palette, palette_null)[:, :, None, None]

    palettes = torch.rand(2, 6, 3) * 50
    null = {"palette": torch.zeros(1, 6, 3), "palette_null": torch.ones(1, dtype=torch.bool)}
    cond = {"palette": palettes, "palette_null": torch.zeros(2, dtype=torch.bool)}
    x, t = torch.zeros(2, 4, 2, 2), torch.tensor([1, 2])
    with torch.no_grad():
        uncond = imgdiff.ClassifierFreeGuidance(model, 0.0, null)(x, t, **cond)
        full = imgdiff.ClassifierFreeGuidance(model, 1.0, null)(x, t, **cond)
        torch.testing.assert_close(uncond, torch.ones(2, 4, 2, 2))
        torch.testing.assert_close(full, model(x, t, **cond))


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 6, 4), (6, 3), (2, 18), (1, 2, 6, 3)])
def test_palette_shape_is_checked(shape: tuple[int, ...]) -> None:
    bad = torch.zeros(shape)
    with pytest.raises(IVE, match=r"palette: expected shape \(B, 6, 3\)"):
        tile_palette(bad, 4)
    with pytest.raises(IVE, match=r"palette: expected shape \(B, 6, 3\)"):
        PaletteEmbedding(8)(bad)


def test_bad_input_messages() -> None:
    good = torch.zeros(2, 6, 3)
    image = torch.zeros(1, 3, 4, 4)
    cases: list[tuple[type[Exception], str, object]] = [
        (ITE, "palette: expected a floating-point", lambda: tile_palette(good.long(), 4)),
        (ITE, "palette: expected a torch.Tensor", lambda: tile_palette([[0.0] * 3] * 6, 4)),
        (IVE, "size: expected an int >= 1", lambda: tile_palette(good, 0)),
        (ITE, "size: expected an int or a pair", lambda: tile_palette(good, (2, 3, 4))),
        (
            IVE,
            "images: expected shape \\(B, 3, H, W\\)",
            lambda: extract_palette(torch.zeros(1, 4, 4, 4)),
        ),
        (
            IVE,
            "images: expected a tensor with 4 dimensions",
            lambda: extract_palette(torch.zeros(3, 4, 4)),
        ),
        (ITE, "images: expected a floating-point", lambda: extract_palette(image.to(torch.uint8))),
        (IVE, "k: expected an int >= 1", lambda: extract_palette(image, 0)),
        (ITE, "k: expected an int", lambda: extract_palette(image, 2.5)),
        (
            IVE,
            "images: expected at least one pixel",
            lambda: extract_palette(torch.zeros(1, 3, 0, 4)),
        ),
        (IVE, "max_pixels: expected an int >= 1", lambda: extract_palette(image, max_pixels=0)),
        (IVE, "num_iters: expected an int >= 1", lambda: extract_palette(image, num_iters=0)),
        (IVE, "tol: expected a float >= 0", lambda: extract_palette(image, tol=-1.0)),
        (ITE, "return_weights: expected a bool", lambda: extract_palette(image, return_weights=1)),
        (IVE, "seed: expected an int <= ", lambda: extract_palette(image, seed=2**64)),
        (
            IVE,
            r"images: expected finite values, got 1 NaN",
            lambda: extract_palette(
                image.index_put((torch.tensor(0),) * 4, torch.tensor(float("nan")))
            ),
        ),
        (
            IVE,
            "images: expected 3 colour channels along dim 1",
            lambda: rgb_to_lab(torch.zeros(1, 4, 2, 2)),
        ),
        (IVE, "dim: expected a dimension of lab", lambda: lab_to_rgb(torch.zeros(3), dim=2)),
        (
            ITE,
            "lab: expected a floating-point",
            lambda: lab_to_rgb(torch.zeros(1, 3, 2, 2, dtype=torch.int64)),
        ),
        (IVE, "emb_dim: expected an int >= 1", lambda: PaletteEmbedding(0)),
        (IVE, "batch_size: expected the batch size", lambda: PaletteEmbedding(4)(None)),
        (IVE, "palette: expected batch 3", lambda: PaletteEmbedding(4)(good, batch_size=3)),
        (IVE, "null: expected shape \\(2,\\)", lambda: PaletteEmbedding(4)(good, torch.zeros(3))),
        (
            IVE,
            "null: expected a tensor with 1 dimensions",
            lambda: PaletteEmbedding(4)(good, torch.zeros(2, 1)),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()  # type: ignore[operator]


def test_constants() -> None:
    assert PALETTE_SIZE == 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extraction_on_cuda_matches_cpu() -> None:
    images, _ = toy_shapes(3, 32, seed=2)
    cpu, w_cpu = extract_palette(images, return_weights=True)
    gpu, w_gpu = extract_palette(images.cuda(), return_weights=True)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu)
    emb = PaletteEmbedding(8).cuda()
    assert emb(gpu, torch.tensor([True, False, True], device="cuda")).device.type == "cuda"


def test_embedding_feeds_the_mlp_the_normalised_colour_major_palette() -> None:
    """The MLP sees ``normalize_palette(p)`` flattened colour-major (L/100, a/128, b/128 per colour)."""
    torch.manual_seed(0)
    emb = PaletteEmbedding(8)
    palette = torch.rand(3, 6, 3, dtype=torch.float32) * torch.tensor([100.0, 200.0, 200.0])
    palette[..., 1:] -= 100.0
    flat = normalize_palette(palette).reshape(3, 18)
    assert torch.equal(flat[:, 3:6], palette[:, 1] / torch.tensor(LAB_SCALE))
    with torch.no_grad():
        torch.testing.assert_close(emb(palette), emb.mlp(flat))
        # a raw (un-normalised) palette would give another output: the scale is part of the contract
        assert not torch.allclose(emb(palette), emb.mlp(palette.reshape(3, 18)), atol=1e-3)


def test_palette_order_breaks_ties_by_lightness_then_a_then_b() -> None:
    """Equal cluster sizes are ordered by L, then a, then b, all descending (extract_palette's
    documented rule), checked on hand-made centres where L ties and a and b disagree."""
    from imgdiff.conditioning.palette import _palette_order

    centres = torch.tensor(
        [
            [
                [50.0, -10.0, 50.0],  # same L as the next; smaller a, larger b
                [50.0, 10.0, -50.0],
                [50.0, 10.0, 20.0],  # same L and a as the previous; larger b
                [70.0, -80.0, -80.0],  # lighter: first among the equal counts
                [20.0, 90.0, 90.0],  # darkest
                [10.0, 0.0, 0.0],  # largest cluster: first whatever its colour
            ]
        ],
        dtype=torch.float64,
    )
    counts = torch.tensor([[5.0, 5.0, 5.0, 5.0, 5.0, 9.0]], dtype=torch.float64)
    assert _palette_order(centres, counts).tolist() == [[5, 3, 2, 1, 0, 4]]


def test_weights_count_exactly_max_pixels_sampled_pixels() -> None:
    """With more pixels than ``max_pixels`` exactly ``max_pixels`` are clustered, so the weights
    are multiples of 1 / max_pixels summing to 1; with fewer, of 1 / (H W)."""
    images, _ = toy_shapes(2, 16, seed=1)  # 256 pixels each
    for max_pixels, n in ((37, 37), (50, 50), (1000, 256)):
        _, weights = extract_palette(images, k=4, max_pixels=max_pixels, return_weights=True)
        counts = weights.double() * n
        torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(2), rtol=0, atol=1e-6)
