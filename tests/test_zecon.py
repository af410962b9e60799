"""ZeCon-style editing (spec 7.7): presets, plumbing of inversion and plan, terms and gates."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import imgdiff
from imgdiff import ZeConConfig, zecon_edit
from imgdiff.clip import CLIPEncoder, load_clip, register_clip_config, tiny_clip_config
from imgdiff.loss_guidance import GuidanceInputs, LossTerm
from imgdiff.losses import (
    CLIPAugment,
    CLIPDirectionalLoss,
    CLIPGlobalLoss,
    UNetEncoderFeatures,
    ZeroShotContrastiveLoss,
    mse_loss,
    range_loss,
)
from imgdiff.nets import UNet, UNetConfig
from imgdiff.samplers.step import StepContext

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError
SCHED = imgdiff.NoiseSchedule.linear()


@pytest.fixture(scope="module")
def clip() -> CLIPEncoder:
    register_clip_config("imgdiff-test-tiny", tiny_clip_config())
    return CLIPEncoder(load_clip("imgdiff-test-tiny", seed=0), resize="pool")


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            base_channels=16, channel_mults=(1, 2), attention_levels=(), learned_variance=True
        )
    )
    return unet.eval().requires_grad_(False)


def _source(B: int = 1) -> Tensor:
    return torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_presets_follow_the_paper() -> None:
    readme = ZeConConfig.readme()
    assert (readme.clip_global_patch, readme.clip_dir_patch, readme.zecon) == (10000, 20000, 500)
    assert (readme.mse, readme.vgg, readme.range) == (5000, 100, 50)
    assert (readme.num_steps, readme.skip, readme.patch_max) == (50, 25, 0.3)
    assert readme.strength == 0.5
    code = ZeConConfig.code_defaults()
    assert (code.clip_dir_patch, code.range, code.num_steps, code.skip, code.patch_max) == (
        1000,
        50,
        100,
        25,
        0.05,
    )
    assert code.clip_global_patch == code.zecon == code.mse == code.vgg == 0


def test_edit_reports_every_term_and_gates_by_timestep(clip: CLIPEncoder, net: UNet) -> None:
    seen: list[tuple[int, set[str]]] = []

    def log(ctx: StepContext, values: dict[str, Tensor]) -> None:
        assert all(torch.isfinite(v) for v in values.values())
        seen.append((ctx.timestep, set(values)))

    config = replace(ZeConConfig.readme(), num_steps=10, skip=0, n_patch=2)
    out = zecon_edit(
        imgdiff.DDPM(SCHED, variance="learned_range"),
        net,
        _source(),
        clip=clip,
        source_text="photo",
        target_text="sketch",
        config=config,
        contrastive=ZeroShotContrastiveLoss(UNetEncoderFeatures(net)),
        vgg=mse_loss,  # any pair loss; a real VGG is tested in test_losses_perceptual
        inversion="diffuse",
        generator=torch.Generator().manual_seed(0),
        on_terms=log,
        progress=False,
    )
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()
    assert len(seen) == 10
    base = {"clip_global_patch", "clip_dir_patch", "zecon", "range"}
    for t, names in seen:
        expected = base | ({"mse"} if t < 700 else set()) | ({"vgg"} if t < 800 else set())
        assert names == expected, t


def _edit_without_active_guidance(
    sampler: imgdiff.DDIM | None = None, **kwargs: Any
) -> tuple[imgdiff.GaussianDenoiser, torch.Tensor, torch.Tensor]:
    """``(model, source, edit)``: 10 steps, skip 4, only the range loss on an ``x0_hat`` that
    stays in [-1, 1] (so no guidance acts), a CLIP encoder that is never called; DDIM by
    default."""
    model = imgdiff.GaussianDenoiser(SCHED, std=0.2)
    source = _source(2).double() * 0.5
    config = ZeConConfig(clip_dir_patch=0.0, range=50.0, num_steps=10, skip=4)
    encoder = object.__new__(CLIPEncoder)  # never called: no CLIP term has weight
    out = zecon_edit(
        sampler if sampler is not None else imgdiff.DDIM(SCHED),
        model,
        source,
        clip=encoder,
        source_text="a",
        target_text="b",
        config=config,
        progress=False,
        **kwargs,
    )
    return model, source, out


def test_edit_without_active_guidance_is_ddim_inversion_and_reconstruction() -> None:
    """Only the range loss, on an x0_hat that stays in [-1, 1]: no guidance, so the edit is the
    DDIM inversion of the source to the first kept level followed by DDIM sampling back."""
    model, source, out = _edit_without_active_guidance()
    ddim = imgdiff.DDIM(SCHED)
    start = ddim.invert(model, source, num_steps=10, strength=0.6, progress=False)
    expected = ddim.sample(model, start, num_steps=10, strength=0.6, progress=False)
    torch.testing.assert_close(out, expected)


def test_edit_runs_exactly_num_steps_minus_skip_steps() -> None:
    model = imgdiff.GaussianDenoiser(SCHED, std=0.2)
    encoder = object.__new__(CLIPEncoder)  # never called: no CLIP term has weight
    for num_steps, skip in ((22, 7), (49, 48), (10, 0)):
        steps: list[int] = []
        zecon_edit(
            imgdiff.DDIM(SCHED),
            model,
            _source(),
            clip=encoder,
            source_text="a",
            target_text="b",
            config=ZeConConfig(clip_dir_patch=0.0, num_steps=num_steps, skip=skip),
            callback=lambda info, steps=steps: steps.append(info.timestep),
            progress=False,
        )
        assert steps == list(imgdiff.DDIM(SCHED).timesteps(num_steps))[skip:]


def test_generator_reproduces_the_edit_and_float64_sources_work(
    clip: CLIPEncoder, net: UNet
) -> None:
    config = replace(ZeConConfig.readme(), vgg=0.0, mse=0.0, num_steps=4, skip=2, n_patch=2)
    contrastive = ZeroShotContrastiveLoss(UNetEncoderFeatures(net))

    def edit(global_seed: int) -> Tensor:
        torch.manual_seed(global_seed)
        return zecon_edit(
            imgdiff.DDPM(SCHED, variance="learned_range"),
            net,
            _source().double(),  # a float64 state with the float32 network and losses
            clip=clip,
            source_text="photo",
            target_text="sketch",
            config=config,
            contrastive=contrastive,
            generator=torch.Generator().manual_seed(7),
            progress=False,
        )

    a, b = edit(0), edit(1)
    assert a.dtype == torch.float64
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input(clip: CLIPEncoder, net: UNet) -> None:
    sampler = imgdiff.DDPM(SCHED, variance="learned_range")
    kw = {"clip": clip, "source_text": "a", "target_text": "b", "progress": False}
    with pytest.raises(IVE, match="contrastive"):
        zecon_edit(sampler, net, _source(), config=ZeConConfig.readme(), **kw)  # type: ignore[arg-type]
    with pytest.raises(IVE, match="source"):
        zecon_edit(sampler, net, torch.zeros(1, 1, 32, 32), **kw)  # type: ignore[arg-type]
    with pytest.raises(ITE, match="sampler"):
        zecon_edit(imgdiff.EDICT(SCHED), net, _source(), **kw)  # type: ignore[arg-type]
    with pytest.raises(IVE, match="inversion"):
        zecon_edit(sampler, net, _source(), inversion="ode", **kw)  # type: ignore[arg-type]
    with pytest.raises(ITE, match="config"):
        zecon_edit(sampler, net, _source(), config={"zecon": 1.0}, **kw)  # type: ignore[arg-type]
    with pytest.raises(IVE, match="skip"):
        ZeConConfig(num_steps=10, skip=10)
    with pytest.raises(IVE, match="mse"):
        ZeConConfig(mse=-1.0)
    with pytest.raises(IVE, match="patch_min"):
        ZeConConfig(patch_min=0.5, patch_max=0.1)
    with pytest.raises(IVE, match="gate_on"):
        ZeConConfig(gate_on="index")  # type: ignore[arg-type]


def test_example_runs_and_reports_each_term_per_step(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "zecon_style_transfer.py"),
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 5
    for name in ("clip_global_patch", "clip_dir_patch", "zecon", "vgg", "range"):
        assert all(name in line for line in steps), name
    assert (tmp_path / "zecon.png").stat().st_size > 500


def test_diffuse_inversion_starts_from_q_sample_at_the_first_kept_step() -> None:
    """``inversion="diffuse"``: the edit starts from ``sqrt(ab) x_src + sqrt(1 - ab) noise`` at
    the first kept timestep, the noise drawn from ``generator``; without active guidance it is
    DDIM sampling from there over the kept steps."""
    torch.manual_seed(123)  # the global generator must not matter
    model, source, out = _edit_without_active_guidance(
        inversion="diffuse", generator=torch.Generator().manual_seed(3)
    )
    kept = list(imgdiff.DDIM(SCHED).timesteps(10))[4:]
    noise = torch.randn(
        source.shape, generator=torch.Generator().manual_seed(3), dtype=source.dtype
    )
    ab = float(SCHED.alphas_cumprod[kept[0]])
    start = math.sqrt(ab) * source + math.sqrt(1 - ab) * noise
    expected = imgdiff.DDIM(SCHED).sample(model, start, timesteps=kept, progress=False)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"final_alpha_bar": "first"},
        {"spacing": "trailing"},
        {"spacing": "leading", "steps_offset": 1},
    ],
)
def test_ddim_inversion_uses_the_samplers_plan_settings(settings: dict[str, Any]) -> None:
    """The DDIM inversion runs with the sampler's own settings (final level, spacing, offset):
    without active guidance the edit is that sampler's inversion then its sampling."""
    sampler = imgdiff.DDIM(SCHED, **settings)
    model, source, out = _edit_without_active_guidance(sampler)
    start = sampler.invert(model, source, num_steps=10, strength=0.6, progress=False)
    expected = sampler.sample(model, start, num_steps=10, strength=0.6, progress=False)
    torch.testing.assert_close(out, expected)


class _BuiltError(Exception):
    """Raised by a stand-in LossGuidance to hand back what zecon_edit built."""

    def __init__(self, terms: list[LossTerm], kwargs: dict[str, Any]) -> None:
        super().__init__("built")
        self.terms = {term.name: term for term in terms}
        self.kwargs = kwargs


def test_every_term_is_the_documented_loss(
    clip: CLIPEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each weight of the config guides with its loss (spec 7.4-7.7): spherical CLIP distance to
    the target over whole-image or patch augmentations (the config's ``n_patch``, patch area,
    CLIP's input size), ZeCon's directional loss (raw embeddings, source image, both texts), the
    contrastive loss with the edit's generator, MSE below 700, VGG below 800, LPIPS, and the
    range loss on ``x0_hat``."""

    def stand_in(terms: list[LossTerm], **kwargs: Any) -> None:
        raise _BuiltError(terms, kwargs)

    monkeypatch.setattr(importlib.import_module("imgdiff.zecon"), "LossGuidance", stand_in)
    config = ZeConConfig(
        clip_global=2.0,
        clip_global_patch=3.0,
        clip_dir=4.0,
        clip_dir_patch=5.0,
        zecon=6.0,
        mse=7.0,
        vgg=8.0,
        lpips=9.0,
        range=10.0,
        n_patch=2,
        patch_min=0.1,
        patch_max=0.3,
        gate_on="respaced_index",
    )
    contrastive = ZeroShotContrastiveLoss(lambda img: [img], num_patches=8)
    vgg = lambda a, b: (a - b).abs().mean()  # noqa: E731 - any pair losses
    lpips = lambda a, b: (a - b).abs().amax()  # noqa: E731
    g = torch.Generator()
    source = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with pytest.raises(_BuiltError) as built:
        zecon_edit(
            imgdiff.DDIM(SCHED),
            imgdiff.GaussianDenoiser(SCHED),
            source,
            clip=clip,
            source_text="photo",
            target_text="sketch",
            config=config,
            contrastive=contrastive,
            vgg=vgg,
            lpips=lpips,
            generator=g,
            progress=False,
        )
    terms, kwargs = built.value.terms, built.value.kwargs
    assert kwargs["gate_on"] == "respaced_index"
    assert kwargs["generator"] is g
    assert kwargs["source"] is source
    weights = {name: term.weight for name, term in terms.items()}
    assert weights == {
        "clip_global": 2.0,
        "clip_global_patch": 3.0,
        "clip_dir": 4.0,
        "clip_dir_patch": 5.0,
        "zecon": 6.0,
        "mse": 7.0,
        "vgg": 8.0,
        "lpips": 9.0,
        "range": 10.0,
    }
    gates = {name: term.max_timestep for name, term in terms.items()}
    assert gates == {**dict.fromkeys(terms), "mse": 700, "vgg": 800}
    inputs = {name: term.input for name, term in terms.items()}
    assert inputs == {**dict.fromkeys(terms, "blend"), "range": "x0_hat"}

    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2.4 - 1.2
    y = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    v = GuidanceInputs(x, y, x, torch.full((1,), 500), 500)

    def aug(patch: bool) -> CLIPAugment:
        return CLIPAugment(
            n_patch=2, patch=patch, patch_min=0.1, patch_max=0.3, output_size=clip.image_size
        )

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    expected = {
        "clip_global": CLIPGlobalLoss(clip, "sketch", augment=aug(False))(x, generator=seeded()),
        "clip_global_patch": CLIPGlobalLoss(clip, "sketch", augment=aug(True))(
            x, generator=seeded()
        ),
        "clip_dir": CLIPDirectionalLoss(
            clip, "photo", "sketch", variant="zecon", augment=aug(False)
        )(x, y, generator=seeded()),
        "clip_dir_patch": CLIPDirectionalLoss(
            clip, "photo", "sketch", variant="zecon", augment=aug(True)
        )(x, y, generator=seeded()),
        "zecon": contrastive(x, y, generator=seeded()),
        "mse": mse_loss(x, y),
        "vgg": vgg(x, y),
        "lpips": lpips(x, y),
        "range": range_loss(x),
    }
    assert float(expected["range"]) > 0
    for name, want in expected.items():
        g.manual_seed(11)
        torch.testing.assert_close(terms[name].loss(v), want, msg=name)
