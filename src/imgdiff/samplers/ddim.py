"""DDIM (Song, Meng & Ermon 2021) with eta, thresholding, and deterministic inversion."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_float, check_tensor
from imgdiff._ops import Scalar, add_scaled_, fusable, lincomb
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model
from imgdiff.samplers.base import Callback, StepOutput
from imgdiff.samplers.denoising import DenoiserCoefficients, DenoisingSampler
from imgdiff.timesteps import FINAL_ALPHA_BARS, FinalAlphaBar, SamplingPlan

__all__ = ["DDIM", "DDIMCoefficients"]


@dataclass(frozen=True)
class DDIMCoefficients(DenoiserCoefficients):
    """Per-step coefficients of the DDIM step ``t -> s`` (DDIM eq. 12).

    ``x_s = sqrt_alpha_bar_next x0_hat + direction eps_hat + sigma z`` where
    ``sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s)`` (eq. 16) and
    ``direction = sqrt(1 - ab_s - sigma^2)``. Without thresholding the step is the single
    combination ``x_s = x_coef x + out_coef out + sigma z``, used when both coefficients are
    moderate (:data:`imgdiff._ops.FUSE_LIMIT`); otherwise ``x0_hat`` is formed first.
    """

    sqrt_alpha_bar: Scalar
    sqrt_one_minus_alpha_bar: Scalar
    sqrt_alpha_bar_next: Scalar
    direction: Scalar
    sigma: Scalar
    x_coef: Scalar
    out_coef: Scalar


@dataclass(frozen=True)
class DDIM(DenoisingSampler[DDIMCoefficients]):
    """DDIM sampling (Song et al. 2021, eq. 12) and DDIM inversion.

    Args (besides :class:`~imgdiff.samplers.DenoisingSampler`'s):
        eta: 0 is deterministic (the probability-flow discretisation); 1 with consecutive steps
            is DDPM with the fixed-small variance.
        final_alpha_bar: the level after the last step, ``"one"`` (clean; diffusers
            ``set_alpha_to_one=True``) or ``"first"`` (``alpha_bar_0``; Stable Diffusion's
            ``set_alpha_to_one=False``).
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
    final_alpha_bar: FinalAlphaBar = "one"
    rederive_eps: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("eta", self.eta, min=0.0)
        check_choice("final_alpha_bar", self.final_alpha_bar, FINAL_ALPHA_BARS)
        if not isinstance(self.rederive_eps, bool):
            raise InputTypeError(f"rederive_eps: expected a bool, got {self.rederive_eps!r}")

    def coefficients(self, plan: SamplingPlan) -> DDIMCoefficients:
        pred = self.prediction_fields(plan)
        ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
        if self.eta > 0:
            var = (1.0 - ab_s) / (1.0 - ab) * (1.0 - ab / ab_s)
            sigma = self.eta * torch.sqrt(var.clamp(min=0.0))
        else:
            sigma = torch.zeros_like(ab)
        direction = torch.sqrt((1.0 - ab_s - sigma**2).clamp(min=0.0))
        sqrt_ab_s = torch.sqrt(ab_s)
        return DDIMCoefficients(
            **pred,
            sqrt_alpha_bar=torch.sqrt(ab),
            sqrt_one_minus_alpha_bar=torch.sqrt(1.0 - ab),
            sqrt_alpha_bar_next=sqrt_ab_s,
            direction=direction,
            sigma=sigma,
            x_coef=sqrt_ab_s * pred["x0_from_x"] + direction * pred["eps_from_x"],
            out_coef=sqrt_ab_s * pred["x0_from_out"] + direction * pred["eps_from_out"],
        )

    def needs_noise(self, coeffs: DDIMCoefficients) -> bool:
        return self.eta > 0 and (isinstance(coeffs.sigma, Tensor) or coeffs.sigma != 0.0)

    def update(
        self, x: Tensor, out: Tensor, coeffs: DDIMCoefficients, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        c = coeffs
        if self.thresholding is None and fusable(c.x_coef, c.out_coef):
            x_next = lincomb(x, c.x_coef, out, c.out_coef)
            x0: Tensor | Callable[[], Tensor] = lambda: c.x0_hat(x, out)  # noqa: E731 - lazy
        else:
            x0 = self.x0_hat(x, out, c)
            if self.rederive_eps:
                eps = (x - x0 * c.sqrt_alpha_bar) / c.sqrt_one_minus_alpha_bar
            else:
                eps = c.eps_hat(x, out)
            x_next = lincomb(x0, c.sqrt_alpha_bar_next, eps, c.direction)
        if noise is not None:
            add_scaled_(x_next, noise, c.sigma)
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
        arguments reconstructs ``x0``: exactly when the model output does not depend on ``x``,
        otherwise with an error of first order in the step size.

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
        check_tensor("x0", x0, floating=True, min_ndim=2)
        ts = self.timesteps(num_steps, timesteps=timesteps, strength=strength)
        plan = SamplingPlan.inversion(self.schedule, ts, self.final_alpha_bar)
        return self.run(
            model,
            x0,
            plan,
            self.coefficients(plan),
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc="DDIM inversion",
        )
