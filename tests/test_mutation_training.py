"""Behaviour of training, degradations, metrics and image I/O that a mutation run found untested.

Each test pins a property the library documents (or the paper formula it implements) that the
other test files left open: mutants of ``training/``, ``losses/denoising.py``, ``degradations/``
(not the strokes), ``metrics/quality.py``, ``data/toy.py`` and ``images.py`` survived them. The
oracles are written here from the formulas, not read from the library.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import imgdiff
from imgdiff import NoiseSchedule
from imgdiff.data import SHAPE_NAMES, toy_shapes
from imgdiff.degradations import (
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
    to_grayscale,
    uncropping_mask,
    with_luma,
)
from imgdiff.images import image_grid, save_image_grid, to_uint8
from imgdiff.losses import (
    denoising_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    masked_denoising_loss,
    min_snr_weight_from_alpha_bar,
    vlb_term,
)
from imgdiff.metrics import psnr, ssim
from imgdiff.training import (
    CheckpointError,
    Trainer,
    TrainingBatch,
    TrainingConfig,
    ema_model,
    load_checkpoint,
    sample_gamma,
    sample_timesteps,
    save_checkpoint,
)

from .test_metrics import _ssim_oracle

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _alpha_bar(s: NoiseSchedule) -> torch.Tensor:
    """alpha_bar_t = prod_{i <= t} (1 - beta_i), from the betas alone (DDPM eq. 4)."""
    return torch.cumprod(1.0 - s.betas, dim=0)


class _Recorder(nn.Module):
    """A 1x1 convolution (``factor * 3`` output channels) that records its inputs."""

    def __init__(self, factor: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3 * factor, 1)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.conditions: list[dict[str, torch.Tensor]] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, level: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.inputs.append((x.detach().clone(), level.detach().clone()))
        self.conditions.append(cond)
        self.modes.append(self.training)
        out: torch.Tensor = self.conv(x)
        return out


# ====================================================================== the trainer's loss


@pytest.mark.parametrize("noise_level", ["timestep", "gamma"])
def test_an_exact_denoiser_of_one_image_has_zero_loss(noise_level: str) -> None:
    """Data = one image x0. The exact eps predictor (x_t - sqrt(ab) x0) / sqrt(1 - ab), evaluated
    at the noise level the network is given (ab = alpha_bar_t for a timestep, gamma itself for
    Palette's levels), has zero loss: so the level matches the noise of x_t. Palette's gamma is
    continuous, not one of the schedule's alpha_bar values."""
    s = NoiseSchedule.linear()
    table = _alpha_bar(s)
    x0 = (torch.rand(1, 3, 4, 4, generator=gen(0), dtype=torch.float64) * 2 - 1).expand(
        16, -1, -1, -1
    )
    levels: list[torch.Tensor] = []

    def exact(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        levels.append(level)
        ab = table[level] if noise_level == "timestep" else level.double()
        ab = ab.reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    net = nn.Conv2d(3, 3, 1).double()
    config = TrainingConfig(steps=1, noise_level=noise_level, seed=4)  # type: ignore[arg-type]
    trainer = Trainer(net, s, lambda step, g: TrainingBatch(x0), config, model=exact)
    loss = trainer.loss(TrainingBatch(x0))
    (level,) = levels
    if noise_level == "timestep":
        assert level.dtype == torch.int64
        assert len(set(level.tolist())) > 8
        assert float(loss.max()) < 1e-20
    else:  # gamma reaches the network in float32
        assert level.dtype == torch.float32
        assert float(loss.max()) < 1e-5
        assert not bool(torch.isin(level, table.float()).any())  # not snapped to alpha_bar_t
        assert bool(((level > 0) & (level < 1)).all())


def _recorded_draws(
    net: _Recorder, s: NoiseSchedule, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, t, alpha, sigma and eps of the last call, recovered from the network's input."""
    x_t, t = net.inputs[-1]
    ab = _alpha_bar(s)[t].reshape(-1, 1, 1, 1)
    a, sig = ab.sqrt(), (1 - ab).sqrt()
    return x_t, t, a, sig, (x_t - a * x0) / sig


@pytest.mark.parametrize("gamma", [0.5, 20.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_min_snr_weights_use_the_configured_gamma(prediction: str, gamma: float) -> None:
    """Min-SNR-gamma at gamma other than the paper's 5: the weight is min(SNR, gamma) / SNR (eps),
    min(SNR, gamma) / (SNR + 1) (v) or min(SNR, gamma) (x0)."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(32, 3, 4, 4, generator=gen(1), dtype=torch.float64) * 2 - 1
    batch = TrainingBatch(x0)
    losses = []
    net = _Recorder().double()
    for min_snr in (None, gamma):
        config = TrainingConfig(steps=1, prediction=prediction, min_snr_gamma=min_snr, seed=2)  # type: ignore[arg-type]
        losses.append(Trainer(net, s, lambda step, g: batch, config).loss(batch))
    _, t, *_ = _recorded_draws(net, s, x0)
    ab = _alpha_bar(s)[t]
    snr = ab / (1 - ab)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    want = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "sample": clipped}[prediction]
    assert float((want - 1).abs().max()) > 0.05
    torch.testing.assert_close(losses[1], losses[0] * want, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        min_snr_weight_from_alpha_bar(ab, prediction, gamma, dtype=torch.float64), want
    )  # type: ignore[arg-type]


def _eps_from_output(
    prediction: str, mean_out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, sig: torch.Tensor
) -> torch.Tensor:
    """eps_hat of a model output (spec 2.2): x0-pred eps = (x_t - a x0)/sig, v-pred eps = sig x_t + a v."""
    if prediction == "sample":
        return (x_t - a * mean_out) / sig
    if prediction == "v":
        return sig * x_t + a * mean_out
    return mean_out


@pytest.mark.parametrize("prediction", ["sample", "v"])
def test_hybrid_loss_reads_the_mean_half_with_the_prediction_type(prediction: str) -> None:
    """With a learned variance and x0 or v prediction, the trainer's loss and hybrid_loss are
    L_simple against that target plus lambda T L_t, where L_t is the VLB of the *same* model
    written as an eps-predictor (the mean half converted by hand)."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(6, 3, 4, 4, generator=gen(3), dtype=torch.float64) * 2 - 1
    batch = TrainingBatch(x0)
    torch.manual_seed(0)
    net = _Recorder(factor=2).double()
    config = TrainingConfig(steps=1, prediction=prediction, vlb_weight=0.01)  # type: ignore[arg-type]
    got = Trainer(net, s, lambda step, g: batch, config).loss(batch)
    x_t, t, a, sig, eps = _recorded_draws(net, s, x0)
    out = net.conv(x_t).detach()
    target = x0 if prediction == "sample" else a * eps - sig * x0
    as_eps = torch.cat([_eps_from_output(prediction, out[:, :3], x_t, a, sig), out[:, 3:]], dim=1)
    vlb = vlb_term(s, as_eps, x0, x_t, t, prediction="epsilon")
    simple = (out[:, :3] - target).square().mean(dim=(1, 2, 3))
    want = simple + 0.01 * 1000 * vlb
    assert float((vlb - vlb_term(s, out, x0, x_t, t)).abs().max()) > 1e-3  # the reading matters
    torch.testing.assert_close(got.detach(), want, rtol=1e-8, atol=1e-10)
    library = hybrid_loss(s, out, x0, x_t, eps, t, prediction=prediction, vlb_weight=0.01)  # type: ignore[arg-type]
    torch.testing.assert_close(library, want, rtol=1e-8, atol=1e-10)


def test_the_hybrid_loss_refuses_a_mask() -> None:
    """A learned variance is trained without a mask (improved DDPM's VLB is over all pixels)."""
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., 2:] = 1
    trainer = Trainer(
        _Recorder(factor=2),
        NoiseSchedule.linear(),
        lambda s, g: TrainingBatch(x0),
        TrainingConfig(steps=1),
    )
    with pytest.raises(
        IVE, match=r"^model output: a learned variance .* got noise_level='timestep' and a mask"
    ):
        trainer.loss(TrainingBatch(x0, mask=mask))


def test_the_trainer_checks_mask_values() -> None:
    """A float mask of the trainer must hold 0 and 1 only (checked on the first batch)."""
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    trainer = Trainer(
        _Recorder(), NoiseSchedule.linear(), lambda s, g: TrainingBatch(x0), TrainingConfig(steps=1)
    )
    with pytest.raises(
        IVE, match=r"^batch.mask: expected a binary mask of 0 and 1 .*got the value 0.5"
    ):
        trainer.loss(TrainingBatch(x0, mask=torch.full((2, 1, 4, 4), 0.5)))


def test_condition_dropout_draws_from_the_training_generator() -> None:
    """Which samples lose their condition depends on the config seed only, not on torch's global
    generator (resumable, reproducible runs)."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    labels = torch.arange(64) % 5
    batch = TrainingBatch(x0, {"class_labels": labels})
    seen = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        net = _Recorder()
        config = TrainingConfig(steps=1, p_uncond=0.5, seed=3)
        Trainer(
            net,
            s,
            lambda step, g: batch,
            config,
            null_conditions={"class_labels": torch.tensor([5])},
        ).loss(batch)
        seen.append(net.conditions[-1]["class_labels"])
    assert torch.equal(seen[0], seen[1])
    assert 10 < int((seen[0] == 5).sum()) < 54


# ====================================================================== the training loop


def test_gradients_are_clipped_to_grad_clip_before_the_step() -> None:
    """The optimiser sees a gradient of norm grad_clip when the raw norm is larger, and the raw
    gradient when grad_clip is None or above it."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(4, 3, 4, 4, generator=gen(5), dtype=torch.float64) * 2 - 1
    norms = {}
    for clip in (None, 1e-3, 1e4):
        torch.manual_seed(0)
        net = _Recorder().double()
        config = TrainingConfig(steps=1, grad_clip=clip, seed=1)
        trainer = Trainer(net, s, lambda step, g: TrainingBatch(x0), config)
        seen: list[float] = []
        step = trainer.optimizer.step

        def recording_step(*args, _step=step, _seen=seen, _net=net, **kwargs):  # type: ignore[no-untyped-def]
            _seen.append(float(torch.sqrt(sum(p.grad.square().sum() for p in _net.parameters()))))
            return _step(*args, **kwargs)

        trainer.optimizer.step = recording_step  # type: ignore[method-assign]
        trainer.train(progress=False)
        norms[clip] = seen[0]
    assert norms[None] > 0.05
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert norms[1e4] == pytest.approx(norms[None], rel=1e-12)


def test_checkpoints_are_written_every_checkpoint_every_steps_and_at_the_end(
    tmp_path: Path,
) -> None:
    """checkpoint_every=2 over 5 steps: the file holds step 2 while steps 2 and 3 run, step 4
    while step 4 runs, and step 5 at the end."""
    ck = tmp_path / "ck.safetensors"
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    net = nn.Conv2d(3, 3, 1)
    seen: list[int | None] = []

    def make(step: int, g: torch.Generator) -> TrainingBatch:
        seen.append(load_checkpoint(ck)[1]["step"] if ck.exists() else None)
        return TrainingBatch(x0)

    config = TrainingConfig(steps=5, checkpoint_every=2)
    Trainer(
        net, NoiseSchedule.linear(), make, config, model=lambda x, t: net(x), checkpoint=ck
    ).train(progress=False)
    assert seen == [None, None, 2, 2, 4]
    assert load_checkpoint(ck)[1]["step"] == 5


def _small_trainer(ck: Path, steps: int, **options: object) -> Trainer:
    torch.manual_seed(0)
    net = _Recorder().double()
    x0 = torch.rand(2, 3, 4, 4, generator=gen(6), dtype=torch.float64) * 2 - 1
    config = TrainingConfig(steps=steps, **options)  # type: ignore[arg-type]
    return Trainer(
        net, NoiseSchedule.linear(), lambda step, g: TrainingBatch(x0), config, checkpoint=ck
    )


def test_a_resumed_train_returns_only_its_own_steps_and_keeps_float64_losses(
    tmp_path: Path,
) -> None:
    """train() returns the losses of its own steps; trainer.losses keeps all of them, restored
    from the checkpoint exactly (float64 losses of a float64 network are not rounded), as is
    the optimiser's whole state (Adam moments and the param groups, warm-up lr included)."""
    ck = tmp_path / "ck.safetensors"
    first = _small_trainer(ck, 3, warmup_steps=10)
    first_losses = first.train(progress=False)
    assert len(first_losses) == 3
    reloaded = _small_trainer(ck, 3, warmup_steps=10)
    assert reloaded.step == 3
    assert reloaded.losses == first.losses  # bit for bit
    assert any(float(np.float32(v)) != v for v in first.losses)  # not float32 values
    saved, restored = first.optimizer.state_dict(), reloaded.optimizer.state_dict()
    # the groups travel as JSON, yet come back with their types: Adam's betas a tuple again
    assert restored["param_groups"] == saved["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert restored["param_groups"][0]["lr"] == pytest.approx(0.3 * 2e-4, rel=1e-12)
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(restored["state"][index][key]), value), key
    second = _small_trainer(ck, 5, warmup_steps=10)
    got = second.train(progress=False)
    assert len(got) == 2
    assert got == second.losses[3:]
    assert second.losses[:3] == first_losses


def test_train_after_an_interruption_returns_only_the_new_steps() -> None:
    """An interrupted train() (here make_batch raises at step 2) keeps the finished steps; the
    next call continues at step 2 and returns the losses of its own steps only, while
    trainer.losses holds all four."""
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    calls: list[int] = []

    def make(step: int, g: torch.Generator) -> TrainingBatch:
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return TrainingBatch(x0)

    trainer = Trainer(_Recorder(), NoiseSchedule.linear(), make, TrainingConfig(steps=4))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(progress=False)
    assert trainer.step == 2
    got = trainer.train(progress=False)
    assert calls == [0, 1, 2, 2, 3]
    assert len(got) == 2
    assert len(trainer.losses) == 4
    assert got == trainer.losses[2:]


def test_train_switches_the_network_to_training_and_the_ema_to_eval(tmp_path: Path) -> None:
    """A network handed over in eval mode is trained in train mode (dropout and batch norm
    behave as in training); afterwards the network and the EMA copy are in eval mode."""
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    net = _Recorder()
    net.eval()
    trainer = Trainer(
        net, NoiseSchedule.linear(), lambda step, g: TrainingBatch(x0), TrainingConfig(steps=2)
    )
    trainer.train(progress=False)
    assert net.modes == [True, True]
    assert not net.training
    assert not trainer.ema.training
    assert not trainer.ema.module.training


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seed", 1),
        ("ema_decay", 0.9),
        ("grad_clip", 0.5),
        ("p_uncond", 0.2),
        ("min_snr_gamma", 5.0),
        ("vlb_weight", 0.01),
        ("prediction", "v"),
        ("norm", "l1"),
        ("warmup_steps", 3),
        ("mask_normalization", "image"),
        ("noise_level", "gamma"),
    ],
)
def test_resume_refuses_a_change_of_any_other_option(
    tmp_path: Path, name: str, value: object
) -> None:
    """Only steps, log_every and checkpoint_every may change on resume; every other option would
    silently change the run, so it is refused by name."""
    ck = tmp_path / "ck.safetensors"
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    null = {"y": torch.zeros(1)}

    def trainer(config: TrainingConfig) -> Trainer:
        return Trainer(
            _Recorder(),
            NoiseSchedule.linear(),
            lambda step, g: TrainingBatch(x0, {"y": torch.ones(2)}),
            config,
            checkpoint=ck,
            null_conditions=null,
        )

    base = TrainingConfig(steps=1)
    trainer(base).train(progress=False)
    with pytest.raises(CheckpointError, match=r"^config: .*\(" + re.escape(name) + r": saved "):
        trainer(replace(base, **{name: value}))
    assert trainer(replace(base, steps=2, log_every=3, checkpoint_every=1)).step == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"p_uncond": 1.5}, r"^p_uncond: expected a float <= 1.0, got 1.5"),
        ({"ema_decay": 1.0}, r"^ema_decay: expected a float < 1.0, got 1.0"),
        ({"grad_clip": 0.0}, r"^grad_clip: expected a float > 0.0, got 0.0"),
    ],
)
def test_training_config_refuses_out_of_range_options(
    options: dict[str, float], match: str
) -> None:
    with pytest.raises(IVE, match=match):
        TrainingConfig(steps=1, **options)  # type: ignore[arg-type]


# ====================================================================== EMA, checkpoints, noise


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.conv(x))
        return out


def test_the_ema_averages_buffers_too() -> None:
    """Batch-norm running statistics follow the same recursion as the weights
    (ema_1 = w_1, ema_k = d ema_{k-1} + (1 - d) w_k), not a copy of the online statistics."""
    torch.manual_seed(0)
    net = _Normed().double()
    x0 = torch.rand(4, 3, 4, 4, generator=gen(7), dtype=torch.float64) * 2 - 1
    recorded: list[list[torch.Tensor]] = []  # the statistics before each step, then the last

    def make(step: int, g: torch.Generator) -> TrainingBatch:
        recorded.append([net.norm.running_mean.clone(), net.norm.running_var.clone()])
        return TrainingBatch(x0 * (step + 1) / 3)  # other statistics at every step

    decay = 0.5
    trainer = Trainer(net, NoiseSchedule.linear(), make, TrainingConfig(steps=4, ema_decay=decay))
    trainer.train(progress=False)
    recorded.append([net.norm.running_mean.clone(), net.norm.running_var.clone()])
    want = recorded[1]
    for stats in recorded[2:]:
        want = [decay * e + (1 - decay) * w for e, w in zip(want, stats, strict=True)]
    got = [trainer.ema.module.norm.running_mean, trainer.ema.module.norm.running_var]
    for g_, w_, online in zip(got, want, recorded[-1], strict=True):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)
        assert float((g_ - online).abs().max()) > 1e-3  # an average, not the last statistics


def test_ema_model_checks_its_decay() -> None:
    net = nn.Conv2d(3, 3, 1)
    with pytest.raises(IVE, match=r"^decay: expected a float < 1.0, got 1.0"):
        ema_model(net, 1.0)
    with pytest.raises(ITE, match=r"^decay: expected a float"):
        ema_model(net, "0.9")  # type: ignore[arg-type]


def test_checkpoints_refuse_files_without_imgdiff_metadata(tmp_path: Path) -> None:
    """A safetensors file without metadata, or with someone else's, is a CheckpointError."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    for name in ("bare", "other"):
        with pytest.raises(
            CheckpointError, match=r"has no imgdiff metadata; not a checkpoint written by imgdiff"
        ):
            load_checkpoint(tmp_path / f"{name}.safetensors")


def test_checkpoints_take_views_and_create_their_folder(tmp_path: Path) -> None:
    """Non-contiguous tensors (a transpose) round-trip, and missing parent folders are made."""
    w = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "a" / "b" / "ck.safetensors"
    save_checkpoint(path, {"t": w.T, "w": w}, {"step": 3})
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["t"], w.T)
    assert torch.equal(tensors["w"], w)
    assert meta == {"step": 3}


def test_a_checkpoint_is_synced_before_the_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atomic and durable: the new file is flushed to disk, renamed over the old one, then the
    folder holding the rename is flushed (a crash after save returns keeps the new file)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("sync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "sync file")
        real_fsync(fd)

    def rename(src: str, dst: object) -> None:
        events.append("rename")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename)
    save_checkpoint(tmp_path / "ck.safetensors", {"a": torch.arange(3)}, {})
    assert events == ["sync file", "rename", "sync folder"]


def test_noise_levels_are_drawn_for_the_requested_device_and_batch() -> None:
    s = NoiseSchedule.linear()
    assert sample_timesteps(s, 3, generator=gen(0), device="meta").device.type == "meta"
    t, gamma = sample_gamma(s, 3, generator=gen(0), device="meta")
    assert t.device.type == "meta"
    assert gamma.device.type == "meta"
    for fn in (sample_timesteps, sample_gamma):
        with pytest.raises(IVE, match=r"^batch: expected an int >= 1, got 0"):
            fn(s, 0)  # type: ignore[operator]


# ====================================================================== losses


def test_the_masked_loss_wants_one_mask_per_sample() -> None:
    """masked_denoising_loss takes (B, 1 or C, H, W) masks; a batch-1 mask is refused by name
    (the trainer expands a shared mask itself)."""
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(IVE, match=r"^mask: expected shape \(2, 1 or 3, 4, 4\), got \(1, 1, 4, 4\)"):
        masked_denoising_loss(x, x + 1, torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("normalization", ["hole", "image"])
def test_a_sample_without_hole_has_zero_masked_loss(normalization: str) -> None:
    """Palette's masked loss of a sample whose mask is empty is 0, not NaN."""
    x = torch.randn(2, 3, 4, 4, generator=gen(8))
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, :2] = 1
    loss = masked_denoising_loss(x, x + 2.0, mask, normalization=normalization)  # type: ignore[arg-type]
    assert float(loss[0]) == 0.0
    assert float(loss[1]) == (4.0 if normalization == "hole" else 2.0)


def test_min_snr_weights_refuse_alpha_bar_outside_the_unit_interval() -> None:
    with pytest.raises(IVE, match=r"^alpha_bar: expected values in \[0, 1\]"):
        min_snr_weight_from_alpha_bar(torch.tensor([0.5, 1.5], dtype=torch.float64), "epsilon")


def test_edge_bins_are_gaussian_tails_to_the_accuracy_of_the_tanh_cdf() -> None:
    """At x = -1 the likelihood is Phi((-1 + 1/255 - mean) / std), at x = 1 it is
    1 - Phi((1 - 1/255 - mean) / std); the tanh approximation of Phi (improved DDPM) is within
    2e-4 of the exact CDF, here to 5e-4 over z in [-3, 3]. The edges start past +-0.999."""
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    std = 0.05
    normal = torch.distributions.Normal(0.0, 1.0)
    low = torch.full_like(z, -1.0)
    got_low = discretized_gaussian_log_likelihood(
        low, low + 1 / 255 - z * std, torch.full_like(z, math.log(std))
    )
    torch.testing.assert_close(got_low.exp(), normal.cdf(z), rtol=0, atol=5e-4)
    high = torch.full_like(z, 1.0)
    got_high = discretized_gaussian_log_likelihood(
        high, high - 1 / 255 - z * std, torch.full_like(z, math.log(std))
    )
    torch.testing.assert_close(got_high.exp(), 1 - normal.cdf(z), rtol=0, atol=5e-4)
    # 0.9995 is past the 0.999 threshold: a tail, not a bin of half-width 1/255
    x = torch.tensor([0.9995, -0.9995], dtype=torch.float64)
    means = torch.tensor([0.99, -0.99], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, torch.full_like(x, math.log(0.01)))
    z_edge = (0.9995 - 1 / 255 - 0.99) / 0.01
    want = torch.log(1 - normal.cdf(torch.tensor([z_edge, z_edge], dtype=torch.float64)))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_a_learned_log_variance_equals_the_learned_range_at_its_ends() -> None:
    """variance="learned" reads the extra channels as log Sigma: log beta_tilde_t (clipped) and
    log beta_t give the learned_range VLB at v = -1 and v = +1."""
    s = NoiseSchedule.linear()
    t = torch.tensor([0, 1, 250, 999])
    x0 = torch.rand(4, 3, 4, 4, generator=gen(9), dtype=torch.float64) * 2 - 1
    x_t = x0 * 0.5 + 0.3 * torch.randn(x0.shape, generator=gen(10), dtype=torch.float64)
    mean = torch.randn(x0.shape, generator=gen(11), dtype=torch.float64)
    for v, log_var in ((-1.0, s.posterior_log_variance_clipped[t]), (1.0, torch.log(s.betas[t]))):
        learned = torch.cat([mean, log_var.reshape(-1, 1, 1, 1).expand_as(x0)], dim=1)
        ranged = torch.cat([mean, torch.full_like(x0, v)], dim=1)
        torch.testing.assert_close(
            vlb_term(s, learned, x0, x_t, t, variance="learned"),
            vlb_term(s, ranged, x0, x_t, t),
            rtol=1e-10,
            atol=1e-12,
        )


def test_hybrid_loss_is_l_simple_plus_lambda_t_vlb_for_each_prediction() -> None:
    """hybrid_loss = denoising_loss(mean half, target) + lambda T vlb_term(..., same prediction)."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(3, 3, 4, 4, generator=gen(12), dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(13), dtype=torch.float64)
    t = torch.tensor([0, 40, 700])
    ab = _alpha_bar(s)[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = torch.randn(3, 6, 4, 4, generator=gen(14), dtype=torch.float64)
    targets = {"epsilon": noise, "sample": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}
    for prediction, target in targets.items():
        want = denoising_loss(out[:, :3], target) + 0.002 * 1000 * vlb_term(
            s, out, x0, x_t, t, prediction=prediction
        )  # type: ignore[arg-type]
        got = hybrid_loss(s, out, x0, x_t, noise, t, prediction=prediction, vlb_weight=0.002)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ====================================================================== degradations


def test_float64_images_get_float64_hole_noise() -> None:
    """The hole noise of float64 images is drawn in float64 from each sample's generator."""
    x = toy_shapes(2, 16, seed=1)[0].double()
    mask = center_mask(16)
    pair = inpainting_pair(x, [gen(0), gen(1)], mask=mask)
    hole = mask.bool().expand(3, -1, -1)
    for b in range(2):
        noise = torch.randn(3, 16, 16, generator=gen(b), dtype=torch.float64)
        assert torch.equal(pair.source[b][hole], noise[hole])


def test_the_mask_is_drawn_before_the_noise() -> None:
    """Per sample: first the mask, then the noise, from the sample's generator (tasks.py)."""
    x = toy_shapes(3, 16, seed=2)[0]
    pair = inpainting_pair(x, [gen(b) for b in range(3)], mask_kind="bbox")
    for b in range(3):
        g = gen(b)
        m = make_mask("bbox", 16, g)
        noise = torch.randn(3, 16, 16, generator=g)
        assert torch.equal(pair.mask[b], m)
        hole = m.bool().expand(3, -1, -1)
        assert torch.equal(pair.source[b][hole], noise[hole])


def test_a_fixed_jpeg_quality_draws_nothing() -> None:
    """A fixed quality is not a random draw: the other samples of a one-generator batch are the
    ones they would be without the JPEG samples."""
    x = toy_shapes(2, 16, seed=2)[0]
    mixed = make_pairs(x, ["jpeg", "inpainting"], gen(4), jpeg_quality=20)
    alone = make_pairs(x[1:], "inpainting", gen(4))
    assert torch.equal(mixed.source[1], alone.source[0])
    assert torch.equal(mixed.mask[1], alone.mask[0])
    assert torch.equal(mixed.source[0], jpeg_compress(x[:1], 20)[0])


def test_jpeg_quality_ranges_of_one_value_and_float64_images() -> None:
    x = toy_shapes(2, 16, seed=3)[0]
    assert torch.equal(jpeg_pair(x, gen(0), quality=(20, 20)).source, jpeg_compress(x, 20))
    out64 = jpeg_compress(x.double(), 20)
    assert out64.dtype == torch.float64
    assert torch.equal(out64, jpeg_compress(x, 20).double())
    with pytest.raises(ITE, match=r"^quality: expected an int, a list or a \(B,\) integer tensor"):
        jpeg_compress(x, torch.tensor([[5], [30]]))


def test_degradations_check_their_images() -> None:
    """Values below -1 (with none above 1), narrow images and out-of-range grayscale input."""
    x = toy_shapes(1, 16, seed=0)[0] * 0.5 - 0.9  # in [-1.4, -0.4]
    with pytest.raises(
        IVE, match=r"^images: expected values in \[-1, 1\], got values from -1\.\d+ to -0\.\d+"
    ):
        colorization_pair(x)
    with pytest.raises(IVE, match=r"^images: expected values in \[-1, 1\]"):
        to_grayscale(x)
    with pytest.raises(IVE, match=r"^images: expected height and width of at least 8"):
        colorization_pair(torch.zeros(1, 3, 16, 4))
    assert torch.equal(make_mask("center", [16, 12]), make_mask("center", (16, 12)))


def _known_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the known (0) rectangle of a frame mask (1, H, W)."""
    rows = torch.nonzero((mask[0] == 0).any(dim=1)).flatten()
    cols = torch.nonzero((mask[0] == 0).any(dim=0)).flatten()
    return int(rows[0]), int(cols[0]), len(rows), len(cols)


def test_four_direction_margins_are_floor_halves() -> None:
    """Top and left margins are (H - h) // 2 and (W - w) // 2 (the docstring)."""
    odd = 0
    for H in range(9, 40, 5):
        for W in range(8, 40, 3):
            for seed in range(4):
                top, left, h, w = _known_box(four_direction_mask((H, W), gen(seed)))
                assert (top, left) == ((H - h) // 2, (W - w) // 2), (H, W, seed)
                odd += (H - h) % 2 + (W - w) % 2
    assert odd > 20


def test_four_direction_known_height_is_log_uniform() -> None:
    """The known height fraction f is log-uniform in [1 / (2 max_side), max_side]: the known
    height h = round(f H) has P(h <= k) = P(log f < log((k + 0.5) / H)); Kolmogorov-Smirnov
    distance of 2000 draws at 64 px (a uniform f is about 0.046 away)."""
    H, n = 64, 2000
    lo, hi = math.log(1 / 1.7), math.log(0.85)
    g = gen(0)
    heights = torch.tensor([_known_box(four_direction_mask(H, g))[2] for _ in range(n)])
    ks = 0.0
    for k in range(int(heights.min()), int(heights.max()) + 1):
        cdf = min(max((math.log((k + 0.5) / H) - lo) / (hi - lo), 0.0), 1.0)
        below = float((heights <= k).double().mean())
        above = float((heights < k).double().mean())
        previous = min(max((math.log((k - 0.5) / H) - lo) / (hi - lo), 0.0), 1.0)
        ks = max(ks, abs(below - cdf), abs(above - previous))
    assert ks < 0.03, ks


def test_bbox_reaches_every_position_and_every_shrink() -> None:
    """At 64 px (box 32, margin 5, shrink d in {0..5}): the full box's corner takes both ends of
    [5, 27] (Palette's randint misses the last one; imgdiff includes it), and d both 0 and 5."""
    n, box = 64, 32
    starts, shrinks = set(), set()
    for seed in range(200):
        mask = bbox_mask(n, gen(seed))[0]
        for line in (mask.any(dim=1), mask.any(dim=0)):
            idx = torch.nonzero(line).flatten()
            d = (box - len(idx)) // 2
            starts.add(int(idx[0]) - d)
            shrinks.add(d)
    assert min(starts) == 5
    assert max(starts) == n - 5 - box
    assert shrinks == set(range(6))


def test_bbox_edge_cases_of_its_parameters() -> None:
    """A box of less than a pixel is one pixel; a box that fits its margins exactly is allowed."""
    assert float(bbox_mask(8, gen(0), max_box=0.05, max_delta=0.0).sum()) == 1.0
    exact = bbox_mask(64, gen(0), max_box=0.5, margin=0.25, max_delta=0.0)[0]
    want = torch.zeros(64, 64)
    want[16:48, 16:48] = 1
    assert torch.equal(exact, want)


def test_uncrop_picks_one_or_four_directions_half_the_time() -> None:
    g = gen(1)
    frames = 0
    for _ in range(400):
        m = uncropping_mask(16, g)[0]
        frames += all(bool((edge == 1).all()) for edge in (m[0], m[-1], m[:, 0], m[:, -1]))
    assert 170 < frames < 230


@pytest.mark.parametrize(
    ("kind", "fn"),
    [
        ("bbox", bbox_mask),
        ("brush", brush_stroke_mask),
        ("irregular", irregular_mask),
        ("hybrid", hybrid_mask),
        ("one_direction", one_direction_mask),
        ("four_direction", four_direction_mask),
        ("uncrop", uncropping_mask),
    ],
)
def test_make_mask_is_the_kinds_own_function(kind: str, fn) -> None:  # type: ignore[no-untyped-def]
    for seed in range(3):
        assert torch.equal(make_mask(kind, (24, 32), gen(seed)), fn((24, 32), gen(seed)))  # type: ignore[arg-type]
    assert fn(16, gen(0), device="meta").device.type == "meta"
    assert one_direction_mask(16, side="top", device="meta").device.type == "meta"


# ====================================================================== metrics


def test_psnr_is_per_image() -> None:
    """Two images with errors 0.1 and 0.2 get 10 log10(4 / e^2) each, not a batch average."""
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.2
    want = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)], dtype=torch.float64)
    torch.testing.assert_close(psnr(y, x), want)


@pytest.mark.parametrize(
    ("shape", "options", "size"),
    [
        ((2, 12, 12), {"window_size": 7, "sigma": 2.5, "k1": 0.05, "k2": 0.1}, 7),
        ((1, 9, 10), {"window_size": 8}, 8),  # an even window: centre 3.5
        ((1, 14, 6), {}, 6),  # narrower than the window: a 6 x 6 window
    ],
)
def test_ssim_options_against_the_per_window_oracle(shape, options, size) -> None:  # type: ignore[no-untyped-def]
    """window_size, sigma, k1 and k2 are used, an even window is centred, a narrow image gets a
    window of its width; anti-correlated images have a negative SSIM (not clamped)."""
    x01 = torch.rand(1, *shape, generator=gen(15), dtype=torch.float64)
    for y01 in (
        (
            0.7 * x01 + 0.2 + 0.1 * torch.randn(x01.shape, generator=gen(16), dtype=torch.float64)
        ).clamp(0, 1),
        1 - x01,
    ):
        got = ssim(y01 * 2 - 1, x01 * 2 - 1, **options)
        want = _ssim_oracle(
            y01[0].tolist(),
            x01[0].tolist(),
            0.0,
            1.0,
            size=size,
            sigma=options.get("sigma", 1.5),
            k1=options.get("k1", 0.01),
            k2=options.get("k2", 0.03),
        )
        torch.testing.assert_close(
            got, torch.tensor([want], dtype=torch.float64), rtol=1e-9, atol=1e-10
        )
    assert float(ssim(1 - x01 * 2, x01 * 2 - 1, **options)) < 0


# ====================================================================== toy data


def _fills_its_box(image: torch.Tensor) -> bool:
    """Whether some single colour of ``image`` (3, H, W) covers a whole axis-aligned rectangle of
    at least 3 x 3 pixels exactly (a square does; a disc or a gradient region does not)."""
    flat = image.reshape(3, -1).T
    _, inverse, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
    for k in torch.nonzero(counts >= 9).flatten().tolist():
        region = (inverse == k).reshape(image.shape[1:])
        rows = torch.nonzero(region.any(dim=1)).flatten()
        cols = torch.nonzero(region.any(dim=0)).flatten()
        if (
            len(rows) >= 3
            and len(cols) >= 3
            and bool(region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all())
        ):
            return True
    return False


def test_toy_labels_name_the_shape_and_images_are_seeded() -> None:
    """Label 0 is a square (its colour fills a rectangle), label 1 a disc; the images span
    [-1, 1], come from the seed alone (not torch's global generator) and differ across seeds."""
    images, labels = toy_shapes(12, 32, seed=0)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0, 1] * 6
    assert SHAPE_NAMES == ("square", "disc")
    assert [_fills_its_box(img) for img in images] == [label == 0 for label in labels.tolist()]
    assert float(images.min()) < -0.9
    assert float(images.max()) > 0.9
    torch.manual_seed(1)
    again = toy_shapes(12, 32, seed=0)[0]
    torch.manual_seed(2)
    assert torch.equal(toy_shapes(12, 32, seed=0)[0], again)
    assert torch.equal(again, images)
    assert not torch.equal(toy_shapes(12, 32, seed=1)[0], images)


# ====================================================================== images


def test_to_uint8_rounds_to_the_nearest_level_in_nchw_order() -> None:
    """k / 127.5 - 1 maps back to k for every 8-bit level; -1 + 0.7/127.5 rounds up to 1; the
    array is (B, H, W, C) for non-square images."""
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    assert to_uint8(levels.reshape(1, 1, 1, 256))[0, 0, :, 0].tolist() == list(range(256))
    values = torch.tensor([-1.0, -1 + 0.7 / 127.5, -0.5, 0.25]).reshape(1, 1, 1, 4)
    assert to_uint8(values).flatten().tolist() == [0, 1, 64, 159]
    x = torch.rand(2, 3, 2, 5, generator=gen(17)) * 2 - 1
    arr = to_uint8(x)
    assert arr.shape == (2, 2, 5, 3)
    assert arr[1, 1, 4, 2] == round((float(x[1, 2, 1, 4]) + 1) * 127.5)


def test_image_grid_places_tiles_row_by_row_on_white(tmp_path: Path) -> None:
    """nrow tiles per row (fewer when there are fewer images), a partial last row, padding of
    white pixels, tile i at row i // cols, column i % cols."""
    x = torch.rand(3, 3, 4, 5, generator=gen(18)) * 2 - 1
    tiles = to_uint8(x)
    grid = image_grid(x, nrow=2, padding=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    for i in range(3):
        r, c = divmod(i, 2)
        top, left = 1 + r * 5, 1 + c * 6
        assert np.array_equal(grid[top : top + 4, left : left + 5], tiles[i])
    assert (grid[6:10, 7:12] == 255).all()  # the empty cell
    assert (grid[0] == 255).all()
    assert (grid[:, 0] == 255).all()
    assert image_grid(x[:2], nrow=8, padding=2).shape == (4 + 4, 2 * 7 + 2, 3)
    gray = torch.rand(2, 1, 4, 4, generator=gen(19)) * 2 - 1
    path = save_image_grid(gray, tmp_path / "nested" / "folder" / "gray.png", nrow=2)
    from PIL import Image

    with Image.open(path) as image:
        assert image.mode == "L"
        assert np.array_equal(np.asarray(image), image_grid(gray, nrow=2)[..., 0])


# ====================================================================== callers' tensors


def test_the_callers_tensors_and_conditions_are_left_alone() -> None:
    """float32 CPU inputs (where a .float().cpu() copy is the tensor itself) come back unchanged
    from to_uint8, jpeg_compress and with_luma; condition dropout leaves the batch's mapping
    alone."""
    g = gen(20)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    wide = x * 3
    for fn, arg in (
        (to_uint8, wide),
        (lambda a: jpeg_compress(a, 30), x),
        (lambda a: with_luma(a, to_grayscale(x.flip(0))), x),
    ):
        before = arg.clone()
        fn(arg)  # type: ignore[operator]
        assert torch.equal(arg, before)
    labels = torch.arange(4)
    kwargs = {"class_labels": labels}
    batch = TrainingBatch(torch.zeros(4, 3, 4, 4), kwargs)
    config = TrainingConfig(steps=1, p_uncond=1.0)
    null = {"class_labels": torch.tensor([9])}
    Trainer(
        _Recorder(), NoiseSchedule.linear(), lambda s, g: batch, config, null_conditions=null
    ).loss(batch)
    assert kwargs["class_labels"] is labels
    assert torch.equal(labels, torch.arange(4))
