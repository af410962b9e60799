"""Bad input to the losses, metrics, conditioning adapters and degradations (found by a review).

Empty tensors, tensors on another device than their partner, wrong types inside adapters and
degenerate texts each raise an imgdiff error naming the argument; never a raw torch error deep
inside, a silent NaN or a loss that is a constant. The "other device" is torch's ``meta`` device,
which every machine has.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import imgdiff
from imgdiff.clip import CLIPEncoder, load_clip, register_clip_config, tiny_clip_config
from imgdiff.conditioning import (
    ClassifierFreeGuidance,
    ConcatConditioning,
    KnownRegion,
    NoiseLevelConditioning,
    PaletteEmbedding,
    rescale_guidance,
    sd_inpaint_input,
)
from imgdiff.degradations import to_grayscale, with_luma
from imgdiff.images import image_grid
from imgdiff.losses import (
    CLIPAugment,
    CLIPDirectionalLoss,
    CLIPGlobalLoss,
    ZeroShotContrastiveLoss,
    denoising_loss,
    diffusionclip_transform,
    masked_denoising_loss,
    normal_kl,
    patch_nce_loss,
    vlb_term,
)
from imgdiff.metrics import psnr, ssim

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError
META = "meta"
S = imgdiff.NoiseSchedule.linear()


def _z(*shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(*shape, device=device)


EMPTY_CASES: list[tuple[Callable[[], object], str]] = [
    (
        lambda: denoising_loss(_z(0, 3, 8, 8), _z(0, 3, 8, 8)),
        r"^model_output: expected a non-empty",
    ),
    (
        lambda: denoising_loss(_z(2, 3, 0, 4), _z(2, 3, 0, 4)),
        r"^model_output: expected a non-empty",
    ),
    (
        lambda: masked_denoising_loss(_z(0, 3, 8, 8), _z(0, 3, 8, 8), _z(0, 1, 8, 8)),
        r"^model_output: expected a non-empty",
    ),
    (
        lambda: vlb_term(S, _z(0, 6, 4, 4), _z(0, 3, 4, 4), _z(0, 3, 4, 4), torch.zeros(0).long()),
        r"^x0: expected a non-empty",
    ),
    (lambda: psnr(_z(0, 3, 8, 8), _z(0, 3, 8, 8)), r"^preds: expected a non-empty"),
    (lambda: psnr(_z(1, 3, 0, 8), _z(1, 3, 0, 8)), r"^preds: expected a non-empty"),
    (lambda: ssim(_z(1, 0, 8, 8), _z(1, 0, 8, 8)), r"^preds: expected a non-empty"),
    (lambda: patch_nce_loss(_z(0, 4, 8), _z(0, 4, 8)), r"^query: expected at least one image"),
    (lambda: CLIPAugment(n_patch=2)(_z(1, 3, 0, 8)), r"^x: expected a non-empty"),
    (lambda: image_grid(_z(2, 3, 0, 4)), r"^images: expected at least one image of at least 1x1"),
]


@pytest.mark.parametrize(("fn", "pattern"), EMPTY_CASES)
def test_empty_tensors_are_refused_by_name(fn: Callable[[], object], pattern: str) -> None:
    with pytest.raises(IVE, match=pattern):
        fn()


def test_empty_batches_pass_through_the_palette_embedding() -> None:
    """A batch of 0 palettes embeds to ``(0, D)``, as ``batch_size=0`` without a palette does."""
    pe = PaletteEmbedding(8)
    assert pe(_z(0, 6, 3)).shape == (0, 8)
    assert pe(None, batch_size=0).shape == (0, 8)


def test_contrastive_loss_refuses_an_empty_batch() -> None:
    loss = ZeroShotContrastiveLoss(extractor=lambda x: [x], layers=(0,), num_patches=4)
    with pytest.raises(IVE, match=r"^x: expected a non-empty"):
        loss(_z(0, 3, 8, 8), _z(0, 3, 8, 8))
    with pytest.raises(IVE, match=r"^y: expected a tensor on x's device cpu, got meta"):
        loss(_z(1, 3, 8, 8), _z(1, 3, 8, 8, device=META))


DEVICE_CASES: list[tuple[Callable[[], object], str]] = [
    (lambda: denoising_loss(_z(2, 3, 4, 4), _z(2, 3, 4, 4, device=META)), r"^target: .* got meta"),
    (
        lambda: masked_denoising_loss(_z(2, 3, 4, 4), _z(2, 3, 4, 4), _z(2, 1, 4, 4, device=META)),
        r"^mask: expected a tensor on model_output's device cpu, got meta",
    ),
    (
        lambda: vlb_term(S, _z(2, 6, 4, 4, device=META), _z(2, 3, 4, 4), _z(2, 3, 4, 4), 5),
        r"^model_output: expected a tensor on x0's device cpu, got meta",
    ),
    (lambda: psnr(_z(1, 3, 8, 8), _z(1, 3, 8, 8, device=META)), r"^target: .* got meta"),
    (lambda: ssim(_z(1, 3, 8, 8), _z(1, 3, 8, 8, device=META)), r"^target: .* got meta"),
    (
        lambda: normal_kl(_z(2, 3), _z(2, 3), _z(2, 3, device=META), 0.0),
        r"^mean2: expected a tensor on mean1's device cpu, got meta",
    ),
    (
        lambda: sd_inpaint_input(_z(1, 4, 8, 8), _z(1, 1, 8, 8, device=META), _z(1, 4, 8, 8)),
        r"^mask: expected a tensor on latents's device cpu, got meta",
    ),
    (
        lambda: rescale_guidance(_z(1, 3, 4, 4), _z(1, 3, 4, 4, device=META), 0.5),
        r"^cond: expected a tensor on guided's device cpu, got meta",
    ),
    (
        lambda: with_luma(_z(1, 3, 8, 8), _z(1, 3, 8, 8, device=META)),
        r"^gray: expected a tensor on images's device cpu, got meta",
    ),
]


@pytest.mark.parametrize(("fn", "pattern"), DEVICE_CASES)
def test_partners_on_another_device_are_refused_by_name(
    fn: Callable[[], object], pattern: str
) -> None:
    with pytest.raises(IVE, match=pattern):
        fn()


def test_diffusionclip_transform_never_gives_nan() -> None:
    """A cosine distance rounded just past 2 (or below 0) is clamped to [0, 2]: inf, not NaN."""
    d = torch.tensor([-1e-7, 0.0, 1.0, 2.0, torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))])
    out = diffusionclip_transform(d)
    assert not bool(out.isnan().any())
    torch.testing.assert_close(out[:3], torch.tensor([0.0, 0.0, 0.6931472]))
    assert bool(out[3:].isinf().all())


def test_rescale_guidance_leaves_a_constant_sample_alone() -> None:
    """A guided output with zero spread has no defined ratio: it is returned as it is, where the
    other samples are rescaled to the conditional output's spread."""
    g = torch.Generator().manual_seed(0)
    guided = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    guided[0] = 0.25
    cond = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    out = rescale_guidance(guided, cond, 1.0)
    assert torch.equal(out[0], guided[0])
    torch.testing.assert_close(out[1].std(), cond[1].std())


def test_guidance_and_noise_level_wrappers_check_x_and_t() -> None:
    def net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return x

    cfg = ClassifierFreeGuidance(net, 2.0, null={"c": torch.zeros(1, 3)})
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ITE, match=r"^t: expected a torch.Tensor, got 5 \(int\)"):
        cfg(x, 5, c=torch.ones(2, 3))  # type: ignore[arg-type]
    with pytest.raises(IVE, match=r"^t: expected shape \(2,\) to match the batch of x"):
        cfg(x, torch.tensor([1, 2, 3]), c=torch.ones(2, 3))
    with pytest.raises(IVE, match=r"^t: expected a tensor with 1 dimensions"):
        cfg(x, torch.tensor(3), c=torch.ones(2, 3))
    level = NoiseLevelConditioning(net, S)
    with pytest.raises(IVE, match=r"^t: expected shape \(2,\) to match the batch of x"):
        level(x, torch.tensor([10, 20, 30]))
    torch.testing.assert_close(level(x, torch.tensor([10, 20])), x)


def test_adapters_refuse_non_floating_samples_and_bad_keys() -> None:
    with pytest.raises(ITE, match=r"^key: expected the keyword name"):
        ConcatConditioning(lambda x, t: x, key=5)  # type: ignore[arg-type]
    concat = ConcatConditioning(lambda x, t: x)
    with pytest.raises(ITE, match=r"^x: expected a floating-point tensor, got dtype torch.int64"):
        concat(torch.zeros(1, 3, 4, 4, dtype=torch.int64), torch.tensor([1]), source=_z(1, 3, 4, 4))
    region = KnownRegion(torch.full((1, 3, 8, 8), 0.7), _z(1, 1, 8, 8))
    with pytest.raises(ITE, match=r"^x: expected a floating-point tensor"):
        region.paste(torch.zeros(1, 3, 8, 8, dtype=torch.int64), 0)


def test_degradations_read_a_tensor_that_requires_grad_without_warning() -> None:
    x = (torch.rand(1, 3, 8, 8) * 2 - 1).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = to_grayscale(x)
    assert gray.shape == x.shape


@pytest.fixture(scope="module")
def encoder() -> CLIPEncoder:
    pytest.importorskip("open_clip")
    register_clip_config("imgdiff-test-tiny", tiny_clip_config())
    return CLIPEncoder(load_clip("imgdiff-test-tiny", seed=0))


def test_clip_losses_refuse_a_zero_direction_or_target(encoder: CLIPEncoder) -> None:
    """Equal texts make the text direction zero and a zero target makes every image equally far:
    either loss would be a constant with no gradient."""
    for variant in ("nada", "zecon"):
        with pytest.raises(IVE, match=r"^target_text: expected another text"):
            CLIPDirectionalLoss(encoder, "a photo", "a photo", variant=variant)  # type: ignore[arg-type]
    e = encoder.text_embedding("a photo", None, normalize=True)
    with pytest.raises(IVE, match=r"^target_text: expected another text"):
        CLIPDirectionalLoss(encoder, e, e.clone())
    with pytest.raises(IVE, match=r"^target: expected a non-zero embedding"):
        CLIPGlobalLoss(encoder, torch.zeros(encoder.embed_dim))
    with pytest.raises(IVE, match=r"^x: expected images of at least 1x1 pixels"):
        CLIPGlobalLoss(encoder, "a dog")(_z(1, 3, 0, 32))


def test_directional_loss_refuses_an_empty_template_list(encoder: CLIPEncoder) -> None:
    """``templates=[]`` is an error, as for the global loss, not a silent switch to the default."""
    with pytest.raises(IVE, match=r"^templates"):
        CLIPDirectionalLoss(encoder, "a photo", "a sketch", templates=[])
    with pytest.raises(IVE, match=r"^templates"):
        CLIPGlobalLoss(encoder, "a photo", templates=[])


def test_a_learned_null_embedding_is_followed_and_trains() -> None:
    """A null that requires grad, converted to the sample's dtype, is not cached: two backward
    passes work and an update of the parameter reaches the next call."""
    null = torch.nn.Parameter(torch.zeros(1, 4, dtype=torch.float64))

    def net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + c.sum(dim=1).reshape(-1, 1).to(x.dtype)

    cfg = ClassifierFreeGuidance(net, 2.0, null={"c": null})
    x, t, c = torch.zeros(2, 3), torch.tensor([1, 1]), torch.ones(2, 4, dtype=torch.float32)
    for _ in range(2):
        cfg(x, t, c=c).sum().backward()
    assert null.grad is not None
    torch.testing.assert_close(null.grad, torch.full((1, 4), -2.0 * 2 * 3, dtype=torch.float64))
    with torch.no_grad():
        null.fill_(1.0)
    # out = out_u + 2 (out_c - out_u) with out_u = 4 (the null's sum), out_c = 4: 4
    torch.testing.assert_close(cfg(x, t, c=c), torch.full((2, 3), 4.0))
