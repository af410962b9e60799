"""DDPM ancestral sampling (Ho et al. 2020) with fixed and learned variances (Nichol & Dhariwal 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff._checks import check_choice
from imgdiff._ops import Scalar, add_scaled_, fusable, lincomb
from imgdiff.samplers.base import StepOutput
from imgdiff.samplers.denoising import DenoiserCoefficients, DenoisingSampler
from imgdiff.schedules import POSTERIOR_VARIANCE_FLOOR
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


@dataclass(frozen=True)
class DDPMCoefficients(DenoiserCoefficients):
    """Per-step coefficients of the DDPM step ``t -> s`` (``s`` the next timestep, or final).

    Posterior mean ``mu = mean_x0 x0_hat + mean_x x`` (DDPM eq. 7 with the strided
    ``beta = 1 - ab_t/ab_s``); without thresholding ``mu = x_coef x + out_coef out``.
    ``log_variance`` is the fixed variance's log; ``log_beta_tilde``/``log_beta`` bound the
    learned range; ``noise_mask`` is 0 on the step to the clean level, else 1; ``sigma`` is the
    fixed standard deviation times ``noise_mask``.
    """

    mean_x0: Scalar
    mean_x: Scalar
    x_coef: Scalar
    out_coef: Scalar
    log_variance: Scalar
    log_beta_tilde: Scalar
    log_beta: Scalar
    noise_mask: Scalar
    sigma: Scalar


@dataclass(frozen=True)
class DDPM(DenoisingSampler[DDPMCoefficients]):
    """Ancestral sampling, DDPM Algorithm 2, on any (strided) timestep list.

    Args (besides :class:`~imgdiff.samplers.DenoisingSampler`'s):
        variance: :data:`VarianceType`; the learned types expect the model to return ``2C``
            channels (mean part first).

    A step from ``t`` to the next listed timestep ``s`` uses ``beta = 1 - ab_t/ab_s`` (the
    respaced schedule of improved DDPM); with every timestep listed this is plain DDPM. The step
    to the clean level adds no noise, per sample. Runs ``T`` steps unless told otherwise.
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
        ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
        beta = 1.0 - ab / ab_s
        mean_x0 = torch.sqrt(ab_s) * beta / (1.0 - ab)
        mean_x = torch.sqrt(ab / ab_s) * (1.0 - ab_s) / (1.0 - ab)
        beta_tilde = beta * (1.0 - ab_s) / (1.0 - ab)
        log_beta_tilde = torch.log(beta_tilde.clamp(min=POSTERIOR_VARIANCE_FLOOR))
        log_beta = torch.log(beta)
        log_var = log_beta_tilde if self.variance == "fixed_small" else log_beta
        mask = (plan.next_timesteps >= 0).to(torch.float64)
        return DDPMCoefficients(
            **pred,
            mean_x0=mean_x0,
            mean_x=mean_x,
            x_coef=mean_x0 * pred["x0_from_x"] + mean_x,
            out_coef=mean_x0 * pred["x0_from_out"],
            log_variance=log_var,
            log_beta_tilde=log_beta_tilde,
            log_beta=log_beta,
            noise_mask=mask,
            sigma=torch.exp(0.5 * log_var) * mask,
        )

    def needs_noise(self, coeffs: DDPMCoefficients) -> bool:
        return isinstance(coeffs.noise_mask, Tensor) or coeffs.noise_mask != 0.0

    def posterior(
        self, x: Tensor, out: Tensor, coeffs: DDPMCoefficients
    ) -> tuple[Tensor, Scalar, Tensor | None]:
        """Mean and log-variance of ``p(x_s | x_t)``, and ``x0_hat`` when it was formed.

        ``out`` is the full model output (``2C`` channels for learned variances). The
        log-variance is a scalar for fixed variances and a tensor of ``x``'s shape for learned
        ones. Shapes: ``x`` ``(B, C, ...)``; the mean has ``x``'s shape.
        """
        c = coeffs
        mean_out, v = out, None
        if self.output_channels_factor == 2:
            C = x.shape[1]
            mean_out, v = out[:, :C], out[:, C:]
        if self.thresholding is None and fusable(c.x_coef, c.out_coef):
            mean = lincomb(x, c.x_coef, mean_out, c.out_coef)
            x0 = None
        else:  # thresholding, or large coefficients that would cancel in one combination
            x0 = self.x0_hat(x, mean_out, c)
            mean = lincomb(x0, c.mean_x0, x, c.mean_x)
        log_var: Scalar
        if v is None:
            log_var = c.log_variance
        elif self.variance == "learned":
            log_var = v
        else:
            frac = (v + 1.0) * 0.5
            log_var = frac * c.log_beta + (1.0 - frac) * c.log_beta_tilde
        return mean, log_var, x0

    def update(
        self, x: Tensor, out: Tensor, coeffs: DDPMCoefficients, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        mean, log_var, x0 = self.posterior(x, out, coeffs)
        if noise is not None:
            std: Scalar = coeffs.sigma
            if isinstance(log_var, Tensor):  # learned: a per-element log-variance
                std = torch.exp(0.5 * log_var) * coeffs.noise_mask
            add_scaled_(mean, noise, std)
        mean_out = out[:, : x.shape[1]]
        x0_hat = x0 if x0 is not None else (lambda: coeffs.x0_hat(x, mean_out))
        return StepOutput(mean, x0_hat)
