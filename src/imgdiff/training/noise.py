"""Sampling the noise level of a training example: a timestep, or Palette's continuous gamma."""

from __future__ import annotations

import torch
from torch import Tensor

from imgdiff._checks import check_generator, check_int
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = ["sample_gamma", "sample_timesteps"]


def sample_timesteps(
    schedule: NoiseSchedule,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``t ~ Uniform{0, ..., T-1}`` per sample (DDPM Algorithm 1): int64 ``(batch,)``."""
    check_schedule("schedule", schedule)
    batch = check_int("batch", batch, min=1)
    generator = check_generator(generator)
    t = torch.randint(0, len(schedule), (batch,), generator=generator)
    return t.to(device) if device is not None else t


def sample_gamma(
    schedule: NoiseSchedule,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Palette / WaveGrad noise levels: ``t ~ U{1, ..., T-1}``, ``gamma ~ U(ab_t, ab_{t-1})`` (spec 2.6).

    Returns ``(t, gamma)``: int64 ``(batch,)`` and float64 ``(batch,)``, each ``gamma`` inside its
    own ``[alpha_bar_t, alpha_bar_{t-1}]``. The network is conditioned on ``gamma`` itself, so it
    can later be sampled with any schedule (:class:`~imgdiff.conditioning.NoiseLevelConditioning`).
    """
    check_schedule("schedule", schedule)
    batch = check_int("batch", batch, min=1)
    generator = check_generator(generator)
    ab = schedule.alphas_cumprod
    t = torch.randint(1, len(schedule), (batch,), generator=generator)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    gamma = ab[t] + u * (ab[t - 1] - ab[t])
    if device is not None:
        return t.to(device), gamma.to(device)
    return t, gamma
