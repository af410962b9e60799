"""Reference networks: timestep embeddings (COND-6), cross-attention (COND-5), the U-Net's options."""

from __future__ import annotations

import math

import pytest
import torch

import imgdiff
from imgdiff.nets import CrossAttention, DiffusersUNet, UNet, UNetConfig, sinusoidal_embedding


def test_cond6_timestep_embedding() -> None:
    """t = 0 gives cos 1 and sin 0 (cos first); odd dims zero-pad; the closed form at t = 999."""
    emb = sinusoidal_embedding(torch.tensor([0.0, 999.0]), 9)
    assert emb.shape == (2, 9)
    torch.testing.assert_close(emb[0, :4], torch.ones(4))
    torch.testing.assert_close(emb[0, 4:8], torch.zeros(4))
    assert float(emb[:, 8].abs().max()) == 0.0
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    want = torch.cat([torch.cos(999 * freqs), torch.sin(999 * freqs)])
    torch.testing.assert_close(emb[1, :8], want, rtol=0, atol=1e-4)
    diffusers = pytest.importorskip("diffusers.models.embeddings")
    ref = diffusers.get_timestep_embedding(
        torch.tensor([0, 17, 999]), 8, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    torch.testing.assert_close(
        sinusoidal_embedding(torch.tensor([0, 17, 999]), 8), ref, rtol=0, atol=1e-6
    )
    # Continuous noise levels (gamma * 1000) take the same path.
    torch.testing.assert_close(
        sinusoidal_embedding(torch.tensor([0.5, 999.0]), 8),
        diffusers.get_timestep_embedding(
            torch.tensor([0.5, 999.0]), 8, flip_sin_to_cos=True, downscale_freq_shift=0
        ),
        rtol=0,
        atol=1e-6,
    )


def test_cross_attention_equals_the_formula_per_head() -> None:
    """Spec 8.4 written out per head from the module's own weights, with several context tokens
    (one token makes the softmax 1 whatever the scale): softmax(Q K^T / sqrt(d_head)) V."""
    torch.manual_seed(1)
    heads, dim = 4, 16
    attn = CrossAttention(dim, heads=heads, context_dim=8).double()
    h, c = torch.randn(2, 5, dim, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    q, k, v = h @ attn.to_q.weight.T, c @ attn.to_k.weight.T, c @ attn.to_v.weight.T
    d = dim // heads
    merged = torch.empty(2, 5, dim, dtype=torch.float64)
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / d**0.5, dim=-1)
        merged[..., sl] = weights @ v[..., sl]
    want = merged @ attn.to_out.weight.T + attn.to_out.bias
    torch.testing.assert_close(attn(h, c), want, rtol=0, atol=1e-12)


def test_cond5_cross_attention() -> None:
    """Output (B, N, d); with one context token every query receives the same value vector."""
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=4, context_dim=8)
    h, c = torch.randn(2, 10, 16), torch.randn(2, 1, 8)
    out = attn(h, c)
    assert out.shape == (2, 10, 16)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-6)
    with pytest.raises(imgdiff.InputValueError, match=r"^context: expected shape \(2, L, 8\)"):
        attn(h, torch.randn(2, 3, 5))
    with pytest.raises(imgdiff.InputValueError, match=r"^context: expected shape \(2, L, 8\)"):
        attn(h)  # context_dim differs from dim: there is no self-attention to fall back on
    # without context it is self-attention: a query of the wrong width is ``h``'s fault
    self_attn = CrossAttention(8)
    assert self_attn(torch.randn(2, 4, 8)).shape == (2, 4, 8)
    with pytest.raises(imgdiff.InputValueError, match=r"^h: expected shape \(B, N, 8\)"):
        self_attn(torch.randn(2, 4, 6))
    with pytest.raises(imgdiff.InputValueError, match=r"^h: expected a tensor with 3 dimensions"):
        self_attn(torch.randn(2, 8))


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(),
        UNetConfig(in_channels=6, channel_mults=(1, 2), attention_levels=(0, 1), num_res_blocks=2),
        UNetConfig(noise_conditioning="gamma", learned_variance=True),
        UNetConfig(num_classes=5, palette_colors=6, context_dim=12),
        UNetConfig(scale_shift=False),
    ],
    ids=[
        "default",
        "concat-deeper",
        "gamma-learned-variance",
        "class-palette-context",
        "bias-embedding",
    ],
)
def test_unet_shapes_and_conditioning(config: UNetConfig) -> None:
    """Output shape (B, C_out or 2 C_out, H, W); each conditioning input changes the output."""
    torch.manual_seed(0)
    net = UNet(config).eval()
    for p in net.parameters():  # zero-initialised layers (output, residual branches) get weights
        if bool((p == 0).all()):
            torch.nn.init.normal_(p, std=0.1)
    B = 2
    x = torch.randn(B, config.in_channels, 16, 16)
    t = torch.rand(B) if config.noise_conditioning == "gamma" else torch.randint(0, 1000, (B,))
    kw: dict[str, torch.Tensor | None] = {}
    if config.num_classes:
        kw["class_labels"] = torch.tensor([0, 3])
    if config.palette_colors:
        kw["palette"] = torch.randn(B, config.palette_colors, 3) * 50
    if config.context_dim:
        kw["context"] = torch.randn(B, 4, config.context_dim)
    out = net(x, t, **kw)
    assert out.shape == (B, config.out_channels * (2 if config.learned_variance else 1), 16, 16)
    assert not torch.allclose(out, net(x, t.flip(0), **kw))
    for key in kw:
        other = dict(kw)
        other[key] = (
            None
            if key == "palette"
            else torch.tensor([1, 2])
            if key == "class_labels"
            else torch.randn(B, 4, config.context_dim or 1)
        )
        assert not torch.allclose(out, net(x, t, **other)), key
    if config.palette_colors:
        # Per-sample null flags: flagged samples match the all-null output, the rest are untouched.
        flags = torch.tensor([True, False])
        mixed = net(x, t, **{**kw, "palette_null": flags})
        all_null = net(x, t, **{**kw, "palette": None})
        torch.testing.assert_close(mixed[0], all_null[0])
        torch.testing.assert_close(mixed[1], out[1])


def test_unet_rejects_bad_input() -> None:
    """Wrong channel counts, sizes not divisible by the downsampling, missing conditions."""
    net = UNet(UNetConfig(in_channels=6, num_classes=3))
    with pytest.raises(imgdiff.InputValueError, match=r"^x: expected 6 channels .* got 3"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([1]), class_labels=torch.tensor([0]))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^x: expected height and width divisible by 4, got 18x16"
    ):
        net(torch.randn(1, 6, 18, 16), torch.tensor([1]), class_labels=torch.tensor([0]))
    with pytest.raises(imgdiff.InputValueError, match=r"^class_labels: expected"):
        net(torch.randn(1, 6, 16, 16), torch.tensor([1]))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^groups: expected a divisor of every level.s channels .*got 8 for a level of 12"
    ):
        UNetConfig(base_channels=12)
    with pytest.raises(imgdiff.InputValueError, match=r"^noise_conditioning: expected one of"):
        UNetConfig(noise_conditioning="sigma")  # type: ignore[arg-type]
    x, t = torch.randn(2, 6, 16, 16), torch.tensor([1, 2])
    with pytest.raises(imgdiff.InputValueError, match=r"^class_labels: expected \(2,\) integer"):
        net(x, t, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(imgdiff.InputValueError, match=r"^class_labels: expected \(2,\) integer"):
        net(x, t, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(imgdiff.InputValueError, match=r"^palette: this UNet was not configured"):
        net(x, t, class_labels=torch.tensor([0, 1]), palette=torch.zeros(2, 6, 3))
    with pytest.raises(imgdiff.InputValueError, match=r"^context: this UNet was not configured"):
        net(x, t, class_labels=torch.tensor([0, 1]), context=torch.zeros(2, 3, 4))
    rich = UNet(UNetConfig(palette_colors=6, context_dim=8, attention_levels=(1,)))
    x3 = torch.randn(2, 3, 16, 16)
    with pytest.raises(imgdiff.InputValueError, match=r"^palette: expected shape \(B, 6, 3\)"):
        rich(x3, t, palette=torch.zeros(2, 18), context=torch.zeros(2, 3, 8))
    with pytest.raises(imgdiff.InputValueError, match=r"^context: expected shape \(2, L, 8\)"):
        rich(x3, t, context=torch.zeros(2, 3, 5))
    with pytest.raises(imgdiff.InputValueError, match=r"^context: expected a \(B, L, d\)"):
        rich(x3, t)
    gamma_net = UNet(UNetConfig(noise_conditioning="gamma"))
    with pytest.raises(imgdiff.InputTypeError, match=r"^t: a gamma-conditioned UNet expects"):
        gamma_net(x3, t)
    # timesteps passed as floats are not noise levels (values read on the CPU)
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^t: a gamma-conditioned UNet expects noise levels in \[0, 1\], got values from "
        r"2\.0 to 500\.0",
    ):
        gamma_net(x3, torch.tensor([2.0, 500.0]))
    for bad_gamma in (-0.5, float("nan")):
        with pytest.raises(imgdiff.InputValueError, match=r"^t: a gamma-conditioned UNet"):
            gamma_net(x3, torch.tensor([0.5, bad_gamma]))
    assert gamma_net(x3, torch.tensor([0.0, 1.0])).shape == x3.shape  # both ends are levels
    # out-of-range labels name the argument (index num_classes = 3 is the null class: valid)
    assert net(x, t, class_labels=torch.tensor([0, 3])).shape == (2, 3, 16, 16)
    for labels in ([0, 4], [-1, 2]):
        with pytest.raises(
            imgdiff.InputValueError,
            match=r"^class_labels: expected labels in \[0, 3\] \(the last, 3, is null\), got values "
            rf"from {min(labels)} to {max(labels)}",
        ):
            net(x, t, class_labels=torch.tensor(labels))
    # palette_null is named as the UNet's keyword, not PaletteEmbedding's ``null``
    flags = torch.tensor([True, False])
    with pytest.raises(
        imgdiff.InputValueError, match=r"^palette_null: expected None when palette is None"
    ):
        rich(x3, t, palette=None, palette_null=flags, context=torch.zeros(2, 3, 8))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^palette_null: expected shape \(2,\) to match"
    ):
        rich(
            x3,
            t,
            palette=torch.zeros(2, 6, 3),
            palette_null=flags[:1],
            context=torch.zeros(2, 3, 8),
        )
    # configuration tuples: a bare int is refused by name, lists become tuples
    with pytest.raises(
        imgdiff.InputTypeError,
        match=r"^attention_levels: expected a tuple of ints, e\.g\. \(1,\), got 2",
    ):
        UNetConfig(attention_levels=2)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^channel_mults: expected a tuple of ints"):
        UNetConfig(channel_mults=2)  # type: ignore[arg-type]
    with pytest.raises(
        imgdiff.InputValueError, match=r"^attention_levels\[1\]: expected an int <= 1"
    ):
        UNetConfig(channel_mults=(1, 2), attention_levels=(0, 2))
    listed = UNetConfig(channel_mults=[1, 2], attention_levels=[1])  # type: ignore[arg-type]
    assert listed.channel_mults == (1, 2)
    assert listed.attention_levels == (1,)


def test_diffusers_unet_adapter() -> None:
    """A diffusers UNet2DModel drives an imgdiff sampler through DiffusersUNet."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    model = DiffusersUNet(unet)
    x = torch.randn(2, 3, 8, 8)
    out = imgdiff.DDIM(imgdiff.NoiseSchedule.linear()).sample(model, x, num_steps=3, progress=False)
    assert out.shape == x.shape
    torch.testing.assert_close(model(x, torch.tensor([5, 9])), unet(x, torch.tensor([5, 9])).sample)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^context: UNet2DModel has no cross-attention"
    ):
        model(x, torch.tensor([5, 9]), context=torch.randn(2, 3, 4))
    cond = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=8,
        layers_per_block=1,
        attention_head_dim=8,
    )
    text = DiffusersUNet(cond)
    assert text.takes_context
    assert not model.takes_context
    z, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    torch.testing.assert_close(
        text(z, torch.tensor([5, 9]), context=context),
        cond(z, torch.tensor([5, 9]), context).sample,
    )
    with pytest.raises(imgdiff.InputValueError, match=r"^context: expected \(B, L, d\) text"):
        text(z, torch.tensor([5, 9]))
