"""Samplers that call the model once per step and update a single sample (DDPM, DDIM, yours).

:class:`DenoisingSampler` turns the model output into ``x0_hat`` and ``eps_hat`` through the
prediction type's linear coefficients (precomputed per step), applies optional thresholding,
and leaves the update formula to :meth:`DenoisingSampler.update`. It also offers
:meth:`DenoisingSampler.step_at`, a diffusers-style step for a model output you computed
yourself, with a timestep per sample.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from imgdiff._checks import check_same_shape, check_tensor, check_timestep_tensor, describe
from imgdiff._ops import Scalar, lincomb
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.prediction import linear_prediction_coefficients
from imgdiff.randomness import Generators, randn
from imgdiff.samplers.base import BoundModel, Sampler, StepCoefficients, StepOutput
from imgdiff.thresholding import Thresholding
from imgdiff.timesteps import SamplingPlan

__all__ = ["DenoiserCoefficients", "DenoisingSampler"]


@dataclass(frozen=True)
class DenoiserCoefficients(StepCoefficients):
    """Recover ``x0_hat = x0_from_x x + x0_from_out out`` and ``eps_hat = eps_from_x x + eps_from_out out``.

    Subclass it to add your update's coefficients; fill these four with
    :meth:`DenoisingSampler.prediction_fields`.
    """

    x0_from_x: Scalar
    x0_from_out: Scalar
    eps_from_x: Scalar
    eps_from_out: Scalar

    def x0_hat(self, x: Tensor, out: Tensor) -> Tensor:
        """``x0_hat`` from the sample and the raw model output (before thresholding)."""
        return lincomb(x, self.x0_from_x, out, self.x0_from_out)

    def eps_hat(self, x: Tensor, out: Tensor) -> Tensor:
        """``eps_hat`` from the sample and the raw model output."""
        return lincomb(x, self.eps_from_x, out, self.eps_from_out)


DCoeffT = TypeVar("DCoeffT", bound=DenoiserCoefficients)


@dataclass(frozen=True)
class DenoisingSampler(Sampler[Tensor, DCoeffT]):
    """A sampler whose state is one sample ``x`` and whose step calls the model once.

    Args (besides :class:`~imgdiff.samplers.Sampler`'s):
        thresholding: applied to ``x0_hat`` each step (:class:`~imgdiff.Clip`,
            :class:`~imgdiff.DynamicThreshold`), or ``None``.

    Subclasses implement :meth:`coefficients` and :meth:`update`.
    """

    thresholding: Thresholding | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thresholding is not None and not isinstance(self.thresholding, Thresholding):
            raise InputTypeError(
                "thresholding: expected None or an imgdiff.Thresholding (Clip, DynamicThreshold), "
                f"got {describe(self.thresholding)}"
            )

    # ------------------------------------------------------------------ to implement

    @abstractmethod
    def update(
        self, x: Tensor, out: Tensor, coeffs: DCoeffT, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        """The update formula: next sample from ``x``, the model output ``out`` and ``noise``.

        ``out`` has ``x``'s shape (``2C`` channels when :attr:`output_channels_factor` is 2).
        Must not modify ``x`` or ``out`` in place.
        """

    @property
    def output_channels_factor(self) -> int:
        """Model output channels per sample channel: 1, or 2 for a learned variance."""
        return 1

    # ------------------------------------------------------------------ helpers for subclasses

    def prediction_fields(self, plan: SamplingPlan) -> dict[str, Tensor]:
        """The four :class:`DenoiserCoefficients` fields for ``plan``, as keyword arguments."""
        lp = linear_prediction_coefficients(self.prediction, plan.alpha_bar, plan.timesteps)
        return lp._asdict()

    def x0_hat(self, x: Tensor, out: Tensor, coeffs: DenoiserCoefficients) -> Tensor:
        """``x0_hat`` with this sampler's thresholding applied."""
        x0 = coeffs.x0_hat(x, out)
        return x0 if self.thresholding is None else self.thresholding(x0)

    # ------------------------------------------------------------------ contract

    def init_state(self, x: Tensor) -> Tensor:
        return x

    def final_sample(self, state: Tensor) -> Tensor:
        return state

    def step(
        self, model: BoundModel, state: Tensor, coeffs: DCoeffT, t: Tensor, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        out = model(state, t)
        self._check_output(out, state)
        return self.update(state, out, coeffs, noise)

    def _check_output(self, out: Tensor, x: Tensor, name: str = "model output") -> None:
        factor = self.output_channels_factor
        expected = (x.shape[0], x.shape[1] * factor, *x.shape[2:])
        if out.shape != expected:
            hint = ""
            if factor == 1 and out.shape[1:2] == (2 * x.shape[1],):
                hint = (
                    "; a learned-variance model returns 2C channels: wrap it with "
                    "imgdiff.without_variance(model) or use DDPM(variance='learned_range')"
                )
            raise InputValueError(
                f"{name}: expected shape {expected} for a sample of shape "
                f"{tuple(x.shape)}, got {tuple(out.shape)}{hint}"
            )

    # ------------------------------------------------------------------ diffusers-style step

    def step_at(
        self,
        model_output: Tensor,
        x: Tensor,
        t: Tensor | int,
        prev_t: Tensor | int | None = None,
        *,
        noise: Tensor | None = None,
        generator: Generators = None,
    ) -> StepOutput[Tensor]:
        """One step from a model output you computed, with a timestep per sample.

        Args:
            model_output: ``(B, C, ...)`` (``2C`` for a learned variance), the model at ``(x, t)``.
            x: ``(B, C, ...)`` current sample.
            t: training timesteps ``(B,)`` (or one int for all).
            prev_t: the timesteps to step to, ``(B,)`` or int; ``-1`` is the final level.
                Default ``t - 1`` (the full schedule).
            noise: standard normal noise of ``x``'s shape for stochastic steps; drawn from
                ``generator`` when omitted.

        Samples whose ``prev_t`` is ``-1`` get no noise. This entry point validates its
        timesteps (a host-device synchronisation); the sampling loop uses precomputed
        coefficients instead.
        """
        x = check_tensor("x", x, floating=True, min_ndim=2)
        model_output = check_tensor("model_output", model_output, floating=True)
        T = len(self.schedule)
        t_idx = check_timestep_tensor(
            "t", t, batch=x.shape[0], num_train_timesteps=T, device=x.device
        )
        if prev_t is None:
            prev_idx = t_idx - 1
        else:
            prev_idx = check_timestep_tensor(
                "prev_t",
                prev_t,
                batch=x.shape[0],
                num_train_timesteps=T,
                device=x.device,
                allow_final=True,
            )
            bad = prev_idx >= t_idx
            if bool(bad.any()):
                b = int(torch.nonzero(bad)[0])
                raise InputValueError(
                    "prev_t: expected every prev_t < t (a denoising step), got prev_t "
                    f"{int(prev_idx[b])} for t {int(t_idx[b])} at sample {b}"
                )
        self._check_output(model_output, x, "model_output")
        if noise is not None and generator is not None:
            raise InputValueError(
                "noise: expected None when a generator is given (one source of noise), got both"
            )
        dtype = self.state_dtype(x)
        final = 1.0 if self.final_alpha_bar == "one" else float(self.schedule.alphas_cumprod[0])
        ab_next = torch.where(
            prev_idx >= 0,
            self.schedule.alpha_bar_at(prev_idx.clamp(min=0)),
            torch.tensor(final, dtype=torch.float64, device=x.device),
        )
        plan = SamplingPlan(t_idx, prev_idx, self.schedule.alpha_bar_at(t_idx), ab_next)
        coeffs = self.coefficients(plan).per_sample(x.ndim, dtype)
        if noise is None and self.needs_noise(coeffs):
            noise = randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        elif noise is not None:
            check_tensor("noise", noise, floating=True)
            check_same_shape("noise", noise, "x", x)
            noise = noise.to(dtype)
        return self.update(x.to(dtype), model_output.to(dtype), coeffs, noise)
