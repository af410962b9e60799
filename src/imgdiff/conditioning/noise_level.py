"""Continuous noise-level conditioning (WaveGrad / SR3 / Palette): the network sees gamma, not t."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import (
    check_batch_timesteps,
    check_tensor,
    check_timestep_tensor,
    describe,
    is_integer_dtype,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model, wrapped
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = ["NoiseLevelConditioning"]


@dataclass(frozen=True, eq=False)
class NoiseLevelConditioning:
    """Feed a gamma-conditioned network ``gamma = alpha_bar_t`` of the *sampling* schedule.

    ``model(x, t, **cond) = net(x, schedule.alpha_bar_at(t), **cond)``: the network was trained on
    continuous noise levels (``gamma ~ U(alpha_bar_t, alpha_bar_{t-1})`` of the training schedule,
    :func:`imgdiff.training.sample_gamma`), so any inference schedule reaching the same gamma gives
    the same output (spec 2.6, PAL-6). Shapes: ``x`` ``(B, ...)``, ``t`` ``(B,)`` integer timesteps
    in ``[-1, T-1]`` (``-1``: the clean level, gamma 1). Their values are checked on the CPU; on
    other devices that would synchronise every step, so they are not (the samplers' are valid).
    """

    net: Model
    schedule: NoiseSchedule
    _tables: dict[torch.device, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not callable(self.net):
            raise InputTypeError(f"net: expected a callable network, got {describe(self.net)}")
        check_schedule("schedule", self.schedule)
        mode = network_noise_conditioning(self.net)
        if mode is not None and mode != "gamma":
            raise InputValueError(
                f"net: expected a network conditioned on noise levels (config.noise_conditioning "
                f"'gamma'), got {mode!r}; pass such a network to the sampler directly"
            )

    @property
    def model(self) -> Model:
        """The wrapped network (lets imgdiff find its dtype)."""
        return self.net

    def gamma(self, t: Tensor) -> Tensor:
        """``alpha_bar_t`` ``(B,)`` for timesteps ``t`` ``(B,)``, float64 where the device has it."""
        t = check_tensor("t", t)
        if t.device.type == "cpu":  # values readable without a device sync
            t = check_timestep_tensor(
                "t",
                t,
                batch=t.shape[0] if t.ndim else 1,
                num_train_timesteps=self.schedule.num_train_timesteps,
                device=t.device,
                allow_final=True,
            )
        elif not is_integer_dtype(t.dtype):
            raise InputTypeError(f"t: expected an integer tensor of timesteps, got {describe(t)}")
        table = self._tables.get(t.device)
        if table is None:
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            ab = self.schedule.alphas_cumprod.to(dtype=torch.float64)
            table = torch.cat([ab.new_ones(1), ab]).to(device=t.device, dtype=dtype)
            self._tables[t.device] = table
        return table[t.long() + 1]  # row 0 is t = -1, the clean level

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The network's output at noise level ``alpha_bar_t`` (in at least float32)."""
        x = check_tensor("x", x, min_ndim=1, floating=True)
        gamma = self.gamma(check_batch_timesteps(t, x)).to(
            torch.promote_types(x.dtype, torch.float32)
        )
        out: Tensor = self.net(x, gamma, **cond)
        return out


def network_noise_conditioning(net: object) -> str | None:
    """``config.noise_conditioning`` of the network behind ``net``, through its wrappers (e.g.
    :class:`~imgdiff.conditioning.ConcatConditioning`), else ``None``."""
    for obj in wrapped(net):
        mode = getattr(getattr(obj, "config", None), "noise_conditioning", None)
        if isinstance(mode, str):
            return mode
    return None
