"""Conditioning adapters: PAL-2 (concat order), PAL-4 (known pixels kept), PAL-6 (gamma), COND-1, COND-3, COND-8."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import imgdiff
from imgdiff import DDIM, DDPM, NoiseSchedule
from imgdiff.conditioning import (
    ClassifierFreeGuidance,
    ConcatConditioning,
    KnownRegion,
    NoiseLevelConditioning,
    check_mask,
    drop_conditions,
    sd_inpaint_input,
)
from imgdiff.nets import UNet, UNetConfig

from .conftest import backends_here, device_for


def test_pal2_concat_is_source_first() -> None:
    """The network sees (B, 6, H, W) = (source, noisy target) and returns (B, 3, H, W)."""
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x[:, 3:] * 0.5

    source, x_t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out = ConcatConditioning(net, source_channels=3)(x_t, torch.tensor([1, 2]), source=source)
    assert seen[0].shape == (2, 6, 8, 8)
    assert torch.equal(seen[0][:, :3], source)
    assert torch.equal(seen[0][:, 3:], x_t)
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^source: expected shape \(2, 3, 8, 8\) .* with 3 channels, got \(2, 1, 8, 8\)",
    ):
        ConcatConditioning(net, source_channels=3)(
            x_t, torch.tensor([1, 2]), source=torch.randn(2, 1, 8, 8)
        )
    with pytest.raises(imgdiff.InputValueError, match=r"^source: expected the condition image"):
        ConcatConditioning(net)(x_t, torch.tensor([1, 2]))
    unet = UNet(UNetConfig(in_channels=6))
    with pytest.raises(imgdiff.InputValueError, match=r"^x: expected 6 channels"):
        ConcatConditioning(unet)(x_t, torch.tensor([1, 2]), source=torch.randn(2, 4, 8, 8))


def test_cond8_sd_inpaint_layout() -> None:
    """(B, 9, h, w) with z_t in channels 0-3, the mask at channel 4, masked latents in 5-8."""
    z, m, zm = (
        torch.randn(2, 4, 8, 8),
        (torch.rand(2, 1, 8, 8) > 0.5).float(),
        torch.randn(2, 4, 8, 8),
    )
    x = sd_inpaint_input(z, m, zm)
    assert x.shape == (2, 9, 8, 8)
    assert torch.equal(x[:, 4:5], m)
    assert torch.equal(x[:, :4], z)
    assert torch.equal(x[:, 5:], zm)
    with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected shape \(2, 1, 8, 8\)"):
        sd_inpaint_input(z, torch.ones(2, 1, 16, 16), zm)


@pytest.mark.parametrize(
    "sampler",
    [DDPM(NoiseSchedule.linear()), DDIM(NoiseSchedule.linear(), eta=1.0)],
    ids=["ddpm", "ddim"],
)
def test_pal4_known_pixels_stay_exact(sampler: imgdiff.Sampler) -> None:  # type: ignore[type-arg]
    """After every step (1 - m) x_t == (1 - m) x_0 bitwise, with the clean paste."""
    g = torch.Generator().manual_seed(0)
    known = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    region = KnownRegion(known, mask)
    states: list[torch.Tensor] = []

    def callback(info: imgdiff.StepInfo[torch.Tensor]) -> torch.Tensor:
        x = region(info)
        states.append(x)
        return x

    model = imgdiff.GaussianDenoiser(NoiseSchedule.linear(), mean=0.0, std=0.5)
    out = sampler.sample(
        model,
        region.start(torch.randn(2, 3, 8, 8, generator=g)),
        num_steps=20,
        callback=callback,
        generator=g,
        progress=False,
    )
    keep = ~mask.bool().expand_as(known)
    assert all(torch.equal(s[keep], known[keep]) for s in states)
    assert torch.equal(out[keep], known[keep])
    assert not torch.equal(out[~keep], known[~keep])


def test_noised_paste_is_at_the_next_level() -> None:
    """RePaint-style paste: known pixels at the step's next level have the forward marginal there."""
    s = NoiseSchedule.linear()
    known = torch.full((4000, 1, 2, 2), 0.6)
    mask = torch.zeros(1, 1, 2, 2)
    region = KnownRegion(
        known, mask, mode="noised", schedule=s, generator=torch.Generator().manual_seed(0)
    )
    x = region.paste(torch.zeros_like(known), 300)
    ab = float(s.alphas_cumprod[300])
    assert abs(float(x.mean()) - math.sqrt(ab) * 0.6) < 0.02
    assert abs(float(x.var()) / (1 - ab) - 1) < 0.05
    assert torch.equal(region.paste(torch.zeros_like(known), -1), known)  # the final level is clean
    with pytest.raises(
        imgdiff.InputTypeError, match=r"^schedule: expected the sampler's NoiseSchedule"
    ):
        KnownRegion(known, mask, mode="noised")
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^mask: expected a binary mask of 0 and 1 .* got the value 0.5",
    ):
        KnownRegion(known, torch.full((1, 1, 2, 2), 0.5))
    with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected shape \(4000, 1, 2, 2\)"):
        KnownRegion(known, torch.zeros(1, 1, 3, 3))
    # a level outside the schedule is named (1000 was a raw IndexError, -5 a clean paste)
    for bad in (1000, -5):
        with pytest.raises(
            imgdiff.InputValueError, match=r"^timestep: expected an int in \[-1, 999\]"
        ):
            region.paste(torch.zeros_like(known), bad)
    with pytest.raises(imgdiff.InputValueError, match=r"^noise: expected shape \(4000, 1, 2, 2\)"):
        region.start(torch.zeros(4000, 1, 2, 3), 999)


@pytest.mark.parametrize("backend", backends_here())
def test_paste_is_differentiable_in_the_known_image(backend: str) -> None:
    """A known image that needs a gradient (fitted through the paste) keeps it on every backend:
    the fused kernels leave such a paste to torch."""
    known = torch.rand(1, 3, 4, 4, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # top half is the hole
    region = KnownRegion(known, mask, backend=backend)  # type: ignore[arg-type]
    with torch.enable_grad():
        region.paste(torch.zeros(1, 3, 4, 4), -1).sum().backward()
    assert known.grad is not None
    want = torch.ones(1, 3, 4, 4)
    want[..., :2, :] = 0  # the hole takes x, not known
    assert torch.equal(known.grad, want)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("mode", ["clean", "noised"])
def test_the_holes_content_is_ignored_on_every_backend(backend: str, mode: str) -> None:
    """NaN or inf in the hole of ``known`` (its content is ignored) never reaches the sample on
    any backend, though the fused kernels blend arithmetically (``0 * NaN``)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    known = (torch.rand(1, 3, 8, 8, generator=g) * 2 - 1).to(dev)
    hole = torch.zeros(1, 1, 8, 8, dtype=torch.bool, device=dev)
    hole[..., 2:6, 2:6] = True
    for fill in (float("nan"), float("inf")):
        bad = known.clone()
        bad[hole.expand_as(bad)] = fill
        region = KnownRegion(
            bad,
            hole,
            mode=mode,
            schedule=s,
            generator=torch.Generator().manual_seed(1),
            backend=backend,  # type: ignore[arg-type]
        )
        start = torch.randn(1, 3, 8, 8, generator=g).to(dev)
        x = region.start(start, None if mode == "clean" else 999)
        out = DDIM(s, backend=backend).sample(  # type: ignore[arg-type]
            lambda z, t: 0.1 * z, x, num_steps=5, callback=region, progress=False
        )
        assert torch.isfinite(out).all(), (fill, backend)
        keep = ~hole.expand_as(known)
        assert torch.equal(out[keep], known[keep])


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8)])
def test_paste_of_an_empty_batch(backend: str, shape: tuple[int, ...]) -> None:
    known = torch.zeros(shape)
    region = KnownRegion(known, torch.zeros(shape[0], 1, *shape[2:]), backend=backend)  # type: ignore[arg-type]
    assert region.paste(torch.zeros(shape), -1).shape == shape


def test_noised_paste_through_a_sampler_run() -> None:
    """As a DDIM callback: after each step the known pixels follow q(x_s | x_0) at the step's next
    level s, and the returned sample's known region is exactly the clean image."""
    s = NoiseSchedule.linear()
    known = torch.full((2000, 1, 2, 2), -0.4)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1
    region = KnownRegion(
        known, mask, mode="noised", schedule=s, generator=torch.Generator().manual_seed(1)
    )
    seen: dict[int, torch.Tensor] = {}

    def callback(info: imgdiff.StepInfo[torch.Tensor]) -> torch.Tensor:
        x = region(info)
        seen[info.next_timestep] = x[..., 1, 1].clone()
        return x

    sampler = DDIM(s)
    first = sampler.timesteps(5)[0]
    out = sampler.sample(
        imgdiff.GaussianDenoiser(s, mean=0.0, std=0.5),
        region.start(torch.randn(2000, 1, 2, 2), int(first)),
        num_steps=5,
        callback=callback,
        progress=False,
    )
    assert sorted(seen) == [-1, *sorted(int(t) for t in sampler.timesteps(5)[1:])]
    for t, values in seen.items():
        if t < 0:
            continue
        ab = float(s.alphas_cumprod[t])
        assert abs(float(values.mean()) - math.sqrt(ab) * -0.4) < 0.05, t
        assert abs(float(values.var()) / (1 - ab) - 1) < 0.1, t
    keep = ~mask.bool().expand_as(known)
    assert torch.equal(out[keep], known[keep])


def test_pal6_gamma_conditioning_is_schedule_independent() -> None:
    """A gamma-conditioned net gives the same output whenever the same gamma is reached, through the
    training (T=2000) or a test (T=1000) schedule."""
    train = NoiseSchedule.linear(2000, 1e-6, 0.01)
    test = NoiseSchedule.from_alphas_cumprod(train.alphas_cumprod[1::2])  # shares every other level
    torch.manual_seed(0)
    net = UNet(UNetConfig(noise_conditioning="gamma")).eval()
    for p in net.parameters():
        if bool((p == 0).all()):
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 8, 8)
    t_test = torch.tensor([10, 700])
    a = NoiseLevelConditioning(net, train)(x, 2 * t_test + 1)
    b = NoiseLevelConditioning(net, test)(x, t_test)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, NoiseLevelConditioning(net, test)(x, t_test + 1))
    with pytest.raises(imgdiff.InputValueError, match=r"^net: expected a network conditioned on"):
        NoiseLevelConditioning(UNet(UNetConfig()), test)
    # through the wrapper the docs compose it with, too
    with pytest.raises(imgdiff.InputValueError, match=r"^net: expected a network conditioned on"):
        NoiseLevelConditioning(ConcatConditioning(UNet(UNetConfig())), test)


def _gamma_recorder() -> tuple[list[torch.Tensor], Callable[..., torch.Tensor]]:
    """A gamma-conditioned stand-in network that records the gammas it is given."""
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        seen.append(gamma)
        return x

    return seen, net


def test_noise_level_gamma_is_alpha_bar_at() -> None:
    """gamma(t) = schedule.alpha_bar_at(t): -1 is the clean level; bad timesteps are named."""
    s = NoiseSchedule.linear()
    seen, net = _gamma_recorder()
    wrapped = NoiseLevelConditioning(net, s)
    t = torch.tensor([-1, 0, 500, 999])
    wrapped(torch.zeros(4, 1, 2, 2, dtype=torch.float64), t)
    torch.testing.assert_close(seen[0], s.alpha_bar_at(t), rtol=0, atol=0)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^t: expected timesteps in \[-1, 999\], got"
    ):
        wrapped(torch.zeros(1, 1, 2, 2), torch.tensor([1000]))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^t: expected timesteps in \[-1, 999\], got"
    ):
        wrapped(torch.zeros(1, 1, 2, 2), torch.tensor([-5]))
    with pytest.raises(imgdiff.InputTypeError, match=r"^t: expected an integer tensor"):
        wrapped(torch.zeros(1, 1, 2, 2), torch.tensor([10.7]))


def test_cond1_cfg_endpoints_and_the_other_convention() -> None:
    """w = 1 gives the conditional output, w = 0 the unconditional; (1 + w') c - w' u equals w = 1 + w'."""

    def model(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * label.reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 4])
    null, cond = {"label": torch.zeros(1)}, {"label": torch.tensor([1.0, 2.0])}
    c, u = model(x, t, **cond), model(x, t, label=torch.zeros(2))
    torch.testing.assert_close(
        ClassifierFreeGuidance(model, 1.0, null)(x, t, **cond), c, rtol=0, atol=1e-7
    )
    torch.testing.assert_close(
        ClassifierFreeGuidance(model, 0.0, null)(x, t, **cond), u, rtol=0, atol=1e-7
    )
    w_prime = 2.5
    torch.testing.assert_close(
        ClassifierFreeGuidance(model, 1 + w_prime, null)(x, t, **cond),
        (1 + w_prime) * c - w_prime * u,
        rtol=0,
        atol=1e-6,
    )


def test_cond3_condition_dropout() -> None:
    """The empirical drop rate over 10 000 draws is within 3 sigma of p; dropped items carry the null exactly."""
    B, p = 10_000, 0.1
    cond = {"label": torch.arange(B) % 7 + 1, "context": torch.randn(B, 2, 3)}
    null = {"label": torch.zeros(1, dtype=torch.int64), "context": torch.full((1, 2, 3), -5.0)}
    out, dropped = drop_conditions(
        cond, null, p, batch=B, generator=torch.Generator().manual_seed(0)
    )
    rate = float(dropped.float().mean())
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / B)
    assert bool((out["label"][dropped] == 0).all())
    assert bool((out["context"][dropped] == -5.0).all())
    assert torch.equal(out["label"][~dropped], cond["label"][~dropped])
    with pytest.raises(imgdiff.InputValueError, match=r"^null: expected the keys of cond"):
        drop_conditions(cond, {"label": null["label"]}, p, batch=B)
    with pytest.raises(imgdiff.InputValueError, match=r"^batch: expected an int >= 1, got -1"):
        drop_conditions(cond, null, p, batch=-1)
    with pytest.raises(imgdiff.InputTypeError, match=r"^batch: expected an int, got 3.0"):
        drop_conditions(cond, null, p, batch=3.0)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^cond: expected a mapping"):
        drop_conditions(None, null, p, batch=B)  # type: ignore[arg-type]
    # a float null for integer labels would be rounded, not carried exactly
    with pytest.raises(imgdiff.InputTypeError, match=r"^null\['label'\]: expected a dtype that"):
        drop_conditions(cond, {**null, "label": torch.full((1,), 0.7)}, p, batch=B)


def test_noised_paste_at_timestep_zero_is_still_noised() -> None:
    """Only timestep -1 is the clean level: a paste at t = 0 is sqrt(ab_0) known + sqrt(1 - ab_0) z
    with the same noise a generator of the same seed draws, and the hole keeps x."""
    s = NoiseSchedule.linear()
    known = torch.full((2, 1, 4, 4), 0.8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    for t in (0, 1, 999):
        region = KnownRegion(
            known,
            mask,
            mode="noised",
            schedule=s,
            generator=torch.Generator().manual_seed(7),
            backend="torch",
        )
        x = torch.full_like(known, -3.0)
        got = region.paste(x, t)
        z = torch.randn(known.shape, generator=torch.Generator().manual_seed(7), dtype=known.dtype)
        ab = s.alphas_cumprod[t]
        want = torch.where(mask.bool(), x, ab.sqrt() * known + (1 - ab).sqrt() * z)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert not torch.equal(got[..., 2:, :], known[..., 2:, :])


def test_noise_level_gamma_keeps_float32_for_half_samples() -> None:
    """A float16 sample still gets gamma in float32: alpha_bar_0 = 0.9999 would round to 1 in half."""
    s = NoiseSchedule.linear()
    seen, net = _gamma_recorder()
    NoiseLevelConditioning(net, s)(
        torch.zeros(2, 1, 2, 2, dtype=torch.float16), torch.tensor([0, -1])
    )
    assert seen[0].dtype == torch.float32
    assert float(seen[0][0]) == float(torch.tensor(float(s.alphas_cumprod[0]), dtype=torch.float32))
    assert float(seen[0][0]) < 1.0
    assert float(seen[0][1]) == 1.0


def test_sd_inpaint_input_checks_the_masked_latents_shape() -> None:
    """The masked-image latents must have the latents' shape: another channel count would shift
    every channel after the mask, so it is refused rather than concatenated."""
    z, m = torch.randn(2, 4, 8, 8), torch.ones(2, 1, 8, 8)
    for bad in (torch.randn(2, 3, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(2, 4, 4, 4)):
        with pytest.raises(
            imgdiff.InputValueError,
            match=r"^masked_image_latents: expected shape \(2, 4, 8, 8\) \(the shape of latents\)",
        ):
            sd_inpaint_input(z, m, bad)


def test_condition_dropout_draws_each_sample_from_its_own_generator() -> None:
    """With one generator per sample, sample i is dropped iff the first uniform of its own
    generator is below p: the decision does not depend on the other samples' generators."""
    seeds, p = [3, 11, 5, 8, 0, 42, 7, 19], 0.5
    cond = {"label": torch.arange(1, len(seeds) + 1)}
    null = {"label": torch.zeros(1, dtype=torch.int64)}
    want = torch.tensor(
        [float(torch.rand((), generator=torch.Generator().manual_seed(s))) < p for s in seeds]
    )
    assert 0 < int(want.sum()) < len(seeds)  # the seeds give both outcomes
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out, dropped = drop_conditions(cond, null, p, batch=len(seeds), generator=gens)
    assert torch.equal(dropped, want)
    assert torch.equal(out["label"], torch.where(want, 0, cond["label"]))
    # reversing the generators reverses the decisions
    rev = [torch.Generator().manual_seed(s) for s in reversed(seeds)]
    _, dropped_rev = drop_conditions(cond, null, p, batch=len(seeds), generator=rev)
    assert torch.equal(dropped_rev, want.flip(0))


def test_condition_dropout_refuses_a_null_that_only_broadcasts() -> None:
    """The null value has the condition's per-sample shape and batch 1 or B: a null that would
    merely broadcast (fewer dimensions, a size-1 axis) or has another batch is refused."""
    B = 4
    cond = {"context": torch.randn(B, 2, 3)}
    for bad in (
        torch.zeros(1, 1, 3),
        torch.zeros(1, 3),
        torch.zeros(2, 2, 3),
        torch.zeros(3, 2, 3),
    ):
        with pytest.raises(
            imgdiff.InputValueError,
            match=r"^null\['context'\]: expected shape \(1 or 4, 2, 3\) like cond\['context'\]",
        ):
            drop_conditions(cond, {"context": bad}, 0.5, batch=B)
    # batch 1 and batch B are both fine
    for good in (torch.zeros(1, 2, 3), torch.zeros(B, 2, 3)):
        out, _ = drop_conditions(cond, {"context": good}, 1.0, batch=B)
        assert torch.equal(out["context"], torch.zeros(B, 2, 3))


def test_check_mask_refuses_another_batch() -> None:
    """A hole mask has batch 1 (shared) or the images' batch B; any other batch is refused, also
    by KnownRegion at construction."""
    like = torch.zeros(2, 3, 4, 4)
    assert check_mask("mask", torch.ones(1, 1, 4, 4), like).shape == (1, 1, 4, 4)
    assert check_mask("mask", torch.ones(2, 1, 4, 4), like).shape == (2, 1, 4, 4)
    for batch in (3, 4):
        with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected shape \(2, 1, 4, 4\)"):
            check_mask("mask", torch.ones(batch, 1, 4, 4), like)
        with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected shape \(2, 1, 4, 4\)"):
            KnownRegion(like, torch.ones(batch, 1, 4, 4))


def test_concat_casts_the_source_to_the_samples_dtype() -> None:
    """A float64 condition image joins a float32 sample as float32 (the network's input dtype
    is the sample's), with the source still first."""
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x[:, 3:]

    source = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_t = torch.randn(2, 3, 4, 4)
    ConcatConditioning(net)(x_t, torch.tensor([1, 2]), source=source)
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0], torch.cat([source.float(), x_t], dim=1))


def test_check_mask_refuses_several_channels() -> None:
    """A hole mask has one channel (shared by the image's channels): a per-channel mask
    ``(B, C, H, W)`` is refused."""
    like = torch.zeros(2, 3, 4, 4)
    for channels in (2, 3):
        with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected shape \(2, 1, 4, 4\)"):
            check_mask("mask", torch.ones(2, channels, 4, 4), like)
