"""ZeCon's zero-shot contrastive loss (spec 7.5): PatchNCE math (LOSS-4), the U-Net extractor (LOSS-5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.losses.contrastive import (
    ZECON_LAYERS,
    UNetEncoderFeatures,
    ZeroShotContrastiveLoss,
    gather_patches,
    patch_nce_loss,
    sample_patch_positions,
    sample_shared_patches,
)
from imgdiff.nets import UNet, UNetConfig

TAU = 0.07


def _orthogonal(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.to(dtype)


def _small_unet(**kw: object) -> UNet:
    torch.manual_seed(0)
    cfg: dict[str, object] = {
        "base_channels": 16,
        "channel_mults": (1, 2),
        "attention_levels": (),
        "num_res_blocks": 1,
    }
    cfg.update(kw)
    net = UNet(UNetConfig(**cfg))  # type: ignore[arg-type]
    net.eval().requires_grad_(False)
    return net


def _oracle_patch_nce(q: Tensor, k: Tensor, tau: float, fill: float) -> Tensor:
    """Per-patch loop over one image's (P, C) vectors, straight from the formula."""
    qn = q / (q.norm(dim=-1, keepdim=True) + 1e-7)
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-7)
    P = q.shape[0]
    total = torch.zeros((), dtype=q.dtype)
    for i in range(P):
        negs = [float(qn[i] @ kn[j]) if j != i else fill for j in range(P)]
        logits = torch.tensor([float(qn[i] @ kn[i]), *negs], dtype=q.dtype) / tau
        total = total + torch.logsumexp(logits, 0) - logits[0]
    return total / P


# ---------------------------------------------------------------------------------------------
# LOSS-4: PatchNCE math


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss4_orthonormal_rows(dtype: torch.dtype) -> None:
    """q = k = orthonormal rows -> log(1 + (P-1) e^{-1/τ} + e^{-11/τ}) ≈ 1.6e-4 < 1e-3."""
    P = C = 256
    for q in (torch.eye(P, dtype=dtype), _orthogonal(P, dtype=dtype)):
        loss = patch_nce_loss(q[None], q[None].clone(), temperature=TAU)
        # positive logit 1/τ, P-1 negatives 0, the diagonal -10/τ:
        want = math.log1p((P - 1) * math.exp(-1 / TAU) + math.exp(-11 / TAU))
        assert loss.shape == ()
        assert float(loss) < 1e-3
        assert want == pytest.approx(math.log1p((P - 1) * math.exp(-1 / TAU)), rel=1e-9)
        tol = 1e-8 if dtype == torch.float64 else 5e-6  # float32 logits ~14.3 carry ~1e-6
        assert float(loss) == pytest.approx(want, abs=tol)
        assert q.shape == (P, C)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss4_all_identical_is_log_p(dtype: torch.dtype) -> None:
    """All q, k equal: logits [1/τ, 1/τ x (P-1), -10/τ] -> log(P + e^{-11/τ}) = log P."""
    P, C = 256, 256
    g = torch.Generator().manual_seed(1)
    v = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    q = v.expand(2, P, C).clone()
    loss = patch_nce_loss(q, q.clone(), temperature=TAU)
    want = math.log(P + math.exp(-11 / TAU))
    assert want == pytest.approx(math.log(P), abs=1e-12)
    assert float(loss) == pytest.approx(want, abs=1e-3 if dtype == torch.float32 else 1e-9)


def test_loss4_gradient_to_query_not_key() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 16, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 16, 8, generator=g, requires_grad=True)
    loss = patch_nce_loss(q, k)
    loss.backward()
    assert k.grad is None or float(k.grad.abs().max()) == 0.0
    assert q.grad is not None
    assert float(q.grad.abs().max()) > 0.0


def test_patch_nce_matches_per_patch_oracle() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 12, 5, generator=g, dtype=torch.float64)
    k = torch.randn(1, 12, 5, generator=g, dtype=torch.float64)
    for fill in (-10.0, 0.5):
        got = patch_nce_loss(q, k, temperature=0.2, diagonal_fill=fill)
        want = _oracle_patch_nce(q[0], k[0], 0.2, fill)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cross_batch_flag() -> None:
    """B = 1: both modes agree. B > 1: they differ; within-image = mean of single-image losses,
    cross-batch = the single-image loss of all B·P patches pooled (ZeCon's code)."""
    g = torch.Generator().manual_seed(4)
    q1 = torch.randn(1, 10, 6, generator=g, dtype=torch.float64)
    k1 = torch.randn(1, 10, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        patch_nce_loss(q1, k1), patch_nce_loss(q1, k1, cross_batch_negatives=True)
    )
    q = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    k = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    within = patch_nce_loss(q, k)
    cross = patch_nce_loss(q, k, cross_batch_negatives=True)
    per_image = torch.stack([patch_nce_loss(q[b : b + 1], k[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(within, per_image.mean())
    torch.testing.assert_close(cross, patch_nce_loss(q.reshape(1, 30, 6), k.reshape(1, 30, 6)))
    assert abs(float(within) - float(cross)) > 1e-3
    # More negatives never make the task easier: pooled loss >= within-image loss here.
    assert float(cross) > float(within)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    low=st.floats(0.05, 1.0),
    high=st.floats(1.0, 20.0),
    on_key=st.booleans(),
)
def test_invariant_to_positive_rescaling(seed: int, low: float, high: float, on_key: bool) -> None:
    """Vectors are L2-normalised, so scaling each one by a positive factor changes nothing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, 4, generator=g, dtype=torch.float64) + 0.1
    k = torch.randn(2, 9, 4, generator=g, dtype=torch.float64) + 0.1
    scale = low + (high - low) * torch.rand(2, 9, 1, generator=g, dtype=torch.float64)
    base = patch_nce_loss(q, k)
    scaled = patch_nce_loss(q, k * scale) if on_key else patch_nce_loss(q * scale, k)
    torch.testing.assert_close(scaled, base, rtol=1e-5, atol=1e-6)


def test_half_precision_is_upcast() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 4, generator=g)
    k = torch.randn(2, 8, 4, generator=g)
    out = patch_nce_loss(q.half(), k.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, patch_nce_loss(q, k), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Shared patch positions


def test_sample_patch_positions() -> None:
    pos = sample_patch_positions(64, 256, generator=torch.Generator().manual_seed(0))
    assert pos.dtype == torch.int64
    assert sorted(pos.tolist()) == list(range(64))  # P = min(256, 64): a full permutation
    pos = sample_patch_positions(100, 7, generator=torch.Generator().manual_seed(0))
    assert pos.shape == (7,)
    assert len(set(pos.tolist())) == 7
    assert int(pos.min()) >= 0
    assert int(pos.max()) < 100
    again = sample_patch_positions(100, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pos, again)
    other = sample_patch_positions(100, 7, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(pos, other)


def test_gather_patches_indexing() -> None:
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    pos = torch.tensor([0, 7, 19])
    out = gather_patches(fmap, pos)
    assert out.shape == (2, 3, 3)
    for b in range(2):
        for p, flat in enumerate(pos.tolist()):
            torch.testing.assert_close(out[b, p], fmap[b, :, flat // 5, flat % 5])


def test_shared_positions_for_query_key_and_batch() -> None:
    """LOSS-5 (positions): the key is the query map scaled per image, so a shared draw gives
    proportional vectors at every patch; the same positions serve every image."""
    g = torch.Generator().manual_seed(6)
    qmap = torch.randn(3, 5, 8, 8, generator=g)
    kmap = qmap * torch.tensor([2.0, 3.0, 0.5]).reshape(3, 1, 1, 1)
    patches = sample_shared_patches(qmap, kmap, num_patches=20, generator=g)
    assert patches.query.shape == patches.key.shape == (3, 20, 5)
    assert patches.positions.shape == (20,)
    torch.testing.assert_close(patches.query, gather_patches(qmap, patches.positions))
    torch.testing.assert_close(patches.key, gather_patches(kmap, patches.positions))
    ratio = patches.key / patches.query
    torch.testing.assert_close(
        ratio, torch.tensor([2.0, 3.0, 0.5]).reshape(3, 1, 1).expand_as(ratio)
    )


# ---------------------------------------------------------------------------------------------
# ZeroShotContrastiveLoss with toy extractors


class OrthonormalMaps:
    """Ignores the image's content: per-position orthonormal vectors (C = h·w), scaled by the
    image mean (keeps a gradient path), so x == y gives q = k position by position."""

    def __init__(self, sizes: Sequence[int] = (8, 4)) -> None:
        self.maps = [_orthogonal(s * s, seed=s).T.reshape(s * s, s, s).float() for s in sizes]

    def __call__(self, img: Tensor) -> list[Tensor]:
        scale = 1.0 + img.mean(dim=(1, 2, 3)).abs().reshape(-1, 1, 1, 1)
        return [scale * m[None].to(img.dtype) for m in self.maps]


class ConvStack(torch.nn.Module):
    """A random conv stack: three maps at three resolutions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(
            [
                torch.nn.Conv2d(3, 8, 3, padding=1),
                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
                torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            ]
        )
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for conv in self.convs:
            x = torch.tanh(conv(x))
            out.append(x)
        return out


def test_loss_uses_shared_positions_per_layer() -> None:
    """x == y with orthonormal per-position features: only shared positions give the analytic
    value per layer (independent draws would pair unrelated vectors: loss ~ log P)."""
    loss_fn = ZeroShotContrastiveLoss(OrthonormalMaps((8, 4)), num_patches=256)
    x = torch.rand(1, 3, 16, 16)
    got = loss_fn(x, x.clone(), generator=torch.Generator().manual_seed(0))
    want = sum(math.log1p((P - 1) * math.exp(-1 / TAU)) for P in (64, 16))
    assert float(got) == pytest.approx(want, abs=1e-5)


def test_sum_over_layers_and_layer_selection() -> None:
    net = ConvStack()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = torch.rand(2, 3, 16, 16, generator=g)
    full = ZeroShotContrastiveLoss(net, num_patches=32)
    total = full(x, y, generator=torch.Generator().manual_seed(3))
    # The same generator draws the layers in order: replay the draws by hand.
    gen = torch.Generator().manual_seed(3)
    parts = []
    for qmap, kmap in zip(net(x), net(y), strict=True):
        p = sample_shared_patches(qmap, kmap, num_patches=32, generator=gen)
        parts.append(patch_nce_loss(p.query, p.key))
    torch.testing.assert_close(total, sum(parts))
    assert len(parts) == 3
    # Selecting a single layer gives that layer's term (first draw of the generator).
    only2 = ZeroShotContrastiveLoss(net, num_patches=32, layers=(2,))
    fx, fy = net(x)[2], net(y)[2]
    p = sample_shared_patches(fx, fy, num_patches=32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        only2(x, y, generator=torch.Generator().manual_seed(3)), patch_nce_loss(p.query, p.key)
    )
    with pytest.raises(InputValueError, match="layers: layer index 3 is out of range"):
        ZeroShotContrastiveLoss(net, layers=(0, 3))(x, y)


def test_reproducible_with_generator() -> None:
    loss_fn = ZeroShotContrastiveLoss(ConvStack(), num_patches=16)
    g = torch.Generator().manual_seed(8)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    a = loss_fn(x, y, generator=torch.Generator().manual_seed(11))
    b = loss_fn(x, y, generator=torch.Generator().manual_seed(11))
    c = loss_fn(x, y, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = loss_fn(x, y)
    torch.manual_seed(5)
    assert torch.equal(d, loss_fn(x, y))


def test_cross_batch_option_reaches_patch_nce() -> None:
    net = ConvStack()
    g = torch.Generator().manual_seed(9)
    x, y = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    within = ZeroShotContrastiveLoss(net, num_patches=16)(
        x, y, generator=torch.Generator().manual_seed(0)
    )
    cross = ZeroShotContrastiveLoss(net, num_patches=16, cross_batch_negatives=True)(
        x, y, generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(within) - float(cross)) > 1e-3
    x1, y1 = x[:1], y[:1]
    a = ZeroShotContrastiveLoss(net, num_patches=16)(
        x1, y1, generator=torch.Generator().manual_seed(0)
    )
    b = ZeroShotContrastiveLoss(net, num_patches=16, cross_batch_negatives=True)(
        x1, y1, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# LOSS-5: the U-Net encoder extractor


class TimestepSpy:
    """Records the noise input the U-Net's time embedding receives."""

    def __init__(self, net: UNet) -> None:
        self.seen: list[Tensor] = []
        net.time_embed.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
        self.seen.append(args[0].detach().clone())


def test_loss5_unet_encoder_runs_at_t0() -> None:
    net = _small_unet()
    spy = TimestepSpy(net)
    extractor = UNetEncoderFeatures(net)
    loss_fn = ZeroShotContrastiveLoss(extractor, num_patches=32)
    g = torch.Generator().manual_seed(10)
    for _ in range(2):  # whatever the "sampling step", the encoder sees t = 0
        x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
        loss_fn(x, y)
    assert len(spy.seen) == 4
    for t in spy.seen:
        assert t.dtype == torch.int64
        assert t.shape == (2,)
        assert t.tolist() == [0, 0]


def test_loss5_default_layers_are_zecon_indices_that_exist() -> None:
    net = _small_unet()  # maps: conv, res, down, res -> 4
    assert len(net.encoder_channels) == 4
    extractor = UNetEncoderFeatures(net)
    assert extractor.layers == (0, 2)
    x = torch.randn(1, 3, 16, 16)
    maps = extractor(x)
    full = net.encoder_features(x, torch.zeros(1, dtype=torch.long))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 16), (1, 16, 8, 8)]
    torch.testing.assert_close(maps[0], full[0])
    torch.testing.assert_close(maps[1], full[2])
    deeper = _small_unet(channel_mults=(1, 2, 2), num_res_blocks=2)  # 9 maps
    assert UNetEncoderFeatures(deeper).layers == (0, 2, 5, 8)
    assert UNetEncoderFeatures(net, layers=(1, 3)).layers == (1, 3)
    assert ZECON_LAYERS == (0, 2, 5, 8, 11)


def test_loss5_gradient_reaches_x_not_y() -> None:
    net = _small_unet()
    loss_fn = ZeroShotContrastiveLoss(UNetEncoderFeatures(net), num_patches=64)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 16, 16, generator=g).requires_grad_(True)
    y = torch.randn(2, 3, 16, 16, generator=g).requires_grad_(True)
    loss = loss_fn(x, y, generator=g)
    loss.backward()
    assert x.grad is not None
    assert float(x.grad.abs().max()) > 0.0
    assert y.grad is None
    assert all(p.grad is None for p in net.parameters())


def test_loss5_identical_images_give_query_equal_key() -> None:
    """x == y through the U-Net: q = k at shared positions, so the loss equals PatchNCE(q, q)."""
    net = _small_unet()
    extractor = UNetEncoderFeatures(net)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(12))
    got = ZeroShotContrastiveLoss(extractor, num_patches=32)(
        x, x.clone(), generator=torch.Generator().manual_seed(4)
    )
    gen = torch.Generator().manual_seed(4)
    want = torch.zeros(())
    for fmap in extractor(x):
        p = sample_shared_patches(fmap, fmap, num_patches=32, generator=gen)
        want = want + patch_nce_loss(p.query, p.query)
    torch.testing.assert_close(got, want)


def test_gamma_net_gets_the_clean_level() -> None:
    net = _small_unet(noise_conditioning="gamma")
    spy = TimestepSpy(net)
    UNetEncoderFeatures(net)(torch.randn(2, 3, 16, 16))
    assert spy.seen[-1].dtype == torch.float32
    assert spy.seen[-1].tolist() == [1.0, 1.0]
    UNetEncoderFeatures(net, t=0.9999)(torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(spy.seen[-1], torch.full((2,), 0.9999))
    timestep_net = _small_unet()
    spy2 = TimestepSpy(timestep_net)
    UNetEncoderFeatures(timestep_net, t=5)(torch.randn(1, 3, 16, 16))
    assert spy2.seen[-1].tolist() == [5]


def test_conditions_concat_and_prepare() -> None:
    net = _small_unet(in_channels=6, num_classes=4)
    labels = torch.tensor([1, 4])
    source = torch.randn(2, 3, 16, 16)
    x = torch.randn(2, 3, 16, 16)
    a = UNetEncoderFeatures(net, conditions={"class_labels": labels}, concat=source)(x)
    b = UNetEncoderFeatures(
        net, conditions={"class_labels": labels}, prepare=lambda v: torch.cat([source, v], dim=1)
    )(x)
    want = net.encoder_features(
        torch.cat([source, x], dim=1), torch.zeros(2, dtype=torch.long), class_labels=labels
    )
    for got_a, got_b, i in zip(a, b, (0, 2), strict=True):
        torch.testing.assert_close(got_a, want[i])
        torch.testing.assert_close(got_b, want[i])
    with pytest.raises(InputValueError, match="x: the net expects 6 input channels"):
        UNetEncoderFeatures(net, conditions={"class_labels": labels})(x)
    with pytest.raises(InputValueError, match="concat: expected shape"):
        UNetEncoderFeatures(net, conditions={"class_labels": labels}, concat=source[:1])(x)
    with pytest.raises(InputValueError, match="concat, prepare"):
        UNetEncoderFeatures(net, concat=source, prepare=lambda v: v)


def test_any_module_with_encoder_features() -> None:
    """A duck-typed net (no config, no encoder_channels): timestep zeros, layers resolved per call."""

    class Encoder:
        def __init__(self) -> None:
            self.t: list[Tensor] = []

        def encoder_features(self, x: Tensor, t: Tensor) -> list[Tensor]:
            self.t.append(t)
            return [x * (i + 1) for i in range(3)]

    enc = Encoder()
    maps = UNetEncoderFeatures(enc)(torch.ones(2, 3, 4, 4))
    assert [float(m.mean()) for m in maps] == [1.0, 3.0]  # ZeCon's 0 and 2
    assert enc.t[0].dtype == torch.int64
    assert enc.t[0].tolist() == [0, 0]
    with pytest.raises(InputValueError, match="layers: layer index 5 is out of range"):
        UNetEncoderFeatures(enc, layers=(5,))(torch.ones(2, 3, 4, 4))

    class Shallow(Encoder):
        def encoder_features(self, x: Tensor, t: Tensor) -> list[Tensor]:
            return [x]

    only0 = UNetEncoderFeatures(Shallow())(torch.ones(1, 3, 4, 4))
    assert len(only0) == 1


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_patch_nce() -> None:
    q = torch.randn(2, 4, 3)
    with pytest.raises(InputValueError, match="query: expected a tensor with 3 dimensions"):
        patch_nce_loss(q[0], q[0])
    with pytest.raises(InputValueError, match=r"key: expected shape \(2, 4, 3\)"):
        patch_nce_loss(q, q[:, :3])
    with pytest.raises(InputTypeError, match=r"query: expected a torch\.Tensor"):
        patch_nce_loss(q.tolist(), q)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="key: expected a floating-point tensor"):
        patch_nce_loss(q, q.long())
    for bad in (0.0, -1.0):
        with pytest.raises(InputValueError, match="temperature: expected a float > 0"):
            patch_nce_loss(q, q, temperature=bad)
    with pytest.raises(InputValueError, match="diagonal_fill: expected a finite float"):
        patch_nce_loss(q, q, diagonal_fill=float("-inf"))
    with pytest.raises(InputTypeError, match="cross_batch_negatives: expected a bool"):
        patch_nce_loss(q, q, cross_batch_negatives=1)  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="query: expected a non-empty tensor"):
        patch_nce_loss(q[:, :0], q[:, :0])


def test_bad_input_sampling() -> None:
    with pytest.raises(InputValueError, match="num_patches: expected an int >= 1"):
        sample_patch_positions(10, 0)
    with pytest.raises(InputTypeError, match=r"generator: expected None or one torch\.Generator"):
        sample_patch_positions(10, 3, generator=[torch.Generator()])  # type: ignore[arg-type]
    fmap = torch.randn(1, 2, 3, 3)
    with pytest.raises(InputValueError, match=r"positions: expected flat positions in \[0, 8\]"):
        gather_patches(fmap, torch.tensor([9]))
    with pytest.raises(InputTypeError, match="positions: expected an integer tensor"):
        gather_patches(fmap, torch.tensor([1.0]))
    with pytest.raises(InputValueError, match="key_map: expected shape"):
        sample_shared_patches(fmap, torch.randn(1, 2, 3, 4))
    with pytest.raises(InputValueError, match="query_map: expected a tensor with 4 dimensions"):
        sample_shared_patches(fmap[0], fmap[0])


def test_bad_input_loss() -> None:
    net = ConvStack()
    with pytest.raises(InputValueError, match="num_patches: expected an int >= 1"):
        ZeroShotContrastiveLoss(net, num_patches=0)
    with pytest.raises(InputValueError, match="temperature: expected a float > 0"):
        ZeroShotContrastiveLoss(net, temperature=0.0)
    with pytest.raises(InputTypeError, match="extractor: expected a callable"):
        ZeroShotContrastiveLoss("vgg")  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="layers: expected distinct"):
        ZeroShotContrastiveLoss(net, layers=(1, 1))
    with pytest.raises(InputValueError, match="layers: expected at least one"):
        ZeroShotContrastiveLoss(net, layers=())
    with pytest.raises(InputValueError, match=r"layers\[0\]: expected an int >= 0"):
        ZeroShotContrastiveLoss(net, layers=(-1,))
    loss_fn = ZeroShotContrastiveLoss(net)
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(InputValueError, match=r"y: expected shape \(2, 3, 16, 16\)"):
        loss_fn(x, x[:1])
    with pytest.raises(InputValueError, match="x: expected a tensor with 4 dimensions"):
        loss_fn(x[0], x[0])
    with pytest.raises(InputTypeError, match="generator: expected None or one"):
        loss_fn(x, x, generator=[torch.Generator(), torch.Generator()])  # type: ignore[arg-type]


def test_bad_extractors() -> None:
    x = torch.rand(2, 3, 8, 8)
    cases: list[tuple[object, type[Exception], str]] = [
        (lambda img: img, InputTypeError, "extractor: expected it to return a list"),
        (lambda img: [], InputValueError, "extractor: returned no feature maps"),
        (lambda img: [img, "map"], InputTypeError, "feature map 1 to be a torch.Tensor"),
        (lambda img: [img[0]], InputValueError, "feature map 0 to be a floating"),
        (lambda img: [img[:1]], InputValueError, "with B = 2"),
    ]
    for extractor, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ZeroShotContrastiveLoss(extractor)(x, x)  # type: ignore[arg-type]
    calls = {"n": 0}

    def varying(img: Tensor) -> list[Tensor]:
        calls["n"] += 1
        return [img] * calls["n"]

    with pytest.raises(InputValueError, match="returned 1 feature maps for x but 2 for y"):
        ZeroShotContrastiveLoss(varying)(x, x)
    calls["n"] = 0

    def reshaping(img: Tensor) -> list[Tensor]:
        calls["n"] += 1
        return [img[:, : calls["n"]]]

    with pytest.raises(InputValueError, match=r"feature map 0 has shape \(2, 1, 8, 8\) for x"):
        ZeroShotContrastiveLoss(reshaping)(x, x)


def test_bad_unet_extractor() -> None:
    net = _small_unet()
    with pytest.raises(InputTypeError, match="net: expected a network with an encoder_features"):
        UNetEncoderFeatures(torch.nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="layers: layer index 4 is out of range"):
        UNetEncoderFeatures(net, layers=(0, 4))
    with pytest.raises(InputValueError, match="noise_conditioning: expected one of"):
        UNetEncoderFeatures(net, noise_conditioning="sigma")  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="t: expected an int"):
        UNetEncoderFeatures(net, t=0.5)
    with pytest.raises(InputValueError, match=r"t: expected a float <= 1\.0"):
        UNetEncoderFeatures(_small_unet(noise_conditioning="gamma"), t=2.0)
    with pytest.raises(InputTypeError, match="concat: expected a floating-point tensor"):
        UNetEncoderFeatures(net, concat=torch.zeros(1, 3, 16, 16, dtype=torch.long))

    class NoMaps:
        def encoder_features(self, x: Tensor, t: Tensor) -> list[Tensor]:
            return [x[:, :1, :1, :1]]  # a single map: ZeCon's index 0 exists

    class Tensorish:
        def encoder_features(self, x: Tensor, t: Tensor) -> Tensor:
            return x

    with pytest.raises(
        InputTypeError, match=r"net\.encoder_features: expected it to return a list"
    ):
        UNetEncoderFeatures(Tensorish())(torch.zeros(1, 3, 4, 4))  # type: ignore[arg-type]
    assert len(UNetEncoderFeatures(NoMaps())(torch.zeros(1, 3, 4, 4))) == 1
    with pytest.raises(InputValueError, match="layers: none of ZeCon's layers"):
        UNetEncoderFeatures(
            type("Odd", (), {"encoder_channels": (), "encoder_features": NoMaps.encoder_features})()
        )


def test_gather_patches_refuses_negative_positions() -> None:
    """Flat positions are in ``[0, h w)``: a negative one (which torch would index from the end)
    is refused, not wrapped around."""
    fmap = torch.randn(1, 2, 3, 3)
    with pytest.raises(InputValueError, match=r"positions: expected flat positions in \[0, 8\]"):
        gather_patches(fmap, torch.tensor([0, -1]))


def test_concat_condition_must_match_the_images_spatially() -> None:
    """The channel-concatenated condition has the images' height and width, checked by name."""
    net = _small_unet(in_channels=6)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(InputValueError, match=r"concat: expected shape \(2, C, 16, 16\)"):
        UNetEncoderFeatures(net, concat=torch.randn(2, 3, 8, 8))(x)


def test_gamma_level_keeps_the_sample_precision() -> None:
    """For a gamma net the clean level is given in the sample's precision (at least float32):
    a float64 sample gets the float64 value of ``t``."""
    extractor = UNetEncoderFeatures(_small_unet(noise_conditioning="gamma"), t=0.9999)
    t64 = extractor.timesteps(torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    assert t64.dtype == torch.float64
    assert t64.tolist() == [0.9999, 0.9999]
    t16 = extractor.timesteps(torch.zeros(1, 3, 4, 4, dtype=torch.float16))
    assert t16.dtype == torch.float32


def test_float64_images_run_through_a_float32_unet() -> None:
    """A float64 sampler state is cast to the net's float32 (differentiably): the maps equal those
    of the float32 images, and the gradient reaches the float64 input."""
    extractor = UNetEncoderFeatures(_small_unet())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    x64 = x.double().requires_grad_(True)
    maps64 = extractor(x64)
    for got, want in zip(maps64, extractor(x), strict=True):
        torch.testing.assert_close(got, want)
    sum(m.sum() for m in maps64).backward()  # type: ignore[union-attr]
    assert x64.grad is not None
    assert x64.grad.dtype == torch.float64
    assert float(x64.grad.abs().max()) > 0.0
