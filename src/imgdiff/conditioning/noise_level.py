"""Continuous noise-level conditioning (WaveGrad / SR3 / Palette): the network sees gamma, not t."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from imgdiff._checks import describe
from imgdiff.errors import InputTypeError
from imgdiff.models import Model
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = ["NoiseLevelConditioning"]


@dataclass(frozen=True, eq=False)
class NoiseLevelConditioning:
    """Feed a gamma-conditioned network ``gamma = alpha_bar_t`` of the *sampling* schedule.

    ``model(x, t, **cond) = net(x, schedule.alpha_bar_at(t), **cond)``: the network was trained on
    continuous noise levels (``gamma ~ U(alpha_bar_t, alpha_bar_{t-1})`` of the training schedule,
    :func:`imgdiff.training.sample_gamma`), so any inference schedule reaching the same gamma gives
    the same output (spec 2.6, PAL-6). Shapes: ``x`` ``(B, ...)``, ``t`` ``(B,)``.
    """

    net: Model
    schedule: NoiseSchedule

    def __post_init__(self) -> None:
        if not callable(self.net):
            raise InputTypeError(f"net: expected a callable network, got {describe(self.net)}")
        check_schedule("schedule", self.schedule)

    @property
    def model(self) -> Model:
        """The wrapped network (lets imgdiff find its dtype)."""
        return self.net

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The network's output at noise level ``alpha_bar_t``."""
        table = self.schedule.alphas_cumprod.to(device=t.device, dtype=x.dtype)
        out: Tensor = self.net(x, table[t.long()], **cond)
        return out
