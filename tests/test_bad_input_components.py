"""Bad input to the losses, metrics, conditioning adapters and degradations (found by a review).

Empty tensors, tensors on another device than their partner, wrong types inside adapters and
degenerate texts each raise an imgdiff error naming the argument; never a raw torch error deep
inside, a silent NaN or a loss that is a constant. The "other device" is torch's ``meta`` device,
which every machine has.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
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

from .conftest import tiny_cross_attention_unet

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
    (lambda: patch_nce_loss(_z(0, 4, 8), _z(0, 4, 8)), r"^query: expected a non-empty tensor"),
    (lambda: CLIPAugment(n_patch=2)(_z(1, 3, 0, 8)), r"^x: expected a non-empty"),
    (lambda: image_grid(_z(2, 3, 0, 4)), r"^images: expected a non-empty tensor"),
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
    with pytest.raises(IVE, match=r"^t: expected shape \(2,\) to match the batch, got \(3,\)"):
        cfg(x, torch.tensor([1, 2, 3]), c=torch.ones(2, 3))
    with pytest.raises(IVE, match=r"^t: expected a tensor with 1 dimensions"):
        cfg(x, torch.tensor(3), c=torch.ones(2, 3))
    level = NoiseLevelConditioning(net, S)
    with pytest.raises(IVE, match=r"^t: expected shape \(2,\) to match the batch, got \(3,\)"):
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
    with pytest.raises(IVE, match=r"^x: expected a non-empty tensor"):
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


def _unet(**kw: object) -> torch.nn.Module:
    from imgdiff.nets import UNet, UNetConfig

    base = {
        "in_channels": 3,
        "base_channels": 8,
        "channel_mults": (1, 2),
        "num_res_blocks": 1,
        "attention_levels": (),
    }
    return UNet(UNetConfig(**{**base, **kw}))  # type: ignore[arg-type]


def test_unet_refuses_inputs_it_would_crash_on_or_broadcast() -> None:
    """Empty or zero-size samples, another dtype than the weights (outside autocast), a palette
    of another batch (batch 1 was broadcast silently), a context that is not a tensor or has no
    tokens: each named."""
    net = _unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(IVE, match=r"^x: expected a non-empty"):
        net(x[:0], t[:0])
    with pytest.raises(IVE, match=r"^x: expected a non-empty"):
        net(torch.randn(1, 3, 0, 0), t[:1])
    with pytest.raises(ITE, match=r"^x: expected dtype torch.float32, that of the network"):
        net(x.double(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch casts both: allowed
        assert net(x.bfloat16(), t).shape == x.shape
    palette_net = _unet(palette_colors=6)
    for batch in (1, 3):
        with pytest.raises(IVE, match=r"^palette: expected batch 2 \(batch_size"):
            palette_net(x, t, palette=torch.rand(batch, 6, 3))
    text_net = _unet(context_dim=4, attention_levels=(1,))
    with pytest.raises(ITE, match=r"^context: expected a torch.Tensor"):
        text_net(x, t, context=[[1.0]])
    with pytest.raises(IVE, match=r"^context: expected shape \(2, L, 4\) with L >= 1"):
        text_net(x, t, context=torch.randn(2, 0, 4))
    with pytest.raises(ITE, match=r"^context: expected dtype torch.float32"):
        text_net(x, t, context=torch.randn(2, 5, 4, dtype=torch.float64))
    assert text_net(x, t, context=torch.randn(2, 5, 4)).shape == x.shape


def test_unet_config_stores_plain_values_and_names_the_culprit() -> None:
    import json

    from imgdiff.nets import UNetConfig

    cfg = UNetConfig(
        in_channels=np.int64(3),
        base_channels=np.int64(8),
        dropout=np.float32(0.1),
        attention_levels=(),
    )
    assert type(cfg.in_channels) is int
    assert type(cfg.dropout) is float
    json.dumps(cfg.__dict__ | {"channel_mults": list(cfg.channel_mults)})  # JSON-able
    with pytest.raises(ITE, match=r"^learned_variance: expected a bool, got 'no'"):
        UNetConfig(learned_variance="no")  # type: ignore[arg-type]
    with pytest.raises(ITE, match=r"^scale_shift: expected a bool, got None"):
        UNetConfig(scale_shift=None)  # type: ignore[arg-type]
    with pytest.raises(IVE, match=r"^heads: expected a divisor .*got 4 for a level of 30"):
        UNetConfig(base_channels=30, groups=5, heads=4, channel_mults=(1,), attention_levels=())
    with pytest.raises(IVE, match=r"^base_channels: expected an int >= 2, got 1"):
        UNetConfig(base_channels=1, groups=1, heads=1)


def test_timestep_embeddings_validate_at_construction() -> None:
    from imgdiff.nets import TimestepEmbedding, sinusoidal_embedding

    with pytest.raises(IVE, match=r"^max_period: expected a float >= 1"):
        TimestepEmbedding(8, max_period=-1)
    with pytest.raises(IVE, match=r"^dim: expected an int >= 2, got 1"):
        sinusoidal_embedding(torch.tensor([1.0]), 1)
    assert sinusoidal_embedding(torch.tensor([1.0, 2.0]), 3).shape == (2, 3)


def test_clip_encoder_half_precision_and_bad_templates(encoder: CLIPEncoder) -> None:
    """open_clip keeps positional embeddings in float32 when it casts to fp16/bf16: the image is
    cast to the tower's convolution dtype. Empty images and templates with other format fields
    are named."""
    for precision in ("fp16", "bf16"):
        half = CLIPEncoder(load_clip("imgdiff-test-tiny", seed=0, precision=precision))  # type: ignore[arg-type]
        emb = half.encode_image(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert emb.dtype == torch.float32
        assert emb.shape == (2, half.embed_dim)
        assert bool(emb.isfinite().all())
    with pytest.raises(IVE, match=r"^images: expected a non-empty"):
        encoder.encode_image(torch.zeros(0, 3, 32, 32))
    with pytest.raises(IVE, match=r"^images: expected a non-empty"):
        encoder.encode_image(torch.zeros(1, 3, 0, 5))
    for bad in ("a {0} and {}", "a {x} and {}"):
        with pytest.raises(IVE, match=r"^templates\[1\]: expected a template with one"):
            encoder.text_embedding("dog", ["a photo of {}", bad])


def test_attention_blocks_validate_at_construction_and_call() -> None:
    from imgdiff.nets import CrossAttention, SpatialAttention

    with pytest.raises(IVE, match=r"^groups: expected a divisor of channels 10, got 4"):
        SpatialAttention(10, groups=4)
    block = SpatialAttention(8, heads=2, groups=4)
    with pytest.raises(IVE, match=r"^x: expected a tensor with 4 dimensions"):
        block(torch.randn(2, 8, 16))
    with pytest.raises(IVE, match=r"^x: expected 8 channels"):
        block(torch.randn(2, 6, 4, 4))
    with pytest.raises(ITE, match=r"^x: expected a floating-point tensor"):
        block(torch.zeros(2, 8, 4, 4, dtype=torch.int64))
    with pytest.raises(IVE, match=r"^context: this block has no cross-attention"):
        block(torch.randn(2, 8, 4, 4), torch.randn(2, 3, 8))  # was silently ignored
    with pytest.raises(IVE, match=r"^x: expected a non-empty"):
        block(torch.randn(0, 8, 4, 4))
    with pytest.raises(IVE, match=r"^h: expected a non-empty"):
        CrossAttention(8, heads=2)(torch.randn(0, 3, 8))


def test_diffusers_adapter_checks_the_context() -> None:
    pytest.importorskip("diffusers")
    from imgdiff.nets import DiffusersUNet

    torch.manual_seed(0)
    cond = tiny_cross_attention_unet()
    text = DiffusersUNet(cond)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 9])
    for bad in (torch.randn(2, 3, 8), torch.randn(1, 5, 12)):
        with pytest.raises(IVE, match=r"^context: expected shape \(2, L, 12\)"):
            text(z, t, context=bad)
    with pytest.raises(IVE, match=r"^context: expected a tensor on x's device cpu, got meta"):
        text(z, t, context=torch.randn(2, 5, 12, device=META))
    assert text(z, t, context=torch.randn(2, 5, 12)).shape == z.shape


def test_unet_refuses_bool_and_complex_timesteps() -> None:
    net = _unet()
    x = torch.randn(2, 3, 8, 8)
    for t in (torch.tensor([True, False]), torch.tensor([1 + 0j, 2 + 0j])):
        with pytest.raises(ITE, match=r"^t: expected real timesteps or noise levels"):
            net(x, t)
