"""Prediction types: spec DDPM-2 (conversion round trips) and the v identities of spec 2.2."""

from __future__ import annotations

import itertools

import pytest
import torch

from imgdiff import NoiseSchedule, add_noise, convert_prediction, training_target
from imgdiff.prediction import (
    eps_from_v,
    linear_prediction_coefficients,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)

TYPES = ("epsilon", "sample", "v")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("source", "target"), list(itertools.permutations(TYPES, 2)))
def test_ddpm2_round_trips(source: str, target: str, dtype: torch.dtype, tol: float) -> None:
    """DDPM-2: every conversion round-trips at t in {0, 500, 999} (relative tolerance)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 2, 5, 5, generator=g, dtype=dtype)
    out = torch.randn(3, 2, 5, 5, generator=g, dtype=dtype)
    ab = s.alphas_cumprod[[0, 500, 999]]
    there = convert_prediction(out, x_t, ab, source=source, target=target)  # type: ignore[arg-type]
    back = convert_prediction(there, x_t, ab, source=target, target=source)  # type: ignore[arg-type]
    scale = out.abs().max()
    assert float((back - out).abs().max() / scale) < tol


def test_conversions_agree_with_the_forward_process() -> None:
    """From x_t built with known (x0, eps), each target recovers the truth from the others."""
    s = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998])
    x_t = add_noise(s, x0, eps, t)
    ab = s.alphas_cumprod[t]
    v = training_target(s, x0, eps, t, "v")
    torch.testing.assert_close(x0_from_eps(x_t, eps, ab), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(x0_from_v(x_t, v, ab), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_from_v(x_t, v, ab), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(v_from_x0_eps(x0, eps, ab), v, rtol=0, atol=1e-12)
    assert torch.equal(training_target(s, x0, eps, t, "epsilon"), eps)
    assert torch.equal(training_target(s, x0, eps, t, "sample"), x0)


def test_v_error_identities() -> None:
    """Spec 2.2: |v - v^|^2 = (1 + SNR)|x0 - x0^|^2 = (1 + 1/SNR)|eps - eps^|^2 for the same x_t."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    v, v_hat = (torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([1, 100, 400, 700, 990])
    ab = s.alphas_cumprod[t]
    snr = (ab / (1 - ab)).reshape(-1, 1, 1, 1)
    dv = (v - v_hat).square().sum((1, 2, 3))
    dx0 = (x0_from_v(x_t, v, ab) - x0_from_v(x_t, v_hat, ab)).square()
    deps = (eps_from_v(x_t, v, ab) - eps_from_v(x_t, v_hat, ab)).square()
    torch.testing.assert_close(dv, ((1 + snr) * dx0).sum((1, 2, 3)), rtol=1e-10, atol=0)
    torch.testing.assert_close(dv, ((1 + 1 / snr) * deps).sum((1, 2, 3)), rtol=1e-10, atol=0)


def test_linear_coefficients_match_the_conversions() -> None:
    """The samplers' precomputed coefficients give the same x0/eps as the conversion functions."""
    s = NoiseSchedule.scaled_linear()
    t = torch.tensor([0, 321, 999])
    ab = s.alphas_cumprod[t]
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    for p in TYPES:
        c = linear_prediction_coefficients(p, ab)  # type: ignore[arg-type]
        r = [k.reshape(-1, 1, 1, 1) for k in c]
        x0 = r[0] * x_t + r[1] * out
        eps = r[2] * x_t + r[3] * out
        want_x0 = convert_prediction(out, x_t, ab, source=p, target="sample")  # type: ignore[arg-type]
        want_eps = convert_prediction(out, x_t, ab, source=p, target="epsilon")  # type: ignore[arg-type]
        torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps, want_eps, rtol=1e-12, atol=1e-12)


def test_epsilon_at_zero_snr_raises_but_v_is_finite() -> None:
    """x0 from eps at alpha_bar = 0 raises (no inf); v converts fine there."""
    s = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    ab = s.alphas_cumprod[[999]]
    x_t = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        x0_from_eps(x_t, x_t, ab)
    with pytest.raises(ValueError, match="alpha_bar = 0"):
        linear_prediction_coefficients("epsilon", ab, torch.tensor([999]))
    x0 = x0_from_v(x_t, torch.ones_like(x_t), ab)
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(x0, -torch.ones_like(x_t))  # x0 = alpha x_t - sigma v = -v


def test_alpha_bar_outside_the_unit_interval_is_refused() -> None:
    """alpha_bar is a variance fraction: values below 0, above 1 or NaN are named errors."""
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    for bad in (1.0 + 1e-9, 1.2, -1e-9, float("nan")):
        with pytest.raises(ValueError, match=r"^alpha_bar: expected values in \[0, 1\]"):
            x0_from_v(x, x, bad)
        with pytest.raises(ValueError, match=r"^alpha_bar: expected values in \[0, 1\]"):
            linear_prediction_coefficients("v", torch.tensor([0.5, bad], dtype=torch.float64))
    # the end points themselves are allowed where the conversion is defined
    torch.testing.assert_close(x0_from_v(x + 1, x, 1.0), x + 1, rtol=0, atol=0)
    torch.testing.assert_close(eps_from_v(x + 1, x, 0.0), x + 1, rtol=0, atol=0)


@pytest.mark.parametrize("prediction", TYPES)
def test_linear_coefficients_reconstruct_x_t(prediction: str) -> None:
    """For every type, sqrt(ab) x0_hat + sqrt(1 - ab) eps_hat == x_t whatever the model output
    (the two recovered quantities always explain the sample), and the map out -> (x0, eps) has
    the forward process as its exact inverse."""
    ab = torch.tensor([0.9999, 0.7, 0.3, 0.01], dtype=torch.float64)
    c = linear_prediction_coefficients(prediction, ab)  # type: ignore[arg-type]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    # x_t-coefficient and out-coefficient of sqrt(ab) x0 + sqrt(1-ab) eps must be 1 and 0
    torch.testing.assert_close(a * c.x0_from_x + s * c.eps_from_x, torch.ones_like(ab))
    torch.testing.assert_close(a * c.x0_from_out + s * c.eps_from_out, torch.zeros_like(ab))
    # a model that outputs the training target recovers the truth
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a2, s2 = a[:, None], s[:, None]
    x_t = a2 * x0 + s2 * eps
    out = {"epsilon": eps, "sample": x0, "v": a2 * eps - s2 * x0}[prediction]
    torch.testing.assert_close(c.x0_from_x[:, None] * x_t + c.x0_from_out[:, None] * out, x0)
    torch.testing.assert_close(c.eps_from_x[:, None] * x_t + c.eps_from_out[:, None] * out, eps)


def test_convert_prediction_matches_the_truth_for_every_pair() -> None:
    """With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps and v = sqrt(ab) eps - sqrt(1 - ab) x0, converting
    the true quantity of any type gives the true quantity of any other (no round trip needed)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.95, 0.5, 0.05], dtype=torch.float64)
    a, s = ab.sqrt().reshape(-1, 1, 1), (1 - ab).sqrt().reshape(-1, 1, 1)
    truth = {"epsilon": eps, "sample": x0, "v": a * eps - s * x0}
    x_t = a * x0 + s * eps
    for source, target in itertools.product(TYPES, TYPES):
        got = convert_prediction(truth[source], x_t, ab, source=source, target=target)  # type: ignore[arg-type]
        torch.testing.assert_close(got, truth[target], rtol=1e-12, atol=1e-12)
