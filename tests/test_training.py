"""Training: PAL-1 (gamma sampler), PAL-3 (masked loss), loss falls, resume equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import imgdiff
from imgdiff import NoiseSchedule
from imgdiff.data import toy_shapes
from imgdiff.losses import masked_denoising_loss
from imgdiff.nets import UNet, UNetConfig
from imgdiff.training import (
    CheckpointError,
    Trainer,
    TrainingBatch,
    TrainingConfig,
    load_checkpoint,
    sample_gamma,
    save_checkpoint,
)


def test_pal1_gamma_sampler() -> None:
    """10 000 draws: every gamma lies in [ab_t, ab_{t-1}] of its own t, and t >= 1."""
    s = NoiseSchedule.linear(2000, 1e-6, 0.01)
    t, gamma = sample_gamma(s, 10_000, generator=torch.Generator().manual_seed(0))
    ab = s.alphas_cumprod
    assert int(t.min()) >= 1
    assert bool(((gamma >= ab[t]) & (gamma <= ab[t - 1])).all())
    assert len(set(t.tolist())) > 1000  # spread over the schedule


@pytest.mark.parametrize("normalization", ["hole", "image"])
def test_pal3_masked_loss_ignores_the_known_region(normalization: str) -> None:
    """A prediction equal to eps on hole pixels and arbitrary elsewhere has loss 0; the two
    normalisations differ by the hole fraction."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 3, 8, 8, generator=g)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, :4] = 1  # hole fraction 0.5
    pred = torch.where(mask.bool(), eps, torch.randn(3, 3, 8, 8, generator=g) * 10)
    assert (
        float(masked_denoising_loss(pred, eps, mask, normalization=normalization).abs().max())
        == 0.0
    )  # type: ignore[arg-type]
    wrong = eps + 1.0
    hole = masked_denoising_loss(wrong, eps, mask, normalization="hole")
    image = masked_denoising_loss(wrong, eps, mask, normalization="image")
    torch.testing.assert_close(hole, torch.ones(3))
    torch.testing.assert_close(image, 0.5 * torch.ones(3))


def _make_batch(data: torch.Tensor, batch: int = 16):  # type: ignore[no-untyped-def]
    def make(step: int, g: torch.Generator) -> TrainingBatch:
        return TrainingBatch(data[torch.randint(0, data.shape[0], (batch,), generator=g)])

    return make


def test_loss_falls_by_half_on_the_toy_data() -> None:
    """Smoke test: the reference network's loss falls by at least half within 150 CPU steps."""
    torch.manual_seed(0)
    data, _ = toy_shapes(128, size=16, seed=0)
    net = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2), attention_levels=(1,)))
    trainer = Trainer(
        net,
        NoiseSchedule.linear(),
        _make_batch(data),
        TrainingConfig(steps=150, lr=1e-3, warmup_steps=10),
    )
    losses = trainer.train(progress=False)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 2, (first, last)


def _run(
    steps: int,
    checkpoint: Path | None,
    data: torch.Tensor,
    noise_level: str = "timestep",
    disturb: bool = False,
) -> Trainer:
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            base_channels=16,
            channel_mults=(1, 2),
            attention_levels=(1,),
            dropout=0.1,
            noise_conditioning=noise_level,
        )
    )  # type: ignore[arg-type]
    if disturb:  # the global RNG (dropout) must come back from the checkpoint, not from here
        torch.rand(7)
    config = TrainingConfig(steps=steps, lr=1e-3, noise_level=noise_level, checkpoint_every=5)  # type: ignore[arg-type]
    trainer = Trainer(
        net, NoiseSchedule.linear(), _make_batch(data, 4), config, checkpoint=checkpoint
    )
    trainer.train(progress=False)
    return trainer


@pytest.mark.parametrize("noise_level", ["timestep", "gamma"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, noise_level: str) -> None:
    """Train 10 steps, stop, resume to 20 (with other global RNG use in between): the weights, EMA and
    losses equal a 20-step run bitwise."""
    data, _ = toy_shapes(16, size=8, seed=0)
    full = _run(20, None, data, noise_level)
    ck = tmp_path / "ck.safetensors"
    _run(10, ck, data, noise_level)
    resumed = _run(20, ck, data, noise_level, disturb=True)
    assert resumed.step == 20
    assert all(
        torch.equal(a, b)
        for a, b in zip(full.net.parameters(), resumed.net.parameters(), strict=True)
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(full.ema.parameters(), resumed.ema.parameters(), strict=True)
    )
    assert full.losses == resumed.losses


def test_masked_batches_keep_the_known_region_clean() -> None:
    """With a mask, the network input equals x0 outside the hole, and the loss ignores it."""
    seen: list[torch.Tensor] = []
    net = torch.nn.Conv2d(3, 3, 1)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return net(x)

    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 4:] = 1
    trainer = Trainer(
        net,
        NoiseSchedule.linear(),
        lambda step, g: TrainingBatch(x0, mask=mask),
        TrainingConfig(steps=1),
        model=model,
    )
    trainer.train(progress=False)
    keep = ~mask.bool().expand_as(x0)
    assert torch.equal(seen[0][keep], x0[keep])
    assert not torch.equal(seen[0][~keep], x0[~keep])
    # The loss ignores the known region: other values there (in x0, so in the network input and,
    # for x0-prediction, in the target) leave it unchanged; other values in the hole do not. The
    # 1x1 convolution makes each output pixel depend on its own input pixel only.
    g = torch.Generator().manual_seed(1)
    other_known = torch.where(keep, torch.rand(x0.shape, generator=g) * 2 - 1, x0)
    other_hole = torch.where(keep, x0, torch.rand(x0.shape, generator=g) * 2 - 1)
    for prediction in ("epsilon", "sample"):
        losses = []
        for images in (x0, other_known, other_hole):
            fresh = Trainer(
                net,
                NoiseSchedule.linear(),
                lambda step, g: TrainingBatch(x0),
                TrainingConfig(steps=1, prediction=prediction, seed=5),
                model=lambda x, t: net(x),
            )  # the same seed: the same noise and timesteps for every call
            losses.append(fresh.loss(TrainingBatch(images, mask=mask)).detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        assert not torch.allclose(losses[2], losses[0]), prediction


def test_a_shared_mask_is_expanded_to_the_batch() -> None:
    """A ``(1, 1, H, W)`` mask, accepted for every sample, gives the loss of the same mask repeated
    ``(B, 1, H, W)``, and is not modified."""
    net = torch.nn.Conv2d(3, 3, 1)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    shared = torch.zeros(1, 1, 8, 8)
    shared[..., 4:] = 1
    before = shared.clone()
    losses = []
    for mask in (shared, shared.expand(2, 1, 8, 8).clone()):
        trainer = Trainer(
            net,
            NoiseSchedule.linear(),
            lambda step, g: TrainingBatch(x0),
            TrainingConfig(steps=1, seed=3),
            model=lambda x, t: net(x),
        )
        losses.append(trainer.loss(TrainingBatch(x0, mask=mask)).detach())
    assert losses[0].shape == (2,)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert torch.equal(shared, before)
    assert shared.shape == (1, 1, 8, 8)


def test_checkpoints_are_atomic_and_validated(tmp_path: Path) -> None:
    """A checkpoint round-trips; a failed write leaves the old file; foreign files are refused."""
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"a": torch.arange(3)}, {"step": 1})
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["a"], torch.arange(3))
    assert meta == {"step": 1}
    with pytest.raises(imgdiff.InputTypeError, match=r"^tensors\['b'\]: expected a tensor"):
        save_checkpoint(path, {"b": [1, 2]}, {"step": 2})  # type: ignore[dict-item]
    assert load_checkpoint(path)[1] == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(CheckpointError, match=r"^path: no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"is not a readable safetensors checkpoint"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_config_validation() -> None:
    """Bad training options are named."""
    with pytest.raises(imgdiff.InputValueError, match=r"^steps: expected an int >= 1, got 0"):
        TrainingConfig(steps=0)
    with pytest.raises(imgdiff.InputValueError, match=r"^noise_level: expected one of"):
        TrainingConfig(steps=1, noise_level="sigma")  # type: ignore[arg-type]
    with pytest.raises(
        imgdiff.InputValueError, match=r"^seed: expected an int <= 18446744073709551615"
    ):
        TrainingConfig(steps=1, seed=2**70)  # a raw overflow in manual_seed otherwise
    with pytest.raises(imgdiff.InputTypeError, match=r"^net: expected a torch.nn.Module"):
        Trainer(
            lambda x, t: x,
            NoiseSchedule.linear(),
            lambda s, g: TrainingBatch(torch.zeros(1, 3, 4, 4)),
            TrainingConfig(steps=1),
        )  # type: ignore[arg-type]


def test_resume_refuses_other_options_and_can_start_afresh(tmp_path: Path) -> None:
    """A checkpoint written with other options is refused by name; resume=False starts at step 0."""
    data, _ = toy_shapes(8, size=8, seed=0)
    ck = tmp_path / "ck.safetensors"
    _run(3, ck, data)
    net = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,)))
    other = TrainingConfig(steps=6, lr=5e-4, noise_level="timestep")
    with pytest.raises(CheckpointError, match=r"^config: .* \(lr: saved 0.001, now 0.0005\)"):
        Trainer(net, NoiseSchedule.linear(), _make_batch(data, 4), other, checkpoint=ck)
    fresh = Trainer(
        net, NoiseSchedule.linear(), _make_batch(data, 4), other, checkpoint=ck, resume=False
    )
    assert fresh.step == 0
    fresh.train(progress=False)
    assert load_checkpoint(ck)[1]["config"]["lr"] == 5e-4
    save_checkpoint(tmp_path / "foreign.safetensors", {"a": torch.zeros(1)}, {"step": 1})
    with pytest.raises(CheckpointError, match=r"has no training config; not a Trainer checkpoint"):
        fresh.load(tmp_path / "foreign.safetensors")
    small = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,)))
    with pytest.raises(CheckpointError, match=r"is not a Trainer checkpoint for this network"):
        Trainer(small, NoiseSchedule.linear(), _make_batch(data, 4), other, checkpoint=ck)


def test_checkpoint_write_failing_midway_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside the write leaves the previous checkpoint intact and no temporary file; the
    file gets the permissions of an ordinary new file."""
    import os

    import safetensors.torch

    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"a": torch.arange(3)}, {"step": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    before = path.read_bytes()

    def torn(tensors: object, filename: str, metadata: object = None) -> None:
        with open(filename, "wb") as fh:
            fh.write(b"half a checkpo")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": torch.arange(5)}, {"step": 2})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


class _Recorder(torch.nn.Module):
    """A 1x1 convolution that records its inputs; optionally doubles its output channels."""

    def __init__(self, channels: int = 3, factor: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, factor * channels, 1)
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.seen.append({"t": t, **cond})
        out: torch.Tensor = self.conv(x)
        return out


def _draws(
    seed: int, x0: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps a fresh trainer with ``seed`` draws for its first batch."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return noise, imgdiff.training.sample_timesteps(schedule, x0.shape[0], generator=g)


def test_condition_dropout_replaces_conditions_by_the_null() -> None:
    """p_uncond = 1 feeds only null conditions; 0 < p < 1 drops some; the null is required."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(64, 3, 4, 4)
    labels = torch.arange(64) % 5
    batch = TrainingBatch(x0, {"class_labels": labels})
    null = {"class_labels": torch.tensor([5])}
    net = _Recorder()
    Trainer(
        net, s, lambda step, g: batch, TrainingConfig(steps=1, p_uncond=1.0), null_conditions=null
    ).loss(batch)
    assert bool((net.seen[-1]["class_labels"] == 5).all())
    Trainer(
        net, s, lambda step, g: batch, TrainingConfig(steps=1, p_uncond=0.5), null_conditions=null
    ).loss(batch)
    seen = net.seen[-1]["class_labels"]
    dropped = seen == 5
    assert 0 < int(dropped.sum()) < 64
    assert torch.equal(seen[~dropped], labels[~dropped])
    with pytest.raises(imgdiff.InputValueError, match=r"^null_conditions: expected the null value"):
        Trainer(net, s, lambda step, g: batch, TrainingConfig(steps=1, p_uncond=0.1))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^batch.model_kwargs: expected the conditions"
    ):
        Trainer(
            net,
            s,
            lambda step, g: batch,
            TrainingConfig(steps=1, p_uncond=0.1),
            null_conditions={"context": torch.zeros(1, 2, 3)},
        ).loss(batch)


def test_learned_variance_trains_with_the_hybrid_loss() -> None:
    """A 2C-channel output gets improved DDPM's L_simple + lambda T L_vlb (against hybrid_loss)."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(4, 3, 4, 4, dtype=torch.float64) * 2 - 1
    batch = TrainingBatch(x0)
    net = _Recorder(factor=2).double()
    got = Trainer(net, s, lambda step, g: batch, TrainingConfig(steps=1, vlb_weight=0.01)).loss(
        batch
    )
    noise, t = _draws(0, x0, s)
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = net.conv(x_t)
    want = imgdiff.losses.hybrid_loss(s, out, x0, x_t, noise, t, vlb_weight=0.01)
    torch.testing.assert_close(got, want)
    gamma = Trainer(net, s, lambda step, g: batch, TrainingConfig(steps=1, noise_level="gamma"))
    with pytest.raises(imgdiff.InputValueError, match=r"^model output: a learned variance"):
        gamma.loss(batch)
    wrong = Trainer(_Recorder(factor=3), s, lambda step, g: batch, TrainingConfig(steps=1))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^model output: expected shape \(4, 3 or 6, 4, 4\)"
    ):
        wrong.loss(TrainingBatch(x0.float()))


def test_masked_loss_refuses_non_binary_masks() -> None:
    """A float mask must hold 0 and 1 only; bool masks are taken as they are."""
    x = torch.zeros(2, 3, 4, 4)
    soft = torch.full((2, 1, 4, 4), 0.5)
    with pytest.raises(imgdiff.InputValueError, match=r"^mask: expected a binary mask of 0 and 1"):
        masked_denoising_loss(x, x + 1, soft)
    hard = soft > 0.2
    torch.testing.assert_close(masked_denoising_loss(x, x + 1, hard), torch.ones(2))


def test_ema_follows_the_recursion_over_the_online_weights() -> None:
    """The EMA starts as a copy of the weights, takes the online weights at the first update
    (``AveragedModel`` copies when nothing is averaged yet), then follows
    ``ema_k = d ema_{k-1} + (1 - d) w_k`` after every optimiser step ``k``."""
    torch.manual_seed(0)
    decay = 0.8
    x0 = torch.rand(4, 3, 4, 4, dtype=torch.float64) * 2 - 1
    net = torch.nn.Conv2d(3, 3, 1).double()
    recorded: list[list[torch.Tensor]] = []  # online weights before each step, then the last

    def make(step: int, g: torch.Generator) -> TrainingBatch:
        recorded.append([p.detach().clone() for p in net.parameters()])
        return TrainingBatch(x0)

    for steps in (1, 4):
        recorded.clear()
        trainer = Trainer(
            net,
            NoiseSchedule.linear(),
            make,
            TrainingConfig(steps=steps, lr=0.05, ema_decay=decay, grad_clip=None),
            model=lambda x, t: net(x),
        )
        initial = [p.detach().clone() for p in trainer.ema.module.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(initial, net.parameters(), strict=True))
        trainer.train(progress=False)
        assert all(torch.equal(a, b) for a, b in zip(initial, recorded[0], strict=True))
        recorded.append([p.detach().clone() for p in net.parameters()])
        assert not torch.equal(recorded[-1][0], recorded[0][0])  # the weights did move
        want = recorded[1]  # the first update copies w_1
        for weights in recorded[2:]:
            want = [decay * e + (1 - decay) * w for e, w in zip(want, weights, strict=True)]
        got = list(trainer.ema.module.parameters())
        for g_, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g_.detach(), w_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_loss_trains_the_target_of_each_prediction_type(prediction: str) -> None:
    """The per-sample loss is mean((out - target)^2) with target eps, x0 or
    v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), for the trainer's own draws."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(6, 3, 4, 4, dtype=torch.float64) * 2 - 1
    batch = TrainingBatch(x0)
    net = _Recorder().double()
    got = Trainer(
        net, s, lambda step, g: batch, TrainingConfig(steps=1, prediction=prediction)
    ).loss(batch)  # type: ignore[arg-type]
    noise, t = _draws(0, x0, s)
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = net.conv(x_t)
    target = {
        "epsilon": noise,
        "sample": x0,
        "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0,
    }[prediction]
    want = (out - target).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want)
    library = imgdiff.losses.denoising_loss(
        out,
        imgdiff.noising.training_target(s, x0, noise, t, prediction),  # type: ignore[arg-type]
    )
    torch.testing.assert_close(got, library)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_min_snr_weights_the_per_sample_loss(prediction: str) -> None:
    """Min-SNR-gamma (Hang et al. 2023): the per-sample loss is the plain one times
    min(SNR, gamma) / SNR for eps targets, min(SNR, gamma) / (SNR + 1) for v targets and
    min(SNR, gamma) for x0 targets, in the trainer and in min_snr_weight."""
    s = NoiseSchedule.linear()
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    batch = TrainingBatch(x0)
    net = _Recorder()

    def trainer(config: TrainingConfig) -> Trainer:
        return Trainer(net, s, lambda step, g: batch, config)

    plain = trainer(TrainingConfig(steps=1, prediction=prediction)).loss(batch)  # type: ignore[arg-type]
    weighted = trainer(
        TrainingConfig(steps=1, prediction=prediction, min_snr_gamma=5.0)  # type: ignore[arg-type]
    ).loss(batch)
    _, t = _draws(0, x0, s)
    ab = s.alphas_cumprod[t]
    snr = ab / (1 - ab)
    denominator = {"epsilon": snr, "v": snr + 1, "sample": torch.ones_like(snr)}[prediction]
    want = snr.clamp(max=5.0) / denominator
    if prediction != "epsilon":  # (eps weights are 1 wherever SNR < gamma: most draws)
        assert float((want - 1).abs().max()) > 0.1  # the weights are not all ones
    torch.testing.assert_close(weighted, plain * want.float())
    torch.testing.assert_close(
        imgdiff.losses.min_snr_weight(s, t, prediction, 5.0, dtype=torch.float64),  # type: ignore[arg-type]
        want,
    )


def test_learning_rate_warms_up_linearly() -> None:
    """Step k (from 0) runs at lr * min(1, (k + 1) / warmup_steps)."""
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    net = torch.nn.Conv2d(3, 3, 1)
    seen: list[float] = []
    holder: list[Trainer] = []

    def make(step: int, g: torch.Generator) -> TrainingBatch:
        seen.append(holder[0].optimizer.param_groups[0]["lr"])
        return TrainingBatch(x0)

    lr, warmup = 0.01, 4
    trainer = Trainer(
        net,
        NoiseSchedule.linear(),
        make,
        TrainingConfig(steps=7, lr=lr, warmup_steps=warmup),
        model=lambda x, t: net(x),
    )
    holder.append(trainer)
    trainer.train(progress=False)
    want = [lr * min(1.0, (k + 1) / warmup) for k in range(7)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)


def test_gamma_is_uniform_inside_its_interval() -> None:
    """u = (gamma - ab_t) / (ab_{t-1} - ab_t) is U(0, 1): mean, quartiles and KS distance."""
    s = NoiseSchedule.linear()
    t, gamma = sample_gamma(s, 20_000, generator=torch.Generator().manual_seed(1))
    ab = s.alphas_cumprod
    u = ((gamma - ab[t]) / (ab[t - 1] - ab[t])).sort().values
    assert abs(float(u.mean()) - 0.5) < 0.01
    q1, q3 = (float(v) for v in torch.quantile(u, torch.tensor([0.25, 0.75], dtype=u.dtype)))
    assert abs(q1 - 0.25) < 0.015
    assert abs(q3 - 0.75) < 0.015
    n = u.numel()
    ecdf_hi = torch.arange(1, n + 1, dtype=u.dtype) / n
    ks = float(torch.maximum(ecdf_hi - u, u - (ecdf_hi - 1 / n)).max())
    assert ks < 0.015  # 1.36 / sqrt(20 000) = 0.0096 at the 5 % level


def test_timesteps_cover_the_whole_schedule_uniformly() -> None:
    """10 000 draws of t ~ U{0, ..., T-1}: both ends are reached and the mean is (T-1)/2."""
    s = NoiseSchedule.linear(100, 1e-4, 0.02)
    t = imgdiff.training.sample_timesteps(s, 10_000, generator=torch.Generator().manual_seed(2))
    assert t.dtype == torch.int64
    assert int(t.min()) == 0
    assert int(t.max()) == len(s) - 1
    assert abs(float(t.double().mean()) - (len(s) - 1) / 2) < 1.5  # std of the mean: 0.29
    counts = torch.bincount(t, minlength=len(s))
    assert int(counts.min()) > 50  # ~100 each


class _Tied(torch.nn.Module):
    """Two convolutions sharing one weight (tied weights, as in weight-tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 3, 1)
        self.b = torch.nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_networks_with_tied_weights_checkpoint_and_resume(tmp_path: Path) -> None:
    """Shared parameters are written (safetensors refuses shared memory) and restored tied."""
    data = torch.rand(8, 3, 4, 4) * 2 - 1
    ck = tmp_path / "ck.safetensors"

    def trainer(steps: int) -> Trainer:
        torch.manual_seed(0)
        return Trainer(
            _Tied(),
            NoiseSchedule.linear(),
            _make_batch(data, 4),
            TrainingConfig(steps=steps),
            checkpoint=ck,
        )

    first = trainer(2)
    first.train(progress=False)
    second = trainer(3)  # resumes from step 2
    assert second.step == 2
    assert second.net.b.weight is second.net.a.weight  # type: ignore[union-attr]
    torch.testing.assert_close(second.net.a.weight, first.net.a.weight, rtol=0, atol=0)  # type: ignore[union-attr]
    second.train(progress=False)
    assert second.step == 3
    w = torch.randn(2, 3)
    save_checkpoint(tmp_path / "views.safetensors", {"w": w, "row": w[0], "same": w}, {})
    tensors, _ = load_checkpoint(tmp_path / "views.safetensors")
    assert torch.equal(tensors["row"], w[0])
    assert torch.equal(tensors["same"], w)


def test_config_stores_plain_numbers(tmp_path: Path) -> None:
    """numpy scalars become the int or float they stand for (JSON checkpoints, manual_seed)."""
    np = pytest.importorskip("numpy")
    cfg = TrainingConfig(
        steps=np.int64(1), lr=np.float32(1e-3), seed=np.int64(3), grad_clip=np.float64(0.5)
    )
    for name, kind in (("steps", int), ("lr", float), ("seed", int), ("grad_clip", float)):
        assert type(getattr(cfg, name)) is kind, name
    data = torch.rand(4, 3, 4, 4) * 2 - 1
    Trainer(
        _Recorder(),
        NoiseSchedule.linear(),
        _make_batch(data, 2),
        cfg,
        checkpoint=tmp_path / "ck.safetensors",
    ).train(progress=False)
    assert load_checkpoint(tmp_path / "ck.safetensors")[1]["config"]["seed"] == 3


def test_trainer_refuses_bad_arguments_by_name() -> None:
    """Wrong types, a noise level the network is not conditioned on, and an x0 of another dtype."""
    s = NoiseSchedule.linear()
    x0 = torch.zeros(2, 3, 8, 8)
    make = _make_batch(x0, 2)
    with pytest.raises(imgdiff.InputTypeError, match=r"^model_kwargs: expected a mapping"):
        TrainingBatch(x0, model_kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^x0: expected a tensor"):
        TrainingBatch("x0")  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^mask: expected None or a tensor"):
        TrainingBatch(x0, mask=3)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^checkpoint: expected None or a file path"):
        Trainer(_Recorder(), s, make, TrainingConfig(steps=1), checkpoint=5)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^resume: expected a bool, got"):
        Trainer(_Recorder(), s, make, TrainingConfig(steps=1), resume="no")  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^generator: expected None or a torch"):
        imgdiff.training.sample_timesteps(s, 2, generator=5)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^generator: expected None or a torch"):
        sample_gamma(s, 2, generator=5)  # type: ignore[arg-type]
    unet = UNet(
        UNetConfig(
            in_channels=3,
            base_channels=8,
            channel_mults=(1,),
            num_res_blocks=1,
            attention_levels=(),
        )
    )
    with pytest.raises(imgdiff.InputValueError, match=r"^config.noise_level: expected 'timestep'"):
        Trainer(unet, s, make, TrainingConfig(steps=1, noise_level="gamma"))
    trainer = Trainer(_Recorder(), s, make, TrainingConfig(steps=1))
    with pytest.raises(imgdiff.InputTypeError, match=r"^batch.x0: expected dtype torch.float32"):
        trainer.loss(TrainingBatch(x0.double()))


def test_hybrid_loss_reads_no_device_value() -> None:
    """The learned-variance loss runs on the meta device, where any host read raises: its
    timesteps are checked on the CPU, where the trainer draws them."""
    s = NoiseSchedule.linear()
    net = _Recorder(factor=2).to("meta")
    x0 = torch.empty(2, 3, 4, 4, device="meta")
    trainer = Trainer(net, s, lambda step, g: TrainingBatch(x0), TrainingConfig(steps=1))
    loss = trainer.loss(TrainingBatch(x0))
    assert loss.device.type == "meta"
    assert loss.shape == (2,)
    t = torch.tensor([0, 999])
    out = torch.empty(2, 6, 4, 4, device="meta")
    assert imgdiff.losses.vlb_term(s, out, x0, x0, t).shape == (2,)
    with pytest.raises(imgdiff.InputTypeError, match=r"^detach_mean: expected a bool"):
        imgdiff.losses.vlb_term(s, out, x0, x0, t, detach_mean=1)  # type: ignore[arg-type]
