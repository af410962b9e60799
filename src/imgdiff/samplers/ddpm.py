"""DDPM ancestral sampling (Ho et al. 2020) with fixed and learned variances (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff import kernels
from imgdiff._checks import check_choice
from imgdiff._ops import Scalar, add_scaled_, fusable, lincomb
from imgdiff.kernels import Fused, fused_backend, fused_for
from imgdiff.posterior import (
    POSTERIOR_VARIANCE_FLOOR,
    learned_range_log_variance,
    posterior_coefficients,
)
from imgdiff.samplers.denoising import (
    DenoiserCoefficients,
    DenoisingSampler,
    check_step_noise,
    fused_coefficients,
)
from imgdiff.samplers.step import StepOutput
from imgdiff.timesteps import SamplingPlan

__all__ = ["DDPM", "VARIANCE_TYPES", "DDPMCoefficients", "VarianceType"]

VarianceType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
"""The reverse-process variance ``Sigma_t`` of a DDPM step ``t -> s``.

* ``"fixed_small"``: the posterior variance ``beta_tilde = beta (1 - ab_s) / (1 - ab_t)``.
* ``"fixed_large"``: ``beta = 1 - ab_t / ab_s``.
* ``"learned"``: the model's extra ``C`` channels are ``log Sigma`` (improved DDPM).
* ``"learned_range"``: the extra channels ``v`` interpolate, ``log Sigma = frac log beta +
  (1 - frac) log beta_tilde`` with ``frac = (v + 1)/2`` (improved DDPM eq. 15).
"""
VARIANCE_TYPES: tuple[VarianceType, ...] = get_args(VarianceType)
"""The accepted :data:`VarianceType` values."""


@dataclass(frozen=True, eq=False)
class DDPMCoefficients(DenoiserCoefficients):
    """Per-step coefficients of the DDPM step ``t -> s`` (``s`` the next timestep, or final).

    Posterior mean ``mu = mean_x0 x0_hat + mean_x x`` (DDPM eq. 7 with the strided
    ``beta = 1 - ab_t/ab_s``, :mod:`imgdiff.posterior`), also written as one combination
    ``x_coef x + out_coef out``. ``log_beta_tilde`` (floored at 1e-20) and ``log_beta`` are the
    fixed-small and fixed-large log-variances and bound the learned range; ``noise_mask`` is 0
    on the step to the final level, else 1; ``sigma`` is the fixed standard deviation times it.
    """

    mean_x0: Scalar
    mean_x: Scalar
    x_coef: Scalar
    out_coef: Scalar
    log_beta_tilde: Scalar
    log_beta: Scalar
    noise_mask: Scalar
    sigma: Scalar


@dataclass(frozen=True, kw_only=True)
class DDPM(DenoisingSampler[DDPMCoefficients]):
    """Ancestral sampling, DDPM Algorithm 2, on any (strided) timestep list.

    Args (besides :class:`~imgdiff.samplers.DenoisingSampler`'s, all keyword-only):
        variance: :data:`VarianceType`; the learned types expect the model to return ``2C``
            channels (mean part first).

    A step from ``t`` to the next listed timestep ``s`` uses ``beta = 1 - ab_t/ab_s`` (the
    respaced schedule of improved DDPM); with every timestep listed this is plain DDPM. The step
    to the final level adds no noise, per sample. Runs ``T`` steps unless told otherwise.
    """

    variance: VarianceType = "fixed_small"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variance", self.variance, VARIANCE_TYPES)

    @property
    def default_num_steps(self) -> int:
        return len(self.schedule)

    @property
    def output_channels_factor(self) -> int:
        return 2 if self.variance in ("learned", "learned_range") else 1

    def coefficients(self, plan: SamplingPlan) -> DDPMCoefficients:
        pred = self.prediction_fields(plan)
        post = posterior_coefficients(plan.alpha_bar, plan.alpha_bar_next)
        log_beta_tilde = torch.log(post.beta_tilde.clamp(min=POSTERIOR_VARIANCE_FLOOR))
        # beta = 0 on a step that does not move (t = 0 to the "first" final level): floored so
        # that learned_range's extrapolation (v < -1) stays finite there
        log_beta = torch.log(post.beta.clamp(min=POSTERIOR_VARIANCE_FLOOR))
        mask = (plan.next_timesteps >= 0).to(torch.float64)
        fixed = log_beta_tilde if self.variance == "fixed_small" else log_beta
        return DDPMCoefficients(
            **pred,
            mean_x0=post.mean_x0,
            mean_x=post.mean_x,
            **fused_coefficients(pred, x0_weight=post.mean_x0, x_weight=post.mean_x),
            log_beta_tilde=log_beta_tilde,
            log_beta=log_beta,
            noise_mask=mask,
            sigma=torch.exp(0.5 * fixed) * mask,
        )

    def needs_noise(self, coeffs: DDPMCoefficients) -> bool:
        return isinstance(coeffs.noise_mask, Tensor) or coeffs.noise_mask != 0.0

    def posterior(
        self, x: Tensor, out: Tensor, coeffs: DDPMCoefficients
    ) -> tuple[Tensor, Scalar, Tensor | Callable[[], Tensor]]:
        """Mean and log-variance of ``p(x_s | x_t)``, and the step's ``x0_hat`` (maybe lazy).

        ``out`` is the full model output (``2C`` channels for learned variances). The
        log-variance is a scalar for fixed variances and a tensor of ``x``'s shape for learned
        ones. Shapes: ``x`` ``(B, C, ...)``; the mean has ``x``'s shape.
        """
        c = coeffs
        C = x.shape[1]
        mean_out = out[:, :C] if self.output_channels_factor == 2 else out
        mean, x0 = self.combine(
            x,
            mean_out,
            c,
            x_coef=c.x_coef,
            out_coef=c.out_coef,
            x0_weight=c.mean_x0,
            x_weight=c.mean_x,
        )
        log_var: Scalar
        if self.variance == "learned":
            log_var = out[:, C:]
        elif self.variance == "learned_range":
            log_var = learned_range_log_variance(out[:, C:], c.log_beta, c.log_beta_tilde)
        else:
            log_var = c.log_beta_tilde if self.variance == "fixed_small" else c.log_beta
        return mean, log_var, x0

    def update(
        self, x: Tensor, out: Tensor, coeffs: DDPMCoefficients, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        c = coeffs
        # the fused paths fuse the posterior mean with the noise (the posterior's formula, so not
        # for a subclass that overrides it) and check out and the noise themselves (combine,
        # kernels.ddpm_learned_step); the torch path is the posterior and its sampling, in place
        # into the mean only where it is our posterior's (an override may return x itself)
        own = type(self).posterior is DDPM.posterior
        if self.output_channels_factor == 1:
            impl = fused_backend(self.backend, x, out, noise)
        else:  # out has twice x's elements: its dtype and autograd are checked here
            impl = fused_backend(self.backend, x, noise) if out.dtype == x.dtype else None
            impl = fused_for(impl, out)
        if impl is not None and own:
            fused = self._fused_update(x, out, c, noise, impl)
            if fused is not None:
                return fused
        self._check_output(out, x, "out")  # (B, 2C, ...) with a learned variance
        check_step_noise(noise, x)
        return self._sample_posterior(*self.posterior(x, out, c), c, noise, own=own)

    def _fused_update(
        self, x: Tensor, out: Tensor, c: DDPMCoefficients, noise: Tensor | None, impl: Fused
    ) -> StepOutput[Tensor] | None:
        """One fused kernel per step, or ``None`` where the step must go through ``x0_hat`` (or
        the learned-variance step has no kernel on ``impl``)."""
        if self.output_channels_factor == 1:  # combine goes through x0_hat itself where needed
            x_next, x0 = self.combine(
                x,
                out,
                c,
                x_coef=c.x_coef,
                out_coef=c.out_coef,
                x0_weight=c.mean_x0,
                x_weight=c.mean_x,
                noise=noise,
                noise_weight=c.sigma,
            )
            return StepOutput(x_next, x0)
        steps = (c.x_coef, c.out_coef, c.log_beta, c.log_beta_tilde, c.noise_mask)
        if (
            impl != "triton"
            or self.thresholding is not None
            or not fusable(c.x_coef, c.out_coef)
            or not all(isinstance(v, float) for v in steps)
        ):
            return None
        C = x.shape[1]
        x_next = kernels.ddpm_learned_step(
            x,
            out,
            float(c.x_coef),
            float(c.out_coef),
            noise,
            log_beta=float(c.log_beta),
            log_beta_tilde=float(c.log_beta_tilde),
            noise_mask=float(c.noise_mask),
            learned_range=self.variance == "learned_range",
            backend="triton",
        )
        return StepOutput(x_next, lambda: c.raw_x0_hat(x, out[:, :C]))

    def guided_update(
        self, x: Tensor, out: Tensor, coeffs: DDPMCoefficients, noise: Tensor | None, grad: Tensor
    ) -> StepOutput[Tensor]:
        """Dhariwal & Nichol's ``condition_mean``: ``mu <- mu + Sigma grad``, then sample.

        The posterior mean (with its thresholded ``x0_hat``) is formed first, then shifted.
        """
        mean, log_var, x0 = self.posterior(x, out, coeffs)
        if isinstance(log_var, float):
            return self._sample_posterior(
                lincomb(mean, 1.0, grad, math.exp(log_var)), log_var, x0, coeffs, noise
            )
        return self._sample_posterior(mean + torch.exp(log_var) * grad, log_var, x0, coeffs, noise)

    def _sample_posterior(
        self,
        mean: Tensor,
        log_var: Scalar,
        x0: Tensor | Callable[[], Tensor],
        coeffs: DDPMCoefficients,
        noise: Tensor | None,
        *,
        own: bool = True,
    ) -> StepOutput[Tensor]:
        """``mean + std noise``, in place into ``mean`` when the step ``own``s it."""
        if noise is not None:
            std: Scalar = coeffs.sigma
            if self.output_channels_factor == 2:  # learned: a per-element log-variance
                mask = coeffs.noise_mask
                if isinstance(mask, float) and mask == 0.0:
                    return StepOutput(mean, x0)
                std = torch.exp(0.5 * torch.as_tensor(log_var))
                if isinstance(mask, Tensor):  # per sample (step_at): where, not 0 * inf
                    std = torch.where(mask > 0, std, 0.0)
            if not own:
                return StepOutput(mean + std * noise, x0)
            add_scaled_(mean, noise, std)
        return StepOutput(mean, x0)
