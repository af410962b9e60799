"""The exact denoisers compute in float64 whatever the sample's dtype."""

from __future__ import annotations

import pytest
import torch

import imgdiff
from imgdiff import EmpiricalDenoiser, GaussianDenoiser, NoiseSchedule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_oracles_round_the_float64_answer_once(dtype: torch.dtype, prediction: str) -> None:
    """In half precision the oracles return the float64 answer rounded to the sample's dtype
    (they cast alpha_bar first, so alpha_bar_0 = 0.9999 became 1: an error or non-finite)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g).to(dtype)
    t = torch.tensor([0, 1, 999])
    data = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    for oracle in (
        GaussianDenoiser(s, prediction=prediction),  # type: ignore[arg-type]
        EmpiricalDenoiser(s, data, prediction=prediction),  # type: ignore[arg-type]
    ):
        out = oracle(x, t)
        assert out.dtype == dtype
        want = oracle(x.double(), t)
        torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=0)


def _tweedie_eps(log_density, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """eps* = -sqrt(1 - ab) grad_x log p_t(x) (Tweedie), by autograd of an explicit density."""
    xg = x.detach().clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_density(xg).sum(), xg)
    return -(1 - ab).sqrt().reshape(-1, *([1] * (x.ndim - 1))) * score


@pytest.mark.parametrize(("mean", "std"), [(0.5, 0.3), (-1.0, 2.0)])
def test_gaussian_oracle_is_tweedies_formula(mean: float, std: float) -> None:
    """The exact eps for N(mean, std^2) data is -sqrt(1 - ab) times the score of the marginal
    x_t ~ N(sqrt(ab) mean, ab std^2 + 1 - ab), differentiated by autograd (an independent route)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2
    t = torch.tensor([0, 250, 600, 999])
    ab = s.alphas_cumprod[t]

    def log_p(z: torch.Tensor) -> torch.Tensor:
        a = ab.sqrt().reshape(-1, 1, 1, 1)
        var = (ab * std**2 + 1 - ab).reshape(-1, 1, 1, 1)
        return torch.distributions.Normal(a * mean, var.sqrt()).log_prob(z)

    want = _tweedie_eps(log_p, x, ab)
    got = GaussianDenoiser(s, mean=mean, std=std)(x, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("std", [0.0, 0.4])
def test_empirical_oracle_is_tweedies_formula(std: float) -> None:
    """The exact eps for a mixture of N(d_k, std^2 I) is -sqrt(1 - ab) times the score of
    p_t(x) = mean_k N(x; sqrt(ab) d_k, (ab std^2 + 1 - ab) I), by autograd of logsumexp."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(2)
    data = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([50, 200, 400, 700])
    ab = s.alphas_cumprod[t]
    # samples near the data at each level, so the posterior weights are far from uniform
    pick = torch.tensor([0, 1, 2, 0])
    a4 = ab.sqrt().reshape(-1, 1, 1, 1)
    x = a4 * data[pick] + (1 - ab).sqrt().reshape(-1, 1, 1, 1) * 0.5 * torch.randn(
        4, 1, 2, 2, generator=g, dtype=torch.float64
    )

    def log_p(z: torch.Tensor) -> torch.Tensor:
        var = (ab * std**2 + 1 - ab).reshape(-1, 1)
        flat = z.reshape(4, 1, -1)
        centres = ab.sqrt().reshape(-1, 1, 1) * data.reshape(1, 3, -1)  # (B, K, D)
        lp = torch.distributions.Normal(centres, var.sqrt().unsqueeze(-1)).log_prob(flat).sum(-1)
        return torch.logsumexp(lp, dim=1)

    want = _tweedie_eps(log_p, x, ab)
    for prediction in ("epsilon", "sample", "v"):
        got = EmpiricalDenoiser(s, data, prediction=prediction, std=std)(x, t)  # type: ignore[arg-type]
        expected = imgdiff.convert_prediction(
            want,
            x,
            ab,
            source="epsilon",
            target=prediction,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_empirical_oracle_with_one_item_is_the_gaussian_oracle() -> None:
    """One data item d (constant c) blurred by std is N(c, std^2) per element."""
    s = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 400, 999])
    data = torch.full((1, 2, 3, 3), 0.25, dtype=torch.float64)
    for prediction in ("epsilon", "sample", "v"):
        a = EmpiricalDenoiser(s, data, prediction=prediction, std=0.7)(x, t)  # type: ignore[arg-type]
        b = GaussianDenoiser(s, mean=0.25, std=0.7, prediction=prediction)(x, t)  # type: ignore[arg-type]
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
