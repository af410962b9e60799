"""Samplers that call the model once per step and update a single sample (DDPM, DDIM, yours).

:class:`DenoisingSampler` turns the model output into ``x0_hat`` and ``eps_hat`` through the
prediction type's linear coefficients (precomputed per step), applies optional thresholding,
and leaves the update formula to :meth:`DenoisingSampler.update`. Updates of the form
``a x0_hat + b eps_hat + c x`` use :meth:`DenoisingSampler.combine`, which applies them as one
fused combination of ``(x, out)`` when that is well conditioned. It also offers
:meth:`DenoisingSampler.step_at`, a diffusers-style step for a model output you computed
yourself, with a timestep per sample.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from imgdiff import kernels
from imgdiff._checks import (
    check_same_shape,
    check_tensor,
    check_timestep_tensor,
    describe,
)
from imgdiff._ops import Scalar, add_scaled_, fusable, lincomb
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.guidance import Guidance, ModelGuidance
from imgdiff.kernels import fused_backend
from imgdiff.models import BoundModel, check_model_output
from imgdiff.randomness import Generators, check_generators, randn
from imgdiff.samplers.base import Sampler
from imgdiff.samplers.step import StepCoefficients, StepContext, StepOutput
from imgdiff.thresholding import Thresholding
from imgdiff.timesteps import SamplingPlan

__all__ = ["DenoiserCoefficients", "DenoisingSampler", "check_step_noise", "fused_coefficients"]


@dataclass(frozen=True, eq=False)
class DenoiserCoefficients(StepCoefficients):
    """Recover ``x0_hat = x0_from_x x + x0_from_out out`` and ``eps_hat = eps_from_x x + eps_from_out out``.

    ``sqrt_one_minus_alpha_bar`` is the noise scale of the step's input (used by guidance).
    Subclass it to add your update's coefficients; fill these five with
    :meth:`~imgdiff.samplers.Sampler.prediction_fields`.
    """

    x0_from_x: Scalar
    x0_from_out: Scalar
    eps_from_x: Scalar
    eps_from_out: Scalar
    sqrt_one_minus_alpha_bar: Scalar

    def raw_x0_hat(self, x: Tensor, out: Tensor) -> Tensor:
        """``x0_hat`` from the sample and the model output, before any thresholding."""
        return lincomb(x, self.x0_from_x, out, self.x0_from_out)

    def eps_hat(self, x: Tensor, out: Tensor) -> Tensor:
        """``eps_hat`` from the sample and the model output (``out`` itself for epsilon models)."""
        a, b = self.eps_from_x, self.eps_from_out
        if isinstance(a, float) and isinstance(b, float) and a == 0.0 and b == 1.0:
            return out
        return lincomb(x, self.eps_from_x, out, self.eps_from_out)


def fused_coefficients(
    pred: dict[str, Tensor],
    *,
    x0_weight: Tensor,
    eps_weight: Tensor | float = 0.0,
    x_weight: Tensor | float = 0.0,
) -> dict[str, Tensor]:
    """``x_coef``, ``out_coef`` with ``x0_weight x0_hat + eps_weight eps_hat + x_weight x == x_coef x + out_coef out``.

    ``pred`` are the four prediction fields (float64 tables). Pair with
    :meth:`DenoisingSampler.combine`.
    """
    return {
        "x_coef": x0_weight * pred["x0_from_x"] + eps_weight * pred["eps_from_x"] + x_weight,
        "out_coef": x0_weight * pred["x0_from_out"] + eps_weight * pred["eps_from_out"],
    }


def check_step_noise(noise: Tensor | None, x: Tensor) -> None:
    """Check that a step's noise (if any) has the sample's shape (the fused kernels read it over
    ``x``'s elements; torch would broadcast)."""
    if noise is not None and noise.shape != x.shape:
        raise InputValueError(
            f"noise: expected shape {tuple(x.shape)} (x's), got {tuple(noise.shape)}"
        )


def _refuse_unguidable(c: DenoiserCoefficients, where: str) -> None:
    """Refuse to shift ``eps_hat`` where the model output carries none (``eps_from_out = 0``)."""
    if isinstance(c.eps_from_out, float) and c.eps_from_out == 0.0:
        raise InputValueError(
            f"guidance: the model output carries no noise estimate{where} (eps_from_out = 0, "
            "e.g. v-prediction at zero terminal SNR), so the score cannot be shifted; leave "
            "that timestep out, sample without guidance, or use DDPM (whose guidance shifts "
            "the posterior mean)"
        )


DCoeffT = TypeVar("DCoeffT", bound=DenoiserCoefficients)


@dataclass(frozen=True, kw_only=True)
class DenoisingSampler(Sampler[Tensor, DCoeffT]):
    """A sampler whose state is one sample ``x`` and whose step calls the model once.

    Args (besides :class:`~imgdiff.samplers.Sampler`'s):
        thresholding: applied to ``x0_hat`` each step (:class:`~imgdiff.Clip`,
            :class:`~imgdiff.DynamicThreshold`), or ``None``.
        guidance: a :class:`~imgdiff.Guidance` (:class:`~imgdiff.ClassifierGuidance`,
            :class:`~imgdiff.LossGuidance`, ...) whose gradient steers every step, or ``None``:
            DDIM shifts ``eps_hat`` by ``-sqrt(1 - ab_t) grad`` (Dhariwal & Nichol, Alg. 2),
            DDPM shifts the posterior mean by ``variance * grad`` (Alg. 1).

    Subclasses implement :meth:`coefficients` and :meth:`update`.
    """

    thresholding: Thresholding | None = None
    guidance: Guidance | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.thresholding is not None and not isinstance(self.thresholding, Thresholding):
            raise InputTypeError(
                "thresholding: expected None or an imgdiff.Thresholding (Clip, DynamicThreshold), "
                f"got {describe(self.thresholding)}"
            )
        if self.guidance is not None and not isinstance(self.guidance, Guidance):
            raise InputTypeError(
                f"guidance: expected None or an imgdiff.Guidance, got {describe(self.guidance)}"
            )

    # ------------------------------------------------------------------ to implement

    @abstractmethod
    def update(
        self, x: Tensor, out: Tensor, coeffs: DCoeffT, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        """The update formula: next sample from ``x`` ``(B, C, ...)``, the model output and noise.

        ``out`` has ``x``'s shape (``2C`` channels when :attr:`output_channels_factor` is 2).
        Must not modify ``x`` or ``out`` in place.
        """

    @property
    def output_channels_factor(self) -> int:
        """Model output channels per sample channel: 1, or 2 for a learned variance."""
        return 1

    # ------------------------------------------------------------------ helpers for subclasses

    def x0_hat(self, x: Tensor, out: Tensor, coeffs: DenoiserCoefficients) -> Tensor:
        """``x0_hat`` ``(B, C, ...)`` with this sampler's thresholding applied."""
        x0 = coeffs.raw_x0_hat(x, out)
        return x0 if self.thresholding is None else self.thresholding(x0)

    def combine(
        self,
        x: Tensor,
        out: Tensor,
        coeffs: DenoiserCoefficients,
        *,
        x_coef: Scalar,
        out_coef: Scalar,
        x0_weight: Scalar,
        eps_weight: Scalar = 0.0,
        x_weight: Scalar = 0.0,
        eps_from_x0: Callable[[Tensor], Tensor] | None = None,
        noise: Tensor | None = None,
        noise_weight: Scalar = 0.0,
    ) -> tuple[Tensor, Tensor | Callable[[], Tensor]]:
        """``x0_weight x0_hat + eps_weight eps_hat + x_weight x (+ noise_weight noise)`` and the
        step's ``x0_hat``.

        Without thresholding, with moderate ``x_coef``/``out_coef`` (from
        :func:`fused_coefficients`) and where a subclass does not override :meth:`x0_hat`, this
        is one fused combination of ``(x, out)`` (and the noise: one kernel where
        :attr:`backend` resolves to one) and ``x0_hat`` is returned lazily. Otherwise ``x0_hat`` is formed first (thresholded, and in the well-conditioned
        order ``(x - sigma eps) / alpha``), and ``eps_hat`` comes from the model output or, if
        given, from ``eps_from_x0(x0_hat)``. Use at most two of the three weights.
        """
        if out.shape != x.shape:  # the fused kernels read out over x's elements
            raise InputValueError(
                f"out: expected the model output's mean part of shape {tuple(x.shape)} (x's), "
                f"got {tuple(out.shape)}"
            )
        check_step_noise(noise, x)
        x0: Tensor | Callable[[], Tensor]
        if (
            self.thresholding is None
            and fusable(x_coef, out_coef)
            and type(self).x0_hat is DenoisingSampler.x0_hat
        ):

            def x0() -> Tensor:  # evaluated at most once, if someone reads it
                return coeffs.raw_x0_hat(x, out)

            impl = fused_backend(self.backend, x, out, noise)
            if impl is not None and isinstance(noise_weight, float):
                fused = kernels.fused_lincomb3(
                    impl, x, float(x_coef), out, float(out_coef), noise, noise_weight
                )
                return fused, x0
            result = lincomb(x, x_coef, out, out_coef)
        else:
            x0 = x0_hat = self.x0_hat(x, out, coeffs)
            if isinstance(eps_weight, float) and eps_weight == 0.0:
                result = lincomb(x0_hat, x0_weight, x, x_weight)
            else:
                eps = eps_from_x0(x0_hat) if eps_from_x0 is not None else coeffs.eps_hat(x, out)
                result = lincomb(x0_hat, x0_weight, eps, eps_weight)
        if noise is not None:
            add_scaled_(result, noise, noise_weight)
        return result, x0

    # ------------------------------------------------------------------ contract

    def init_state(self, x: Tensor) -> Tensor:
        return x

    def final_sample(self, state: Tensor) -> Tensor:
        return state

    def step(
        self,
        model: BoundModel,
        state: Tensor,
        coeffs: DCoeffT,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[Tensor]:
        if self.guidance is None:
            out = model(state, ctx.t)
            self._check_output(out, state)
            return self.update(state, out, coeffs, noise)
        if type(self).guided_update is DenoisingSampler.guided_update:  # shifts eps_hat
            _refuse_unguidable(coeffs, f" at timestep {ctx.timestep}")
        if isinstance(self.guidance, ModelGuidance):
            out, grad = self.model_guidance(self.guidance, model, state, coeffs, ctx)
        else:
            out = model(state, ctx.t)
            self._check_output(out, state)
            grad = self.guidance_gradient(self.guidance, model, state, ctx.t)
        return self.guided_update(state, out, coeffs, noise, grad)

    def model_guidance(
        self,
        guidance: ModelGuidance,
        model: BoundModel,
        x: Tensor,
        coeffs: DenoiserCoefficients,
        ctx: StepContext,
    ) -> tuple[Tensor, Tensor]:
        """One model call with autograd on: the detached output and ``guidance``'s gradient.

        ``x0_hat`` is formed from the mean channels before thresholding (ZeCon's
        ``clip_denoised=False``), as a differentiable function of ``x`` ``(B, C, ...)``.
        """
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = model(xg, ctx.t)
            self._check_output(out, x)
            C = x.shape[1]
            x0_hat = coeffs.raw_x0_hat(xg, out if out.shape[1] == C else out[:, :C])
            grad = guidance.gradient_from_estimate(xg, x0_hat, ctx, coeffs.sqrt_one_minus_alpha_bar)
        return out.detach(), _checked_gradient(grad, x).detach()

    @staticmethod
    def guidance_gradient(guidance: Guidance, model: BoundModel, x: Tensor, t: Tensor) -> Tensor:
        """``guidance.gradient`` at ``x`` ``(B, C, ...)`` cast to the model's dtype, checked, and
        returned in ``x``'s dtype."""
        xm = x if x.dtype == model.model_dtype else x.to(model.model_dtype)
        return _checked_gradient(guidance.gradient(xm, t), x)

    def guided_update(
        self, x: Tensor, out: Tensor, coeffs: DCoeffT, noise: Tensor | None, grad: Tensor
    ) -> StepOutput[Tensor]:
        """The update with guidance gradient ``grad`` (``x``'s shape): shift ``eps_hat`` by
        ``-sqrt(1 - ab_t) grad`` (Dhariwal & Nichol's ``condition_score``), i.e. the model output
        by ``-sqrt(1 - ab_t) / eps_from_out * grad``; ``x0_hat`` follows from the shifted output
        and is thresholded after the shift. DDPM overrides it (posterior-mean shift)."""
        c = coeffs
        C = x.shape[1]
        _refuse_unguidable(c, "")
        shift = -c.sqrt_one_minus_alpha_bar / c.eps_from_out
        mean_out = out[:, :C] if out.shape[1] != C else out
        shifted = (
            lincomb(mean_out, 1.0, grad, shift)
            if isinstance(shift, float)
            else mean_out + shift * grad
        )
        guided = shifted if out.shape[1] == C else torch.cat([shifted, out[:, C:]], dim=1)
        return self.update(x, guided, coeffs, noise)

    def _check_output(self, out: Tensor, x: Tensor, name: str = "model output") -> None:
        check_model_output(out, x, factor=self.output_channels_factor, name=name)

    # ------------------------------------------------------------------ diffusers-style step

    def step_at(
        self,
        model_output: Tensor,
        x: Tensor,
        t: Tensor | int,
        prev_t: Tensor | int,
        *,
        noise: Tensor | None = None,
        generator: Generators = None,
    ) -> StepOutput[Tensor]:
        """One step from a model output you computed, with a timestep per sample.

        Args:
            model_output: ``(B, C, ...)`` (``2C`` for a learned variance), the model at ``(x, t)``.
            x: ``(B, C, ...)`` current sample.
            t: training timesteps ``(B,)`` (or one int for all).
            prev_t: the timesteps to step to, ``(B,)`` or int, each ``< t``; ``-1`` is the final
                level. (``t - 1`` for a full-length DDPM; the next entry of your timestep list
                otherwise.)
            noise: standard normal noise of ``x``'s shape for stochastic steps; drawn from
                ``generator`` when omitted.

        DDPM adds no noise to samples whose ``prev_t`` is ``-1``. This entry point validates its
        timesteps (a host-device synchronisation); the sampling loop uses precomputed
        coefficients instead.
        """
        x = check_tensor("x", x, floating=True, min_ndim=2)
        model_output = check_tensor("model_output", model_output, floating=True)
        T = len(self.schedule)
        t_idx = check_timestep_tensor(
            "t", t, batch=x.shape[0], num_train_timesteps=T, device=x.device
        )
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
        check_generators(generator, x.shape[0])  # also where no step here draws noise
        dtype = self.state_dtype(x)
        final = SamplingPlan.final_level(self.schedule, self.final_alpha_bar)
        ab_next = torch.where(
            prev_idx >= 0,
            self.schedule.alpha_bar_at(prev_idx.clamp(min=0)),
            torch.tensor(final, dtype=torch.float64, device=x.device),
        )
        plan = SamplingPlan(t_idx, prev_idx, self.schedule.alpha_bar_at(t_idx), ab_next)
        table = self.coefficients(plan)
        coeffs = table.per_sample(x.ndim, dtype)
        # needs_noise takes one step's float coefficients, as in the loop: ask it per sample
        if noise is None and any(self.needs_noise(row) for row in table.unbind()):
            noise = randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        elif noise is not None:
            check_tensor("noise", noise, floating=True)
            check_same_shape("noise", noise, "x", x)  # and its device
            noise = noise.to(dtype)  # straight to the state dtype, not through x's
        return self.update(x.to(dtype), model_output.to(dtype), coeffs, noise)


def _checked_gradient(grad: object, x: Tensor) -> Tensor:
    """A guidance gradient of the sample ``x``'s shape, floating and on its device, in its dtype."""
    if not isinstance(grad, Tensor) or grad.shape != x.shape:
        raise InputValueError(
            f"guidance: expected a gradient of the sample's shape {tuple(x.shape)}, "
            f"got {describe(grad)}"
        )
    if not grad.dtype.is_floating_point:
        raise InputTypeError(f"guidance: expected a floating-point gradient, got {grad.dtype}")
    if grad.device != x.device:
        raise InputValueError(
            f"guidance: expected a gradient on the sample's device {x.device}, got {grad.device}"
        )
    return grad if grad.dtype == x.dtype else grad.to(x.dtype)
