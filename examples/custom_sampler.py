"""Writing your own sampler on imgdiff's contract: two small samplers and a check of their math.

* :class:`EulerVE` overrides only ``coefficients`` and ``update``: Euler steps of the
  probability-flow ODE in the variance-exploding variable ``x~ = x / sqrt(alpha_bar)``,
  ``x~_s = x~_t + (sigma_s - sigma_t) eps_hat`` (Karras et al. 2022, Sec. 3). It is known to equal
  DDIM with eta = 0, and the script checks that it does.
* :class:`HeunVE` overrides ``step`` to call the model twice per step: Heun's second-order
  method (EDM Algorithm 1, deterministic, on the discrete timestep list).

For Gaussian data ``N(m, s^2)`` the probability-flow ODE is solved exactly by
``x0 = m + s (x~_T - m) / sqrt(s^2 + sigma_T^2)``, so the script reports each sampler's error
against the exact answer: Euler's error halves when the steps double; Heun's falls about three
times (its last step, to the clean level, is an Euler step as in EDM, which caps its order).

Run: ``python examples/custom_sampler.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor

import imgdiff
from imgdiff.samplers import (
    BoundModel,
    DenoiserCoefficients,
    DenoisingSampler,
    Scalar,
    StepContext,
    StepOutput,
)
from imgdiff.timesteps import SamplingPlan


@dataclass(frozen=True)
class VECoefficients(DenoiserCoefficients):
    """Per step: the scales of x at t and s, and the VE noise levels."""

    sqrt_alpha_bar: Scalar
    sqrt_alpha_bar_next: Scalar
    sigma: Scalar
    sigma_next: Scalar


@dataclass(frozen=True, kw_only=True)
class EulerVE(DenoisingSampler[VECoefficients]):
    """Euler steps of the probability-flow ODE in the VE variable (equals DDIM with eta = 0)."""

    def coefficients(self, plan: SamplingPlan) -> VECoefficients:
        ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
        return VECoefficients(
            **self.prediction_fields(plan),  # x0_hat / eps_hat from the model output
            sqrt_alpha_bar=ab.sqrt(),
            sqrt_alpha_bar_next=ab_s.sqrt(),
            sigma=((1 - ab) / ab).sqrt(),
            sigma_next=((1 - ab_s) / ab_s).sqrt(),
        )

    def update(
        self, x: Tensor, out: Tensor, coeffs: VECoefficients, noise: Tensor | None
    ) -> StepOutput[Tensor]:
        c = coeffs
        x0 = self.x0_hat(x, out, c)  # thresholded where the sampler has thresholding
        x_ve = x / c.sqrt_alpha_bar  # = x0 + sigma eps
        eps = (x_ve - x0) / c.sigma  # the eps that goes with that x0
        return StepOutput((x_ve + (c.sigma_next - c.sigma) * eps) * c.sqrt_alpha_bar_next, x0)


@dataclass(frozen=True, kw_only=True)
class HeunVE(EulerVE):
    """Heun's method (EDM Algorithm 1 without churn): an Euler step, then a trapezoidal correction.

    The correction evaluates the model at the next listed timestep; the step to the final (clean)
    level stays an Euler step, as in EDM. Overriding ``step`` replaces the base's, which is where
    guidance is applied, and this step forms raw ``eps_hat``: so it refuses both options.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("guidance", "thresholding"):
            if getattr(self, name) is not None:
                raise imgdiff.InputValueError(
                    f"{name}: expected None (HeunVE's own step applies no {name}), "
                    f"got {getattr(self, name)!r}"
                )

    def step(
        self,
        model: BoundModel,
        state: Tensor,
        coeffs: VECoefficients,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[Tensor]:
        c, x = coeffs, state
        out = model(x, ctx.t)
        eps = c.eps_hat(x, out)
        d_sigma = c.sigma_next - c.sigma
        x_next = (x / c.sqrt_alpha_bar + d_sigma * eps) * c.sqrt_alpha_bar_next
        if ctx.next_timestep < 0:  # a Python int: no device read
            return StepOutput(x_next, lambda: c.raw_x0_hat(x, out))
        # Correct with eps at the Euler estimate, from the model at the next listed timestep.
        out_next = model(x_next, ctx.t_next)
        a = c.sqrt_alpha_bar_next
        eps_next = self._eps_at(x_next, out_next, a, (1 - a**2) ** 0.5)
        x_ve = x / c.sqrt_alpha_bar + d_sigma * 0.5 * (eps + eps_next)
        return StepOutput(x_ve * c.sqrt_alpha_bar_next, lambda: c.raw_x0_hat(x, out))

    def _eps_at(self, x: Tensor, out: Tensor, a: Scalar, s: Scalar) -> Tensor:
        """eps from a model output at the level with sqrt(alpha_bar) = a, sqrt(1 - alpha_bar) = s."""
        if self.prediction == "epsilon":
            return out
        if self.prediction == "sample":
            return (x - a * out) / s
        return s * x + a * out


def exact_gaussian_flow(
    schedule: imgdiff.NoiseSchedule, x_T: Tensor, t_start: int, m: float, s: float
) -> Tensor:
    """The exact probability-flow map from x at timestep ``t_start`` to x0 for data N(m, s^2)."""
    ab = float(schedule.alphas_cumprod[t_start])
    sigma2 = (1 - ab) / ab
    x_ve = x_T / ab**0.5
    return m + s * (x_ve - m) / (s**2 + sigma2) ** 0.5


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    schedule = imgdiff.NoiseSchedule.linear()
    m, s = 0.5, 0.3
    model = imgdiff.GaussianDenoiser(schedule, mean=m, std=s)
    x_T = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    # EulerVE is DDIM(eta=0) written in another variable.
    euler = EulerVE(schedule, spacing="trailing")
    ddim = imgdiff.DDIM(schedule, spacing="trailing")
    a = euler.sample(model, x_T, num_steps=50, progress=False)
    b = ddim.sample(model, x_T, num_steps=50, progress=False)
    print(f"EulerVE vs DDIM(eta=0), 50 steps: max abs difference {float((a - b).abs().max()):.1e}")

    heun = HeunVE(schedule, spacing="trailing")
    exact = exact_gaussian_flow(schedule, x_T, 999, m, s)
    print("steps | model calls Euler | error Euler | model calls Heun | error Heun")
    for n in (10, 20, 40, 80):
        euler_model, heun_model = CountingModel(model), CountingModel(model)
        e = euler.sample(euler_model, x_T, num_steps=n, progress=False)
        h = heun.sample(heun_model, x_T, num_steps=n, progress=False)
        err_e = float((e - exact).abs().max())
        err_h = float((h - exact).abs().max())
        print(
            f"{n:5d} | {euler_model.calls:17d} | {err_e:11.2e} | {heun_model.calls:16d} | {err_h:10.2e}"
        )


class CountingModel:
    """Wraps a model and counts its calls."""

    def __init__(self, model: imgdiff.Model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x, t)


if __name__ == "__main__":
    main()
