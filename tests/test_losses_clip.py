"""CLIP losses (spec 7.2-7.4, LOSS-1/2/3/6): distances, image/text encoders, augmentations.

A tiny random open_clip model stands in for CLIP: every property checked here holds for any
weights.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from hypothesis import given, settings
from hypothesis import strategies as st

import imgdiff
from imgdiff.clip import (
    CLIPEncoder,
    WeightsUnavailableError,
    load_clip,
    register_clip_config,
    tiny_clip_config,
)
from imgdiff.losses import (
    CLIPAugment,
    CLIPDirectionalLoss,
    CLIPGlobalLoss,
    cosine_distance,
    diffusionclip_transform,
    directional_loss,
    spherical_distance,
)

pytest.importorskip("open_clip")

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError
TINY = "imgdiff-test-tiny"


@pytest.fixture(scope="module")
def encoder() -> CLIPEncoder:
    register_clip_config(TINY, tiny_clip_config())
    return CLIPEncoder(load_clip(TINY, seed=0))


def _images(B: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1


# -- LOSS-1: spherical distance ---------------------------------------------------------------


def test_spherical_distance_identical_orthogonal_antipodal() -> None:
    e = torch.eye(4, dtype=torch.float64)
    assert spherical_distance(e[0], e[0]).item() == pytest.approx(0.0, abs=1e-12)
    assert spherical_distance(e[0], e[1]).item() == pytest.approx(math.pi**2 / 8, abs=1e-6)
    assert spherical_distance(e[0], -e[0]).item() == pytest.approx(math.pi**2 / 2, abs=1e-6)


def test_spherical_distance_is_half_the_squared_angle() -> None:
    a, b = torch.randn(2, 64, 16, dtype=torch.float64)
    theta = torch.arccos(F.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(spherical_distance(a, b), theta**2 / 2)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 100.0), st.floats(0.01, 100.0), st.integers(0, 1000))
def test_clip_distances_are_scale_invariant(sa: float, sb: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    for dist in (spherical_distance, cosine_distance, directional_loss):
        torch.testing.assert_close(dist(sa * a, sb * b), dist(a, b))


def test_spherical_distance_gradient_is_finite_at_equal_directions() -> None:
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    spherical_distance(a, a.detach() * 2).sum().backward()
    assert a.grad is not None
    assert torch.isfinite(a.grad).all()
    assert a.grad.abs().max() < 1e-6


# -- LOSS-2, LOSS-3: directional loss and DiffusionCLIP's transform --------------------------------


def test_directional_loss_parallel_antiparallel() -> None:
    d = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(directional_loss(d, 3 * d), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(directional_loss(d, -d), torch.full((5,), 2.0, dtype=torch.float64))
    # one text direction for the whole batch
    torch.testing.assert_close(
        directional_loss(d[:1].expand(5, -1), d[0]), torch.zeros(5, dtype=torch.float64)
    )


def test_diffusionclip_transform() -> None:
    values = diffusionclip_transform(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert values[0].item() == pytest.approx(0.0, abs=1e-12)
    assert values[1].item() == pytest.approx(math.log(2), abs=1e-12)


def test_nada_zero_direction_guard_fires_at_x_equal_y(encoder: CLIPEncoder) -> None:
    # e(y) is taken without autograd, where torch's attention takes another kernel: at x == y
    # e^(x) - e^(y) is float noise (~1e-7), not 0, so a guard testing the embeddings never fired
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in encoder.clip.model.modules())
    texts = ("photo", "sketch")
    guarded = CLIPDirectionalLoss(encoder, *texts, templates=["a {}."], reduction="none")
    plain = CLIPDirectionalLoss(
        encoder, *texts, templates=["a {}."], reduction="none", zero_direction_guard=False
    )
    y = _images(2)
    y[1] = _images(1, seed=11)[0]
    x = y.clone()
    x[1] += 0.05  # image 0 unedited, image 1 edited
    x.requires_grad_(True)
    value = guarded(x, y)
    unguarded = plain(x, y)
    # NADA: Delta_I = e^(x + 1e-6) - e^(y), where e^(y) = e^(x) (one evaluation)
    u_x = F.normalize(encoder.encode_image(x), dim=-1).detach()
    d_i = F.normalize(encoder.encode_image(x + 1e-6), dim=-1) - u_x
    expected = 1 - F.cosine_similarity(d_i[:1], guarded.text_direction[None], dim=-1)
    torch.testing.assert_close(value[:1], expected, rtol=1e-4, atol=1e-5)
    assert abs(value[0].item() - unguarded[0].item()) > 1e-3  # the guard changed the result
    torch.testing.assert_close(value[1], unguarded[1])  # an edited image is left alone
    value.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # with paired (non-patch) augmentations x == y gives equal views: the guard fires per copy
    aug = CLIPAugment(n_patch=2, output_size=32)
    with_aug = [
        CLIPDirectionalLoss(encoder, *texts, augment=aug, zero_direction_guard=g)(
            y.clone().requires_grad_(True), y, generator=torch.Generator().manual_seed(0)
        )
        for g in (True, False)
    ]
    assert abs(with_aug[0].item() - with_aug[1].item()) > 1e-3


def test_nada_directional_loss_equals_its_formula(encoder: CLIPEncoder) -> None:
    templates = ["a photo of a {}.", "a drawing of a {}."]
    loss = CLIPDirectionalLoss(
        encoder, "dog", "cat", variant="nada", templates=templates, reduction="none"
    )
    x, y = _images(3, seed=1), _images(3, seed=2)
    t = [
        F.normalize(encoder.encode_text([s.format(w) for s in templates]), dim=-1)
        for w in ("dog", "cat")
    ]
    d_t = F.normalize((t[1] - t[0]).mean(0), dim=-1)
    d_i = F.normalize(encoder.encode_image(x), dim=-1) - F.normalize(
        encoder.encode_image(y), dim=-1
    )
    expected = 1 - F.cosine_similarity(d_i, d_t[None], dim=-1)
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-5, atol=1e-6)


def test_zecon_directional_loss_differences_raw_embeddings(encoder: CLIPEncoder) -> None:
    loss = CLIPDirectionalLoss(encoder, "photo", "painting", variant="zecon", reduction="none")
    x, y = _images(2, seed=3), _images(2, seed=4)
    d_t = encoder.encode_text(["painting"])[0] - encoder.encode_text(["photo"])[0]
    d_i = encoder.encode_image(x) - encoder.encode_image(y)
    expected = 1 - F.cosine_similarity(d_i, d_t[None], dim=-1)
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-5, atol=1e-6)
    # texts or their embeddings: the same loss
    given_emb = CLIPDirectionalLoss(
        encoder,
        encoder.encode_text(["photo"])[0],
        encoder.encode_text(["painting"])[0],
        variant="zecon",
        reduction="none",
    )
    torch.testing.assert_close(given_emb(x, y), expected, rtol=1e-5, atol=1e-6)


def test_nada_given_embeddings_are_what_a_text_gives(encoder: CLIPEncoder) -> None:
    templates = ["a photo of a {}.", "a drawing of a {}."]
    x, y = _images(2, seed=12), _images(2, seed=13)
    by_text = CLIPDirectionalLoss(encoder, "dog", "cat", templates=templates, reduction="none")
    src, tgt = (encoder.text_embedding(w, templates) for w in ("dog", "cat"))
    by_emb = CLIPDirectionalLoss(encoder, src, tgt, reduction="none")
    torch.testing.assert_close(by_emb(x, y), by_text(x, y))
    # templates cannot apply to an embedding: refused, not ignored
    with pytest.raises(IVE, match="templates: prompt templates apply to texts, but source_text"):
        CLIPDirectionalLoss(encoder, src, tgt, templates=templates)
    with pytest.raises(IVE, match="templates: prompt templates apply to texts, but target "):
        CLIPGlobalLoss(encoder, tgt, templates=templates)
    # a raw embedding (norm > 1) is not NADA's mean of unit template embeddings
    raw = encoder.encode_text(["dog"])[0]
    assert raw.norm() > 1.5
    with pytest.raises(IVE, match="source_text: for variant='nada' expected the mean of unit"):
        CLIPDirectionalLoss(encoder, raw, tgt)
    CLIPDirectionalLoss(encoder, raw, tgt, variant="zecon")  # raw embeddings: ZeCon's
    # the loss keeps a copy: changing the given tensor afterwards changes nothing
    given = tgt.clone()
    loss = CLIPDirectionalLoss(encoder, src, given, reduction="none")
    before = loss(x, y)
    given.zero_()
    torch.testing.assert_close(loss(x, y), before)


def test_directional_gradient_reaches_only_the_edited_image(encoder: CLIPEncoder) -> None:
    loss = CLIPDirectionalLoss(encoder, "photo", "painting", variant="zecon")
    x = _images(2, seed=5).requires_grad_(True)
    y = _images(2, seed=6).requires_grad_(True)
    loss(x, y).backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0
    assert y.grad is None


# -- the image encoder -------------------------------------------------------------------------


def test_image_preprocessing_matches_clip_normalisation(encoder: CLIPEncoder) -> None:
    x = _images(2, size=32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(x), ((x + 1) / 2 - mean) / std)
    pooled = CLIPEncoder(encoder.clip, resize="pool").preprocess(_images(2, size=64))
    assert pooled.shape == (2, 3, 32, 32)
    wide = encoder.preprocess(_images(1, size=64)[..., :48])  # (1, 3, 64, 48) -> centre crop
    assert wide.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "size", [(48, 64), (45, 64), (40, 70), (64, 48), (64, 45), (70, 40), (32, 48), (33, 33)]
)
def test_resize_is_open_clips_eval_transform(encoder: CLIPEncoder, size: tuple[int, int]) -> None:
    """resize="resize" = open_clip's (CLIP's) Resize(S, bicubic, antialias) + CenterCrop(S)."""
    pytest.importorskip("torchvision")
    import open_clip
    import open_clip.transform as oct

    cfg = oct.PreprocessCfg(**open_clip.get_model_preprocess_cfg(encoder.clip.model))
    transform = oct.image_transform_v2(cfg, is_train=False)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    expected = torch.stack([transform(image) for image in images])  # tensors in [0, 1]
    torch.testing.assert_close(encoder.preprocess(images * 2 - 1), expected)


def test_global_loss_gradients_reach_the_pixels(encoder: CLIPEncoder) -> None:
    for metric in ("spherical", "cosine"):
        loss = CLIPGlobalLoss(encoder, "a cat", metric=metric)
        x = _images(2, size=48).requires_grad_(True)
        loss(x).backward()
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_global_loss_is_the_distance_to_the_text_and_scale_invariant(encoder: CLIPEncoder) -> None:
    x = _images(3, seed=7)
    text = encoder.encode_text(["a cat"])[0]
    expected = spherical_distance(encoder.encode_image(x), text)
    by_text = CLIPGlobalLoss(encoder, "a cat", reduction="none")
    by_scaled_embedding = CLIPGlobalLoss(encoder, 7.5 * text, reduction="none")
    torch.testing.assert_close(by_text(x), expected)
    torch.testing.assert_close(by_scaled_embedding(x), expected)
    torch.testing.assert_close(CLIPGlobalLoss(encoder, "a cat")(x), expected.sum())
    torch.testing.assert_close(
        CLIPGlobalLoss(encoder, "a cat", reduction="mean")(x), expected.mean()
    )


def test_global_loss_averages_each_images_own_copies(encoder: CLIPEncoder) -> None:
    # p = 0 and no patches: every copy of image b is image b, so each image's mean over its copies
    # is its unaugmented loss; copies taken from the wrong rows would mix the two images.
    x = _images(2, seed=8)
    plain = CLIPGlobalLoss(encoder, "a cat", reduction="none")(x)
    same = CLIPAugment(n_patch=3, p=0.0, output_size=32)
    augmented = CLIPGlobalLoss(encoder, "a cat", augment=same, reduction="none")(x)
    torch.testing.assert_close(augmented, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain[0], plain[1])


def test_text_embedding_averages_unit_template_embeddings(encoder: CLIPEncoder) -> None:
    templates = ["a photo of a {}.", "a sketch of a {}."]
    emb = encoder.text_embedding("cat", templates)
    each = F.normalize(encoder.encode_text(["a photo of a cat.", "a sketch of a cat."]), dim=-1)
    torch.testing.assert_close(emb, each.mean(0))
    with pytest.raises(IVE, match=r"templates\[0\]"):
        encoder.text_embedding("cat", ["no placeholder"])


# -- LOSS-6: augmentations ---------------------------------------------------------------------


def test_patch_augmenter_shapes_and_global_repeat() -> None:
    x = _images(2, size=256)
    aug = CLIPAugment(n_patch=4, patch=True)
    assert aug(x, generator=torch.Generator().manual_seed(0)).shape == (8, 3, 224, 224)
    big = _images(2, size=448)
    repeated = CLIPAugment(n_patch=3, patch=True)(big, is_global=True)
    assert repeated.shape == (6, 3, 224, 224)
    pooled = F.avg_pool2d(big, 2)
    for b in range(2):
        for copy in repeated[b::2]:
            torch.testing.assert_close(copy, pooled[b])


def test_augmenter_without_warps_is_the_identity_copy_major() -> None:
    x = _images(3, size=32)
    out = CLIPAugment(n_patch=2, p=0.0, output_size=32)(x)
    torch.testing.assert_close(out, x.repeat(2, 1, 1, 1))


def test_patch_crops_have_the_requested_area_and_lie_inside() -> None:
    aug = CLIPAugment(n_patch=64, patch=True, patch_min=0.05, patch_max=0.2, p=0.0, patch_size=16)
    grid, inside = aug.sampling_grid(64, 100, 100, generator=torch.Generator().manual_seed(1))
    assert bool(inside.all())
    lo, hi = grid.amin(dim=(1, 2)), grid.amax(dim=(1, 2))  # (N, 2) extents of pixel centres
    assert bool((lo >= -1).all() and (hi <= 1).all())
    # the crop spans (hi - lo) * n / (n - 1) in normalised units (pixel centres are inset)
    span = (hi - lo) * 16 / 15 / 2
    area = span.prod(dim=-1)
    assert bool((area > 0.05 - 1e-3).all() and (area < 0.2 + 1e-3).all())


def test_augmentations_are_random_reproducible_and_differentiable() -> None:
    x = _images(2, size=64).requires_grad_(True)
    aug = CLIPAugment(n_patch=3, output_size=64)
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[2])  # two copies of image 0 differ
    a.sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


def test_perspective_pads_with_zeros_and_affine_with_the_border() -> None:
    x = torch.ones(1, 3, 32, 32)
    persp = CLIPAugment(n_patch=8, output_size=32, degrees=0.0, translate=0.0, distortion=0.7)
    out = persp(x, generator=torch.Generator().manual_seed(0))
    assert float(out.min()) == 0.0  # corners outside the warped image
    affine = CLIPAugment(n_patch=8, output_size=32, distortion=0.0)
    torch.testing.assert_close(
        affine(x, generator=torch.Generator().manual_seed(0)), x.repeat(8, 1, 1, 1)
    )


def test_paired_augmentations_share_parameters(encoder: CLIPEncoder) -> None:
    # non-patch directional loss: x and y get the same warps, so x == y gives no direction
    aug = CLIPAugment(n_patch=2, output_size=32)
    loss = CLIPDirectionalLoss(encoder, "a", "b", variant="zecon", augment=aug, reduction="none")
    y = _images(2, seed=9)
    value = loss(y.clone(), y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(value, torch.ones(2))  # 1 - cos(0, d) = 1 for a zero direction


# -- bad input and offline ---------------------------------------------------------------------


def test_bad_input(encoder: CLIPEncoder) -> None:
    with pytest.raises(IVE, match="metric"):
        CLIPGlobalLoss(encoder, "cat", metric="euclid")  # type: ignore[arg-type]
    with pytest.raises(IVE, match="variant"):
        CLIPDirectionalLoss(encoder, "a", "b", variant="clip")  # type: ignore[arg-type]
    with pytest.raises(IVE, match="reduction"):
        CLIPGlobalLoss(encoder, "cat", reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ITE, match="encoder"):
        CLIPGlobalLoss(object(), "cat")  # type: ignore[arg-type]
    with pytest.raises(IVE, match="templates"):
        CLIPDirectionalLoss(encoder, "a", "b", variant="zecon", templates=["a {}"])
    with pytest.raises(IVE, match="target"):
        CLIPGlobalLoss(encoder, torch.zeros(2, 32))
    # embedding widths against the encoder's (D = 32), named by argument
    assert encoder.embed_dim == 32
    with pytest.raises(IVE, match=r"target: expected a text or a \(32,\) floating embedding"):
        CLIPGlobalLoss(encoder, torch.randn(16))
    with pytest.raises(IVE, match=r"source_text: expected a text or a \(32,\)"):
        CLIPDirectionalLoss(encoder, torch.randn(16), torch.randn(32), variant="zecon")
    with pytest.raises(IVE, match=r"target_text: expected a text or a \(32,\)"):
        CLIPDirectionalLoss(encoder, "a", torch.randn(16), variant="zecon")
    with pytest.raises(IVE, match="target: expected a finite embedding"):
        CLIPGlobalLoss(encoder, torch.full((32,), float("nan")))
    loss = CLIPGlobalLoss(encoder, "cat")
    with pytest.raises(
        IVE, match=r"x: expected a non-empty tensor \(no dimension of size 0\), got shape \(0, 3"
    ):
        loss(torch.zeros(0, 3, 32, 32))
    with pytest.raises(
        IVE, match=r"x: expected a non-empty tensor \(no dimension of size 0\), got shape \(0, 3"
    ):
        CLIPDirectionalLoss(encoder, "a", "b")(torch.zeros(0, 3, 32, 32), torch.zeros(0, 3, 32, 32))
    with pytest.raises(IVE, match=r"x: expected \(B, 3, H, W\)"):
        loss(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ITE, match="x"):
        loss(torch.zeros(1, 3, 32, 32, dtype=torch.long))
    d = CLIPDirectionalLoss(encoder, "a", "b")
    with pytest.raises(IVE, match="y"):
        d(_images(2), _images(3))
    with pytest.raises(IVE, match="b: expected embeddings of width"):
        spherical_distance(torch.ones(2, 4), torch.ones(5))
    with pytest.raises(IVE, match="n_patch"):
        CLIPAugment(n_patch=0)
    with pytest.raises(IVE, match="patch_max"):
        CLIPAugment(patch_min=0.5, patch_max=0.1)
    with pytest.raises(IVE, match="resize"):
        CLIPEncoder(encoder.clip, resize="crop")  # type: ignore[arg-type]


def test_clip_encoder_offline_error_is_fast_and_clear(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, network_attempts: list[object]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="offline") as info:
        CLIPEncoder.load("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert network_attempts == []  # fast because nothing was tried
    assert "cache_dir" in str(info.value)


def test_patch_directional_loss_uses_the_whole_source_image(encoder: CLIPEncoder) -> None:
    """Spec 7.4: with patches the direction is e(patch(x)) - e(whole(y)), the source not cropped."""
    aug = CLIPAugment(n_patch=3, patch=True, patch_min=0.1, patch_max=0.3, output_size=32)
    loss = CLIPDirectionalLoss(encoder, "photo", "sketch", variant="zecon", augment=aug)
    loss_none = replace(loss, reduction="none")
    x, y = _images(2, size=48, seed=11), _images(2, size=48, seed=12)
    value = loss_none(x, y, generator=torch.Generator().manual_seed(4))
    x_views = aug(x, generator=torch.Generator().manual_seed(4))
    y_views = aug(y, is_global=True)  # the whole source, repeated and pooled
    torch.testing.assert_close(y_views, F.adaptive_avg_pool2d(y, 32).repeat(3, 1, 1, 1))
    with torch.no_grad():
        d_i = encoder.encode_image(x_views) - encoder.encode_image(y_views)
    d_t = encoder.encode_text(["sketch"])[0] - encoder.encode_text(["photo"])[0]
    per_copy = 1 - F.cosine_similarity(d_i, d_t[None], dim=-1)
    expected = per_copy.reshape(3, 2).mean(dim=0)  # copy-major: image b's copies are rows b::B
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    summed = loss(x, y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(summed, expected.sum(), rtol=1e-5, atol=1e-6)


def test_affine_rotation_is_within_degrees() -> None:
    """Without translation and perspective the grid is a rotation by an angle in [-degrees, degrees]."""
    aug = CLIPAugment(n_patch=1, degrees=10.0, translate=0.0, distortion=0.0, output_size=8)
    N, n = 200, 8
    grid, inside = aug.sampling_grid(N, n, n, generator=torch.Generator().manual_seed(0))
    assert bool(inside.all())
    base = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    gy, gx = torch.meshgrid(base, base, indexing="ij")
    ref = torch.stack([gx, gy], dim=-1)
    # a pixel centre at radius < 0.5 stays inside [-1, 1] under any rotation (no clamping)
    i, j = 3, 5
    p, q = ref[i, j], grid[:, i, j]
    torch.testing.assert_close(q.norm(dim=-1), p.norm().expand(N))  # a rotation keeps radii
    angle = torch.atan2(q[:, 1], q[:, 0]) - torch.atan2(p[1], p[0])
    angle = torch.rad2deg(torch.remainder(angle + math.pi, 2 * math.pi) - math.pi)
    assert float(angle.abs().max()) <= 10.0 + 1e-3
    assert float(angle.max()) > 8.0
    assert float(angle.min()) < -8.0


def test_embedding_shapes_are_refused_unless_equal_or_a_trailing_part() -> None:
    """``b`` is ``a``'s shape or a trailing part of it (one embedding for all rows): a ``(1, D)``
    row is not broadcast, and other batch shapes are refused by name."""
    a = torch.randn(3, 8)
    for bad in (torch.randn(1, 8), torch.randn(2, 8), torch.randn(3, 1, 8)):
        for dist in (spherical_distance, cosine_distance):
            with pytest.raises(IVE, match=r"b: expected shape \(3, 8\) or a trailing part"):
                dist(a, bad)
        with pytest.raises(IVE, match=r"text_direction: expected shape \(3, 8\)"):
            directional_loss(a, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spherical_distance_gradient_is_finite_at_opposite_directions(dtype: torch.dtype) -> None:
    """Opposite directions: ``pi^2 / 2`` with a finite gradient (arcsin clamped at 1; its
    derivative is infinite there)."""
    g = torch.Generator().manual_seed(20)
    a = torch.randn(64, 16, generator=g, dtype=dtype).requires_grad_(True)
    d = spherical_distance(a, -3.0 * a.detach())
    atol = 5e-3 if dtype == torch.float32 else 1e-6  # float32 chords lose ~sqrt(eps) here
    torch.testing.assert_close(d, torch.full_like(d, math.pi**2 / 2), rtol=0.0, atol=atol)
    d.sum().backward()
    assert a.grad is not None
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spherical_distance_gradient_is_zero_at_exactly_opposite_directions(
    dtype: torch.dtype,
) -> None:
    """Exactly opposite directions (half chord exactly 1): ``pi^2 / 2`` and a zero
    gradient on every torch version (clamp_max passed the gradient at its bound, where arcsin's
    is infinite, in torch 2.11 and earlier: NaN)."""
    a = torch.zeros(3, 8, dtype=dtype)
    a[0, 0], a[1, 3], a[2, :4] = 1.0, 2.0, 0.5  # unit directions in floating point: chords 2
    a.requires_grad_(True)
    d = spherical_distance(a, -a.detach())
    torch.testing.assert_close(d, torch.full_like(d, math.pi**2 / 2))  # to rounding
    d.sum().backward()
    assert a.grad is not None
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_nada_refuses_a_given_embedding_just_above_unit_norm(encoder: CLIPEncoder) -> None:
    """NADA's text embeddings are means of unit vectors (norm <= 1): a given embedding of norm 1
    or less is taken, one of norm 1.01 is refused."""
    src, tgt = F.normalize(encoder.encode_text(["dog", "cat"]), dim=-1)
    CLIPDirectionalLoss(encoder, src, tgt)
    CLIPDirectionalLoss(encoder, 0.5 * src, tgt)
    with pytest.raises(IVE, match="target_text: for variant='nada' expected the mean of unit"):
        CLIPDirectionalLoss(encoder, src, 1.01 * tgt)


def test_nada_guard_gradient_holds_the_source_embedding_constant(encoder: CLIPEncoder) -> None:
    """At ``x == y`` NADA's ``Delta_I = e^(x + 1e-6) - e^(y)`` with ``e^(y)`` a constant: the
    gradient is that of the formula written out with the source side detached."""
    loss = CLIPDirectionalLoss(encoder, "photo", "sketch", templates=["a {}."])
    y = _images(2, seed=21)
    x = y.clone().requires_grad_(True)
    loss(x, y).backward()
    ref = y.clone().requires_grad_(True)
    u_y = F.normalize(encoder.encode_image(ref), dim=-1).detach()  # the autograd evaluation
    d_i = F.normalize(encoder.encode_image(ref + 1e-6), dim=-1) - u_y
    (1 - F.cosine_similarity(d_i, loss.text_direction[None], dim=-1)).sum().backward()
    assert x.grad is not None
    assert ref.grad is not None
    scale = float(ref.grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-3, atol=1e-3 * scale)


def test_directional_loss_without_patches_refuses_a_source_of_another_size(
    encoder: CLIPEncoder,
) -> None:
    """Without patches the direction compares ``x`` and ``y`` view for view, so the source must
    have the edited image's shape (the encoder would otherwise resize both silently)."""
    x, y = _images(2, size=32), _images(2, size=48)
    for augment in (None, CLIPAugment(n_patch=2, output_size=32)):
        loss = CLIPDirectionalLoss(encoder, "photo", "sketch", augment=augment)
        with pytest.raises(IVE, match=r"y: expected shape \(2, 3, 32, 32\)"):
            loss(x, y)


def test_nada_guard_leaves_a_partly_edited_image_alone(encoder: CLIPEncoder) -> None:
    """The guard is for views equal in every pixel: an image edited in one region only is an
    edit, and gets the unguarded value."""
    guarded = CLIPDirectionalLoss(encoder, "photo", "sketch", templates=["a {}."], reduction="none")
    plain = replace(guarded, zero_direction_guard=False)
    y = _images(2, seed=22)
    x = y.clone()
    x[:, :, :8] += 0.3  # the top quarter edited, the rest equal to the source
    torch.testing.assert_close(guarded(x, y), plain(x, y))


def _pixel_centres(h: int, w: int) -> torch.Tensor:
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)  # (h, w, 2) in grid_sample's (x, y) order


def test_affine_translation_is_up_to_translate_of_the_size() -> None:
    """Without rotation and perspective the grid is a shift by up to ``translate`` of the image
    size per axis, i.e. ``2 translate`` in [-1, 1] coordinates, both ways."""
    aug = CLIPAugment(n_patch=1, degrees=0.0, translate=0.1, distortion=0.0, output_size=8)
    grid, inside = aug.sampling_grid(400, 8, 8, generator=torch.Generator().manual_seed(23))
    assert bool(inside.all())
    # a pixel near the centre is never clamped: its displacement is the shift
    shift = grid[:, 3, 4] - _pixel_centres(8, 8)[3, 4]
    torch.testing.assert_close(grid[:, 4, 3] - _pixel_centres(8, 8)[4, 3], shift)
    assert float(shift.abs().max()) <= 0.2 + 1e-6
    assert bool((shift.amax(dim=0) > 0.18).all())
    assert bool((shift.amin(dim=0) < -0.18).all())


def test_affine_rotation_keeps_pixel_distances_on_a_non_square_image() -> None:
    """The rotation acts on pixels, not on [-1, 1] coordinates: on an 8 x 16 image a sampled
    point is as far from the centre, in pixels, as its output pixel."""
    H, W, N = 8, 16, 200
    aug = CLIPAugment(n_patch=1, degrees=30.0, translate=0.0, distortion=0.0, output_size=8)
    grid, _ = aug.sampling_grid(N, H, W, generator=torch.Generator().manual_seed(24))
    pixels = torch.tensor([W / 2, H / 2])
    i, j = 2, 10  # 1.5 px above and 2.5 px right of the centre: never clamped (radius < 4)
    radius = (_pixel_centres(H, W)[i, j] * pixels).norm()
    torch.testing.assert_close((grid[:, i, j] * pixels).norm(dim=-1), radius.expand(N))


def test_affine_border_padding_stays_inside_the_patch() -> None:
    """In patch mode the affine map's border padding clamps to the crop, so no sampled point
    leaves it: the extent of the samples never exceeds the crop's area (here 0.1 of the image)."""
    aug = CLIPAugment(
        n_patch=1, patch=True, patch_min=0.1, patch_max=0.1, patch_size=16, distortion=0.0
    )
    grid, _ = aug.sampling_grid(128, 64, 64, generator=torch.Generator().manual_seed(25))
    lo, hi = grid.amin(dim=(1, 2)), grid.amax(dim=(1, 2))
    area = ((hi - lo) / 2).prod(dim=-1)  # fraction of the image's area
    assert float(area.max()) <= 0.1 + 1e-5
    assert float(area.min()) > 0.05


def test_patch_aspect_ratios_lie_in_three_quarters_to_four_thirds() -> None:
    """Crops have width/height log-uniform in [3/4, 4/3] (torchvision's RandomResizedCrop),
    measured on the pixel grid of a non-square image."""
    H, W, n = 100, 140, 16
    aug = CLIPAugment(n_patch=1, patch=True, patch_min=0.05, patch_max=0.2, p=0.0, patch_size=n)
    grid, _ = aug.sampling_grid(512, H, W, generator=torch.Generator().manual_seed(26))
    span = grid.amax(dim=(1, 2)) - grid.amin(dim=(1, 2))  # (N, 2); the same n / (n - 1) inset
    ratio = span[:, 0] * W / (span[:, 1] * H)
    assert float(ratio.min()) >= 0.75 - 1e-4
    assert float(ratio.max()) <= 4 / 3 + 1e-4
    assert float(ratio.min()) < 0.78
    assert float(ratio.max()) > 1.28
    assert abs(float(ratio.log().median())) < 0.05  # log-uniform: symmetric about 1


def test_perspective_keeps_the_expected_area() -> None:
    """Corners move inward by U(0, distortion) of the half-size per axis (torchvision's
    RandomPerspective): the warped image always covers the central square ``|x|, |y| <= 1 - d``
    and, its area being bilinear in independent corner coordinates, ``(1 - d/2)^2`` of the
    output on average."""
    d = 0.6
    aug = CLIPAugment(n_patch=1, degrees=0.0, translate=0.0, distortion=d, output_size=64)
    _, inside = aug.sampling_grid(512, 64, 64, generator=torch.Generator().manual_seed(27))
    covered = inside.mean(dim=(1, 2, 3))
    centres = _pixel_centres(64, 64)
    core = (centres.abs() <= 1 - d).all(dim=-1)  # the square every moved corner leaves free
    assert bool(inside[:, 0][:, core].all())
    assert float(covered.mean()) == pytest.approx((1 - d / 2) ** 2, abs=0.02)


def test_a_text_direction_at_rounding_level_is_refused(encoder: CLIPEncoder) -> None:
    """Embeddings that differ by float rounding (4e-7 of the norm) give no text direction, only
    noise to normalise: refused like equal texts, not just an exactly zero difference."""
    e = encoder.encode_text(["a photo"])[0]
    near = e.clone()
    near[0] += 4e-7 * float(e.norm())
    assert not torch.equal(near, e)
    with pytest.raises(IVE, match="target_text: expected another text"):
        CLIPDirectionalLoss(encoder, e, near, variant="zecon")
