"""Reference networks: timestep embeddings (COND-6), cross-attention (COND-5), the U-Net's options."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import imgdiff
from imgdiff.nets import (
    CrossAttention,
    DiffusersUNet,
    TimestepEmbedding,
    UNet,
    UNetConfig,
    sinusoidal_embedding,
)

from .conftest import tiny_cross_attention_unet


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
        imgdiff.InputValueError,
        match=r"^groups: expected a divisor of every level.s channels .*got 8 for a level of 12",
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
    cond = tiny_cross_attention_unet()
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


def test_timestep_embedding_is_the_scaled_sinusoid_through_the_mlp() -> None:
    """TimestepEmbedding(t) = W_2 SiLU(W_1 emb(scale t; max_period) + b_1) + b_2, written out with
    the module's own weights and a hand-coded sinusoid (cos first)."""
    torch.manual_seed(0)
    dim, scale, max_period = 8, 250.0, 50.0
    module = TimestepEmbedding(dim, scale=scale, max_period=max_period).double()
    t = torch.tensor([0.0, 0.1, 0.37, 1.0], dtype=torch.float64)
    half = dim // 2
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = (t * scale)[:, None] * freqs
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    hidden = emb @ module.linear_1.weight.T + module.linear_1.bias
    hidden = hidden * torch.sigmoid(hidden)
    want = hidden @ module.linear_2.weight.T + module.linear_2.bias
    # the sinusoid is computed in float32 inside, hence the tolerance
    torch.testing.assert_close(module(t), want, rtol=0, atol=1e-4)
    assert module.out_dim == 4 * dim


def _filled(net: UNet) -> UNet:
    """``net`` with its zero-initialised layers given random weights (so every input matters)."""
    for p in net.parameters():
        if bool((p == 0).all()):
            torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def test_unet_noise_input_is_scaled_by_gamma_scale_only_for_gamma() -> None:
    """A gamma UNet embeds ``gamma_scale * gamma``: nets sharing weights with gamma_scale 1000 and
    500 agree at gamma 0.25 and 0.5 (both embed 250); a timestep UNet ignores gamma_scale."""
    torch.manual_seed(0)
    base: dict[str, Any] = {"base_channels": 16, "channel_mults": (1, 2), "attention_levels": (1,)}
    a = _filled(UNet(UNetConfig(noise_conditioning="gamma", gamma_scale=1000.0, **base)))
    b = UNet(UNetConfig(noise_conditioning="gamma", gamma_scale=500.0, **base)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = a(x, torch.tensor([0.25, 0.25]))
        torch.testing.assert_close(out, b(x, torch.tensor([0.5, 0.5])), rtol=0, atol=0)
        assert not torch.allclose(out, a(x, torch.tensor([0.5, 0.5])))
        steps = _filled(UNet(UNetConfig(gamma_scale=1000.0, **base)))
        other = UNet(UNetConfig(gamma_scale=3.0, **base)).eval()
        other.load_state_dict(steps.state_dict())
        t = torch.tensor([7, 420])
        torch.testing.assert_close(steps(x, t), other(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale-shift", "bias"])
@pytest.mark.parametrize("cin", [8, 16])
def test_res_block_is_the_documented_formula(scale_shift: bool, cin: int) -> None:
    """ResBlock written out with functional ops and its own weights: ``h = conv(SiLU(GN(x)))``;
    ADM: ``GN(h) (1 + scale) + shift`` with ``[scale, shift] = Linear(SiLU(emb))``, DDPM:
    ``GN(h + e)``; output ``skip(x) + conv(SiLU(.))`` with zero padding and an identity (or 1x1)
    skip. Freshly built (zero output convolution) it is the skip alone."""
    import torch.nn.functional as F  # noqa: N812 - torch's conventional alias

    from imgdiff.nets.unet import ResBlock

    torch.manual_seed(0)
    cout, emb_dim, groups = 16, 12, 4
    block = ResBlock(cin, cout, emb_dim, 0.0, groups, scale_shift).double().eval()
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    emb = torch.randn(2, emb_dim, dtype=torch.float64)
    skip = x if cin == cout else F.conv2d(x, block.skip.weight, block.skip.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), skip, rtol=0, atol=0)  # identity branch at init
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        gn_in, conv_in = block.in_layers[0], block.in_layers[2]
        h = F.conv2d(
            F.silu(F.group_norm(x, groups, gn_in.weight, gn_in.bias)),
            conv_in.weight,
            conv_in.bias,
            padding=1,
        )
        lin = block.emb[1]
        e = (F.silu(emb) @ lin.weight.T + lin.bias)[:, :, None, None]
        gn = block.out_norm
        if scale_shift:
            scale, shift = e[:, :cout], e[:, cout:]
            h = F.group_norm(h, groups, gn.weight, gn.bias) * (1 + scale) + shift
        else:
            h = F.group_norm(h + e, groups, gn.weight, gn.bias)
        conv_out = block.out_layers[2]
        skip = x if cin == cout else F.conv2d(x, block.skip.weight, block.skip.bias)
        want = skip + F.conv2d(F.silu(h), conv_out.weight, conv_out.bias, padding=1)
        torch.testing.assert_close(block(x, emb), want, rtol=0, atol=1e-12)


def test_unet_wiring_skips_downsampling_and_nearest_upsampling() -> None:
    """The encoder maps chain (each is its block applied to the previous one: a stride-2 conv for
    a downsample, res then attention otherwise); the middle is res, attention, res; every decoder
    block gets ``cat([h, skip])`` with the encoder maps popped deepest first; upsampling is
    nearest (each pixel a 2x2 block); the head is GroupNorm, SiLU, conv."""
    torch.manual_seed(0)
    net = _filled(
        UNet(UNetConfig(base_channels=16, channel_mults=(1, 2, 2), attention_levels=(1,)))
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    seen: dict[str, list[torch.Tensor]] = {"res": [], "upsample": [], "head": []}

    def record(name: str) -> Callable[..., None]:
        return lambda _module, args: seen[name].append(args[0])

    hooks = [
        block[name].register_forward_pre_hook(record(name))
        for block in net.up
        for name in ("res", "upsample")
        if name in block
    ]
    hooks.append(net.output.register_forward_pre_hook(record("head")))
    with torch.no_grad():
        feats = net.encoder_features(x, t)
        out = net(x, t)
        emb = net.time_embed(t)
        for hook in hooks:
            hook.remove()
        # middle: res, attention, res on the deepest map; it leads the first decoder input
        middle = net.middle["res1"](feats[-1], emb)
        middle = net.middle["res2"](net.middle["attn"](middle, None), emb)
        torch.testing.assert_close(seen["res"][0][:, : middle.shape[1]], middle, rtol=0, atol=1e-6)
        # output head: GroupNorm, SiLU, conv
        norm, conv = net.output[0], net.output[2]
        h = seen["head"][0]
        head = torch.nn.functional.conv2d(
            torch.nn.functional.silu(
                torch.nn.functional.group_norm(h, norm.num_groups, norm.weight, norm.bias)
            ),
            conv.weight,
            conv.bias,
            padding=1,
        )
        torch.testing.assert_close(out, head, rtol=0, atol=1e-6)
        assert len(feats) == 1 + len(net.down) == len(net.encoder_channels)
        torch.testing.assert_close(feats[0], net.input_conv(x), rtol=0, atol=0)
        for j, block in enumerate(net.down, start=1):
            if "downsample" in block:
                want = torch.nn.functional.conv2d(
                    feats[j - 1],
                    block["downsample"].weight,
                    block["downsample"].bias,
                    stride=2,
                    padding=1,
                )
            else:
                want = block["res"](feats[j - 1], emb)
                if "attn" in block:
                    want = block["attn"](want, None)
            torch.testing.assert_close(feats[j], want, rtol=0, atol=1e-6)
    assert len(seen["res"]) == len(feats)
    for i, inp in enumerate(seen["res"]):
        skip = feats[-1 - i]
        assert torch.equal(inp[:, -skip.shape[1] :], skip), i
    assert len(seen["upsample"]) == len(net.config.channel_mults) - 1
    for up in seen["upsample"]:
        corner = up[..., ::2, ::2]
        for di, dj in ((0, 1), (1, 0), (1, 1)):
            assert torch.equal(up[..., di::2, dj::2], corner)


def test_unet_refuses_palette_null_without_a_palette_embedding() -> None:
    """``palette_null`` belongs to the palette embedding: a UNet configured without one refuses
    the flags instead of ignoring them (as it refuses ``palette`` itself)."""
    net = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(
        imgdiff.InputValueError, match=r"^palette_null: this UNet was not configured"
    ):
        net(x, t, palette_null=torch.tensor([True, False]))


def test_spatial_attention_is_pre_normalised_residual_and_pixel_equivariant() -> None:
    """SpatialAttention = x + SelfAttn(GN(x)), then + CrossAttn(LN(tokens), c), over the H W pixel
    tokens: with zero output projections it is the identity; it commutes with any permutation of
    the pixels (no positional information); and it equals that formula."""
    import torch.nn.functional as F  # noqa: N812 - torch's conventional alias

    from imgdiff.nets import SpatialAttention

    torch.manual_seed(0)
    B, C, H, W = 2, 16, 3, 5
    block = SpatialAttention(C, heads=4, context_dim=6, groups=4).double().eval()
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    c = torch.randn(B, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        out = block(x, c)
        perm = torch.randperm(H * W)
        permuted = block(x.flatten(2)[..., perm].reshape(B, C, H, W), c)
        torch.testing.assert_close(
            permuted, out.flatten(2)[..., perm].reshape(B, C, H, W), rtol=0, atol=1e-12
        )
        tokens = x.flatten(2).transpose(1, 2)
        gn = block.norm
        normed = F.group_norm(x, 4, gn.weight, gn.bias).flatten(2).transpose(1, 2)
        tokens = tokens + block.attn(normed)
        ln = block.cross_norm
        tokens = tokens + block.cross(F.layer_norm(tokens, (C,), ln.weight, ln.bias), c)
        want = tokens.transpose(1, 2).reshape(B, C, H, W)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        for attn in (block.attn, block.cross):
            attn.to_out.weight.zero_()
            attn.to_out.bias.zero_()
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)


def test_unet_has_self_attention_exactly_at_the_configured_levels() -> None:
    """Level l (resolution H / 2^l) has attention in its down and up blocks iff l is in
    ``attention_levels``; the middle block always has it."""
    from imgdiff.nets import SpatialAttention

    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2, 2), attention_levels=(0, 2))
    net = UNet(cfg)
    feats = net.encoder_features(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    res_blocks = [b for b in net.down if "res" in b]
    res_sizes = [f.shape[-1] for f, b in zip(feats[1:], net.down, strict=True) if "res" in b]
    assert len(res_blocks) == len(cfg.channel_mults) * cfg.num_res_blocks
    for block, size in zip(res_blocks, res_sizes, strict=True):
        level = {16: 0, 8: 1, 4: 2}[size]
        assert ("attn" in block) == (level in cfg.attention_levels), level
    up_levels = [
        level
        for level in reversed(range(len(cfg.channel_mults)))
        for _ in range(cfg.num_res_blocks + 1)
    ]
    for block, level in zip(net.up, up_levels, strict=True):
        assert ("attn" in block) == (level in cfg.attention_levels), level
    assert isinstance(net.middle["attn"], SpatialAttention)


class _StubUNet(torch.nn.Module):
    """A diffusers-like stand-in: ``forward(x, t, **kw)`` returns ``2 x`` and records ``kw``."""

    def __init__(self, config: object = None) -> None:
        super().__init__()
        if config is not None:
            self.config = config
        self.seen: list[dict[str, object]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        self.seen.append(kw)
        return 2 * x


def test_diffusers_adapter_reads_cross_attention_dim_from_any_config() -> None:
    """``takes_context`` is whether the config names a ``cross_attention_dim``, read from a dict
    config or an attribute config; without a config (or with ``None``) the UNet takes no context,
    and with one the context arrives as ``encoder_hidden_states``."""
    from types import SimpleNamespace

    x, t, context = torch.randn(2, 3, 4, 4), torch.tensor([1, 2]), torch.randn(2, 5, 8)
    for config in ({"cross_attention_dim": 8}, SimpleNamespace(cross_attention_dim=8)):
        stub = _StubUNet(config)
        model = DiffusersUNet(stub)
        assert model.takes_context
        torch.testing.assert_close(model(x, t, context=context), 2 * x)
        assert stub.seen[-1].keys() == {"encoder_hidden_states"}
        assert stub.seen[-1]["encoder_hidden_states"] is context
    for config in (None, {"cross_attention_dim": None}, SimpleNamespace(in_channels=3)):
        stub = _StubUNet(config)
        model = DiffusersUNet(stub)
        assert not model.takes_context
        torch.testing.assert_close(model(x, t, class_labels=t), 2 * x)
        assert stub.seen[-1].keys() == {"class_labels"}
