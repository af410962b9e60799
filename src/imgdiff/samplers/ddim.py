"""DDIM (Song, Meng & Ermon 2021) with eta, thresholding, and deterministic inversion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_float, check_tensor
from imgdiff._ops import Scalar
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model
from imgdiff.samplers.denoising import DenoiserCoefficients, DenoisingSampler, fused_coefficients
from imgdiff.samplers.step import Callback, StepOutput
from imgdiff.timesteps import SamplingPlan

__all__ = ["DDIM", "DDIMCoefficients"]


@dataclass(frozen=True, eq=False)
class DDIMCoefficients(DenoiserCoefficients):
    """Per-step coefficients of the DDIM step ``t -> s`` (DDIM eq. 12).

    ``x_s = sqrt_alpha_bar_next x0_hat + direction eps_hat + sigma z`` where
    ``sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s)`` (eq. 16) and
    ``direction = sqrt(1 - ab_s - sigma^2)``; ``x_coef``/``out_coef`` write the same step as
    one combination of ``(x, out)`` (see :meth:`DenoisingSampler.combine`).
    """

    sqrt_alpha_bar: Scalar
    sqrt_alpha_bar_next: Scalar
    direction: Scalar
    sigma: Scalar
    x_coef: Scalar
    out_coef: Scalar


@dataclass(frozen=True, kw_only=True)
class DDIM(DenoisingSampler[DDIMCoefficients]):
    """DDIM sampling (Song et al. 2021, eq. 12) and DDIM inversion.

    Args (besides :class:`~imgdiff.samplers.DenoisingSampler`'s, all keyword-only):
        eta: in ``[0, 1]``. 0 is deterministic (the probability-flow discretisation); 1 with
            consecutive steps is DDPM with the fixed-small variance.
        rederive_eps: after thresholding, recompute ``eps_hat`` from the thresholded
            ``x0_hat`` (diffusers ``use_clipped_model_output``; guided-diffusion always does).

    The previous timestep of a step is the next entry of the timestep list (not ``t - T//N``).

    Example:
        >>> import torch, imgdiff
        >>> schedule = imgdiff.NoiseSchedule.linear()
        >>> model = lambda x, t: torch.zeros_like(x)  # any eps-prediction model
        >>> x = imgdiff.DDIM(schedule).sample(model, torch.randn(2, 3, 8, 8), num_steps=10,
        ...                                   progress=False)
        >>> x.shape
        torch.Size([2, 3, 8, 8])
    """

    eta: float = 0.0
    rederive_eps: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("eta", self.eta, min=0.0, max=1.0)
        if not isinstance(self.rederive_eps, bool):
            raise InputTypeError(f"rederive_eps: expected a bool, got {self.rederive_eps!r}")

    def coefficients(self, plan: SamplingPlan) -> DDIMCoefficients:
        pred = self.prediction_fields(plan)
        ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
        if self.eta > 0:
            # eta <= 1 keeps 1 - ab_s - sigma^2 = (1 - ab_s)(1 - eta^2 (1 - ab_t/ab_s)/(1 - ab_t)) >= 0
            sigma = self.eta * torch.sqrt(
                ((1.0 - ab_s) / (1.0 - ab) * (1.0 - ab / ab_s)).clamp(min=0.0)
            )
        else:
            sigma = torch.zeros_like(ab)
        direction = torch.sqrt((1.0 - ab_s - sigma**2).clamp(min=0.0))  # clamp: rounding only
        sqrt_ab_s = torch.sqrt(ab_s)
        return DDIMCoefficients(
            **pred,
            sqrt_alpha_bar=torch.sqrt(ab),
            sqrt_alpha_bar_next=sqrt_ab_s,
            direction=direction,
            sigma=sigma,
            **fused_coefficients(pred, x0_weight=sqrt_ab_s, eps_weight=direction),
        )

    def needs_noise(self, coeffs: DDIMCoefficients) -> bool:
        return self.eta > 0 and (isinstance(coeffs.sigma, Tensor) or coeffs.sigma != 0.0)

    def update(
        self, x: Tensor, out: Tensor, coeffs: DDIMCoefficients, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        c = coeffs

        def rederived(x0: Tensor) -> Tensor:
            return (x - x0 * c.sqrt_alpha_bar) / c.sqrt_one_minus_alpha_bar

        x_next, x0 = self.combine(
            x,
            out,
            c,
            x_coef=c.x_coef,
            out_coef=c.out_coef,
            x0_weight=c.sqrt_alpha_bar_next,
            eps_weight=c.direction,
            eps_from_x0=rederived if self.rederive_eps and self.thresholding is not None else None,
            noise=noise,
            noise_weight=c.sigma,
        )
        return StepOutput(x_next, x0)

    # ------------------------------------------------------------------ inversion

    def invert(
        self,
        model: Model,
        x0: Tensor,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> Tensor:
        """DDIM inversion: encode a clean sample ``x0`` ``(B, ...)`` into the plan's starting noise.

        Runs the generation plan of the same arguments backwards (diffusers'
        ``DDIMInverseScheduler`` convention): step ``k`` goes from the level of the previous
        timestep (the final level for the first step) to timestep ``u_k``, evaluating the model
        at the current sample and the *target* timestep ``u_k``. ``sample`` with the same
        arguments reconstructs ``x0``: exactly (to rounding) for an ``epsilon`` model whose output
        does not depend on ``x``, otherwise with an error of first order in the step size (for
        ``v``/``sample`` models ``eps_hat`` is recovered at the current level, so it depends
        on ``x``).

        Requires ``eta == 0`` and no thresholding (both break invertibility). Returns the
        inverted sample in the state dtype.
        """
        if self.eta != 0:
            raise InputValueError(
                f"eta: invert() inverts the deterministic step, expected eta == 0, got {self.eta}; "
                "invert with DDIM(schedule, eta=0.0) and sample with any eta"
            )
        if self.thresholding is not None:
            raise InputValueError(
                f"thresholding: expected None for invert(), got {self.thresholding!r}; "
                "clipping x0_hat makes a step non-invertible"
            )
        if self.prediction == "sample" and self.final_alpha_bar == "one":
            raise InputValueError(
                "final_alpha_bar: inversion starts from the final level, where alpha_bar = 1 and "
                "an x0-prediction model gives no eps; expected final_alpha_bar='first' for "
                "prediction='sample', got 'one'"
            )
        check_tensor("x0", x0, floating=True, min_ndim=2)
        ts = self.timesteps(num_steps, timesteps=timesteps, strength=strength)
        plan = SamplingPlan.inversion(self.schedule, ts, self.final_alpha_bar)
        return self.run(
            model,
            x0,
            plan,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc="DDIM inversion",
        )
