"""The forward-process posterior ``q(x_s | x_t, x_0)`` between any two levels (DDPM eq. 6-7).

Shared by the schedule's tables (consecutive steps), DDPM sampling (any strided step) and the
variational bound. For a step from level ``ab_t`` to the less noisy ``ab_s`` (``s`` the next
listed timestep, or the final level) the step's beta is ``beta = 1 - ab_t / ab_s`` (improved DDPM's
respacing) and

``mu = mean_x0 x_0 + mean_x x_t``, ``mean_x0 = sqrt(ab_s) beta / (1 - ab_t)``,
``mean_x = sqrt(ab_t / ab_s) (1 - ab_s) / (1 - ab_t)``, ``beta_tilde = beta (1 - ab_s) / (1 - ab_t)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "POSTERIOR_VARIANCE_FLOOR",
    "PosteriorCoefficients",
    "learned_range_log_variance",
    "posterior_coefficients",
]

#: Clamp used before taking ``log`` of the posterior variance (0 on a step to the clean level).
POSTERIOR_VARIANCE_FLOOR = 1e-20


class PosteriorCoefficients(NamedTuple):
    """Posterior mean weights and variances for steps ``t -> s``; float64 tensors of one shape."""

    mean_x0: Tensor
    mean_x: Tensor
    beta: Tensor
    beta_tilde: Tensor


def posterior_coefficients(alpha_bar: Tensor, alpha_bar_next: Tensor) -> PosteriorCoefficients:
    """DDPM eq. 7 for steps from ``alpha_bar`` to ``alpha_bar_next`` (elementwise, float64)."""
    ab, ab_s = alpha_bar.to(torch.float64), alpha_bar_next.to(torch.float64)
    beta = 1.0 - ab / ab_s
    return PosteriorCoefficients(
        mean_x0=torch.sqrt(ab_s) * beta / (1.0 - ab),
        mean_x=torch.sqrt(ab / ab_s) * (1.0 - ab_s) / (1.0 - ab),
        beta=beta,
        beta_tilde=beta * (1.0 - ab_s) / (1.0 - ab),
    )


def learned_range_log_variance(
    v: Tensor, log_beta: Tensor | float, log_beta_tilde: Tensor | float
) -> Tensor:
    """Improved DDPM eq. 15: ``log Sigma = frac log beta + (1 - frac) log beta_tilde``, ``frac = (v + 1)/2``.

    ``v`` is the model's raw variance output (not clamped, as in improved-diffusion).
    """
    frac = (v + 1.0) * 0.5
    return frac * log_beta + (1.0 - frac) * log_beta_tilde
