"""DDPM: spec tests DDPM-1, 3..9 (DDPM-2 is in test_prediction.py) and the per-sample noise mask."""

from __future__ import annotations

import math

import pytest
import torch

import imgdiff
from imgdiff import (
    DDPM,
    GaussianDenoiser,
    NoiseSchedule,
    add_noise,
    convert_prediction,
    training_target,
)
from imgdiff.losses import denoising_loss, hybrid_loss, vlb_term
from imgdiff.timesteps import SamplingPlan

from .conftest import TanhModel, backends_here, device_for


def test_ddpm1_forward_marginal() -> None:
    """DDPM-1: q_sample of a constant has mean sqrt(ab) c (4 s.e.) and variance 1 - ab (2 %)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    c = 0.7
    x0 = torch.full((20000, 1, 4, 4), c, dtype=torch.float64)
    for t in (0, 250, 999):
        x_t = add_noise(s, x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
        ab = float(s.alphas_cumprod[t])
        se = math.sqrt((1 - ab) / x_t.numel())
        assert abs(float(x_t.mean()) - math.sqrt(ab) * c) < 4 * se
        assert abs(float(x_t.var()) / (1 - ab) - 1) < 0.02


@pytest.mark.parametrize(("spacing", "n"), [("leading", 1000), ("leading", 50), ("trailing", 37)])
def test_ddpm3_posterior_identities_per_step(spacing: str, n: int) -> None:
    """DDPM-3 on the sampler's coefficients: c1 + c2 sqrt(ab_t) = sqrt(ab_s); c2^2 (1-ab_t) + var = 1 - ab_s."""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, spacing=spacing)  # type: ignore[arg-type]
    plan = sampler.plan(n)
    c = sampler.coefficients(plan)
    ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
    torch.testing.assert_close(c.mean_x0 + c.mean_x * ab.sqrt(), ab_s.sqrt(), rtol=0, atol=1e-12)
    var = torch.exp(c.log_beta_tilde)  # type: ignore[arg-type]
    var = torch.where(plan.next_timesteps >= 0, var, torch.zeros_like(var))  # floor at the end
    torch.testing.assert_close(c.mean_x**2 * (1 - ab) + var, 1 - ab_s, rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm4_gaussian_oracle(variance: str) -> None:
    """DDPM-4: 1000 ancestral steps with the exact denoiser of N(0.5, 0.3^2) reproduce it."""
    s = NoiseSchedule.linear()
    model = GaussianDenoiser(s, mean=0.5, std=0.3)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, 1, 10, 10, generator=g, dtype=torch.float64)
    x = DDPM(s, variance=variance).sample(model, noise, generator=g, progress=False)  # type: ignore[arg-type]
    assert abs(float(x.mean()) - 0.5) < 0.01
    assert abs(float(x.std()) / 0.3 - 1) < 0.03


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_ddpm5_point_mass_returns_the_point_exactly(prediction: str) -> None:
    """DDPM-5: with the exact denoiser of a point mass, fixed-small DDPM returns x0* (1e-8)."""
    s = NoiseSchedule.linear()
    x_star = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return convert_prediction(eps, x, s.alphas_cumprod[t], source="epsilon", target=prediction)  # type: ignore[arg-type]

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    out = DDPM(s, prediction=prediction).sample(model, noise, generator=g, progress=False)  # type: ignore[arg-type]
    assert float((out - x_star).abs().max()) < 1e-8


def test_ddpm6_oracle_loss_and_v_weighting() -> None:
    """DDPM-6: an oracle that knows x0 has loss 0 for every target; v-loss = (1 + 1/SNR) eps-loss.

    The oracle recovers the noise from x_t alone (eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)) and
    expresses it as each prediction type, so the zero loss checks add_noise, training_target and
    the conversions against each other.
    """
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = add_noise(s, x0, eps, t)
    ab = s.alphas_cumprod[t]
    a, sg = ab.sqrt().reshape(-1, 1, 1, 1), (1 - ab).sqrt().reshape(-1, 1, 1, 1)
    eps_oracle = (x_t - a * x0) / sg
    for prediction in ("epsilon", "sample", "v"):
        oracle = convert_prediction(eps_oracle, x_t, ab, source="epsilon", target=prediction)  # type: ignore[arg-type]
        loss = denoising_loss(oracle, training_target(s, x0, eps, t, prediction))  # type: ignore[arg-type]
        assert float(loss.max()) < 1e-20, prediction
    v_hat = convert_prediction(eps_hat, x_t, ab, source="epsilon", target="v")
    loss_eps = denoising_loss(eps_hat, eps)
    loss_v = denoising_loss(v_hat, training_target(s, x0, eps, t, "v"))
    torch.testing.assert_close(loss_v, (1 + (1 - ab) / ab) * loss_eps, rtol=1e-10, atol=0)
    l1 = denoising_loss(eps_hat, eps, norm="l1")
    torch.testing.assert_close(l1, (eps_hat - eps).abs().mean((1, 2, 3)))


def test_ddpm7_learned_range_endpoints() -> None:
    """DDPM-7: v_raw = -1 gives log beta_tilde (clipped), v_raw = +1 gives log beta (1e-12).

    The sampler floors beta_tilde_0 = 0 at 1e-20 as diffusers does (only the noise-free last
    step reads it); the variational bound uses improved DDPM's beta_tilde_1 there (tested below).
    """
    s = NoiseSchedule.linear()
    sampler = DDPM(s, variance="learned_range")
    t = torch.tensor([0, 1, 500, 999])
    plan = SamplingPlan(t, t - 1, s.alphas_cumprod[t], s.alphas_cumprod_prev[t])
    c = sampler.coefficients(plan).per_sample(4, torch.float64)
    x = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    floored = torch.log(s.posterior_variance.clamp(min=1e-20))
    for v_raw, want in ((-1.0, floored[t]), (1.0, torch.log(s.betas[t]))):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v_raw)], dim=1)
        _, log_var, _ = sampler.posterior(x, out, c)
        assert isinstance(log_var, torch.Tensor)
        torch.testing.assert_close(log_var[:, 0, 0, 0], want, rtol=0, atol=1e-12)
    # "learned" reads the extra channels as log-variance directly.
    learned = DDPM(s, variance="learned")
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, -3.25)], dim=1)
    _, log_var, _ = learned.posterior(x, out, c)
    assert torch.equal(log_var, torch.full_like(x, -3.25))  # type: ignore[arg-type]


def test_ddpm8_vlb_trains_only_the_variance() -> None:
    """DDPM-8: the gradient of the VLB term w.r.t. the mean half of the output is exactly zero."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    x_t = add_noise(s, x0, eps, t)
    out = torch.randn(4, 6, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    vlb = vlb_term(s, out, x0, x_t, t)
    assert torch.isfinite(vlb).all()
    assert bool((vlb > 0).all())
    (grad,) = torch.autograd.grad(vlb.sum(), out)
    assert torch.equal(grad[:, :3], torch.zeros_like(grad[:, :3]))
    assert float(grad[:, 3:].abs().sum()) > 0
    # In the hybrid loss the mean half is trained by L_simple alone.
    (g_hybrid,) = torch.autograd.grad(hybrid_loss(s, out, x0, x_t, eps, t).sum(), out)
    (g_simple,) = torch.autograd.grad(denoising_loss(out[:, :3], eps).sum(), out)
    torch.testing.assert_close(g_hybrid[:, :3], g_simple[:, :3], rtol=0, atol=0)


@pytest.mark.parametrize("v_raw", [-1.0, 0.0, 1.0])
def test_vlb_decoder_term_at_t0(v_raw: float) -> None:
    """At t = 0 the VLB is the discretised-Gaussian NLL of x0, with improved DDPM's variance.

    The decoder's log-variance is frac log beta_0 + (1 - frac) log beta_tilde_1 (beta_tilde_0 = 0
    is replaced, not floored); the bin probability is computed here with the exact Gaussian CDF
    (erf), an independent check of the tanh approximation and of the variance convention.
    """
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1).clamp(-0.99, 0.99)
    t = torch.zeros(2, dtype=torch.int64)
    x_t = add_noise(s, x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    out = torch.cat([x0, torch.full_like(x0, v_raw)], dim=1)  # exact x0, chosen variance
    nll_bits = vlb_term(s, out, x0, x_t, t, prediction="sample")
    frac = (v_raw + 1) / 2
    log_var = frac * math.log(float(s.betas[0])) + (1 - frac) * math.log(
        float(s.posterior_variance[1])
    )
    std = math.exp(0.5 * log_var)
    mean = float(s.posterior_mean_coef1[0]) * x0 + float(s.posterior_mean_coef2[0]) * x_t
    normal = torch.distributions.Normal(mean, std)
    p_bin = normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)
    want = (-torch.log(p_bin)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(nll_bits, want, rtol=2e-3, atol=0)
    assert (
        0.5 < float(want.mean()) < 3.0
    )  # a useful number of bits, not the 1e-20 floor's ~0 or ~40


def test_vlb_is_zero_for_the_true_posterior() -> None:
    """With the exact x0 and v_raw = -1 (variance beta_tilde), the KL term vanishes for t > 0."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 500, 999])
    x_t = add_noise(s, x0, eps, t)
    out = torch.cat([x0, -torch.ones_like(x0)], dim=1)
    vlb = vlb_term(s, out, x0, x_t, t, prediction="sample")
    assert float(vlb.abs().max()) < 1e-10


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm9_strided_with_all_steps_is_the_full_sampler(variance: str) -> None:
    """DDPM-9: every way of asking for all T steps gives the same run, equal to a textbook loop.

    The textbook loop uses the schedule's own posterior tables (DDPM eq. 6-7); the sampler's
    strided form recomputes beta = 1 - ab_t/ab_{t-1}, which agrees to float64 rounding.
    """
    T = 100
    s = NoiseSchedule.linear(T, 1e-3, 0.1)
    model = TanhModel((2, 3, 3), scale=0.5)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(T, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    sampler = DDPM(s, variance=variance)  # type: ignore[arg-type]
    a = sampler.sample(model, noise, step_noise=z, progress=False)
    b = sampler.sample(
        model, noise, timesteps=list(range(T - 1, -1, -1)), step_noise=z, progress=False
    )
    c = DDPM(s, variance=variance, spacing="linspace").sample(
        model, noise, num_steps=T, step_noise=z, progress=False
    )  # type: ignore[arg-type]
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    # Textbook DDPM (Algorithm 2) with the schedule's tables.
    x = noise.clone()
    ab, var = s.alphas_cumprod, (s.posterior_variance if variance == "fixed_small" else s.betas)
    for i, t in enumerate(range(T - 1, -1, -1)):
        eps = model(x, torch.full((2,), t))
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
        x = mean + (var[t].sqrt() * z[i] if t > 0 else 0)
    torch.testing.assert_close(a, x, rtol=1e-10, atol=1e-10)


def test_noise_mask_is_per_sample() -> None:
    """A batch with t = (5, 0, 3): only the sample whose step reaches the clean level gets no noise."""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, variance="fixed_large")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 0, 3])
    noisy = sampler.step_at(out, x, t, t - 1, noise=z).state
    clean = sampler.step_at(out, x, t, t - 1, noise=torch.zeros_like(z)).state
    assert torch.equal(noisy[1], clean[1])
    assert not torch.allclose(noisy[0], clean[0])
    assert not torch.allclose(noisy[2], clean[2])
    # Each sample's step in the batch equals the same step taken for that sample alone.
    for b in range(3):
        tb = int(t[b])
        alone = sampler.step_at(out[b : b + 1], x[b : b + 1], tb, tb - 1, noise=z[b : b + 1]).state
        torch.testing.assert_close(alone, noisy[b : b + 1], rtol=0, atol=0)


def test_learned_range_sampling_uses_the_predicted_variance() -> None:
    """A learned-range model with v_raw = -1 samples like fixed-small with the same noise."""
    s = NoiseSchedule.linear(200)
    mean_model = TanhModel((2, 3, 3), scale=0.3)

    def learned(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([mean_model(x, t), -torch.ones_like(x)], dim=1)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(20, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    a = DDPM(s, variance="learned_range").sample(
        learned, noise, num_steps=20, step_noise=z, progress=False
    )
    b = DDPM(s).sample(mean_model, noise, num_steps=20, step_noise=z, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends_here())
def test_a_subclass_posterior_is_used_by_the_update(backend: str) -> None:
    """The fused paths must not bypass an overridden ``posterior``, on noisy steps too, and the
    noise is not added in place into what an override returns (here the user's sample)."""
    from imgdiff.samplers.ddpm import DDPMCoefficients

    class Shifted(imgdiff.DDPM):
        def posterior(self, x, out, coeffs: DDPMCoefficients):  # type: ignore[no-untyped-def]
            mean, log_var, x0 = super().posterior(x, out, coeffs)
            return mean + 1.0, log_var, x0

    class Identity(imgdiff.DDPM):
        def posterior(self, x, out, coeffs: DDPMCoefficients):  # type: ignore[no-untyped-def]
            _, log_var, x0 = super().posterior(x, out, coeffs)
            return x, log_var, x0

    schedule = imgdiff.NoiseSchedule.linear()
    device = device_for(backend)
    # float32: the fused paths' dtype; 2**18 elements (1 MiB): recycled buffers in the loop
    x = torch.randn(2, 2, 256, 256, generator=torch.Generator().manual_seed(3)).to(device)
    z = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # independent of x
        return c.clone()

    kw = {"num_steps": 3, "progress": False}
    plain = imgdiff.DDPM(schedule, backend="torch")
    shifted = Shifted(schedule, backend=backend).sample(model, x, step_noise=z, **kw)  # type: ignore[arg-type]
    want = plain.sample(model, x, step_noise=z, **kw)
    # each step adds 1 to its mean; later steps carry it on through their x coefficient
    assert not torch.allclose(shifted, want)
    x_coef = plain.coefficients(plain.plan(3)).x_coef  # a shift d of x moves the mean x_coef d
    shift = float(x_coef[2] * (x_coef[1] + 1.0) + 1.0)
    torch.testing.assert_close(shifted, want + shift, rtol=1e-5, atol=1e-4)
    before = x.clone()
    Identity(schedule, backend=backend).sample(model, x, step_noise=z, **kw)  # type: ignore[arg-type]
    assert torch.equal(x, before)


def test_learned_range_final_step_to_the_first_level_is_finite() -> None:
    """With final_alpha_bar="first" the step from t=0 does not move (beta = 0): a variance
    output below -1 extrapolates log beta, which must stay finite there (it was -inf, so NaN)."""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, variance="learned_range", final_alpha_bar="first")
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, -3.0)], dim=1)
    for t in (0, torch.tensor([5, 0])):
        step = sampler.step_at(out, x, t, -1 if isinstance(t, int) else torch.tensor([4, -1]))
        assert bool(step.state.isfinite().all())

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), torch.full_like(x, -3.0)], dim=1)

    y = sampler.sample(
        model, x, timesteps=[20, 10, 0], generator=torch.Generator().manual_seed(0), progress=False
    )
    assert bool(y.isfinite().all())


def test_normal_kl_matches_torch_distributions() -> None:
    """normal_kl against torch.distributions for different means and variances (and a float
    logvar2), so the mean term's 1/var2, the variance ratio and the factor 1/2 are all pinned."""
    from torch.distributions import Normal, kl_divergence

    from imgdiff.losses import normal_kl

    g = torch.Generator().manual_seed(11)
    m1, lv1, m2, lv2 = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(4))
    want = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-12, atol=1e-12)
    want = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, math.exp(0.5 * -0.7)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, -0.7), want, rtol=1e-12, atol=1e-12)


def _binned_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, std^2) with the exact CDF: 8-bit bins of half-width 1/255
    on [-1, 1], the bins of -1 and 1 reaching to -inf and +inf."""
    normal = torch.distributions.Normal(mean, std)
    lo, hi = normal.cdf(x - 1 / 255), normal.cdf(x + 1 / 255)
    p = torch.where(x == -1, hi, torch.where(x == 1, 1 - lo, hi - lo))
    return torch.log(p)


def test_discretized_gaussian_log_likelihood_edge_and_interior_bins() -> None:
    """At x = -1 and 1 the bin is a tail (log CDF(-1 + 1/255), log(1 - CDF(1 - 1/255))); at
    interior 8-bit values, including the ones next to the edges, a CDF difference.

    Exact CDF here, the tanh approximation in the code: agreement to 3e-3 in log-probability (|x - mean| < 1.5 std).
    """
    from imgdiff.losses import discretized_gaussian_log_likelihood

    g = torch.Generator().manual_seed(12)
    levels = torch.tensor([0, 1, 2, 60, 127, 128, 200, 253, 254, 255], dtype=torch.float64)
    x = (levels / 127.5 - 1).repeat(4, 1)
    x[:, 0], x[:, -1] = -1.0, 1.0  # exactly
    log_scales = torch.empty_like(x).uniform_(-4.5, -2.0, generator=g)  # std 0.011 .. 0.14
    means = x + torch.exp(log_scales) * torch.empty_like(x).uniform_(-1.5, 1.5, generator=g)
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    want = _binned_log_likelihood(x, means, torch.exp(log_scales))
    torch.testing.assert_close(got, want, rtol=0, atol=3e-3)
    # The tails carry much more mass than the edge bins alone would.
    edge = (x == -1) | (x == 1)
    normal = torch.distributions.Normal(means, torch.exp(log_scales))
    bin_only = torch.log(normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255))
    assert bool((want[edge] > bin_only[edge] + 0.1).all())


def _textbook_posterior(s: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """DDPM eq. 7 from the betas alone: c1, c2, beta_tilde at t >= 1, shaped (B, 1, 1, 1)."""
    betas = s.betas
    ab = torch.cumprod(1 - betas, dim=0)
    ab_t, ab_prev, beta = ab[t], ab[t - 1], betas[t]
    c1 = ab_prev.sqrt() * beta / (1 - ab_t)
    c2 = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    beta_tilde = beta * (1 - ab_prev) / (1 - ab_t)
    return tuple(v.reshape(-1, 1, 1, 1) for v in (c1, c2, beta_tilde, beta))


@pytest.mark.parametrize("v_raw", [-1.0, 0.0, 1.0])
def test_vlb_term_is_the_posterior_kl_in_bits(v_raw: float) -> None:
    """For t > 0 and a wrong (random) mean, L_t = mean KL(q(x_{t-1}|x_t,x0) || p) / log 2 with
    p's log-variance frac log beta_t + (1 - frac) log beta_tilde_t, from an independent
    textbook posterior and torch.distributions' KL (eps prediction converted by hand)."""
    from torch.distributions import Normal, kl_divergence

    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(13)
    t = torch.tensor([1, 2, 37, 500, 999])
    x0 = torch.rand(5, 2, 3, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = add_noise(s, x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    eps_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.cat([eps_hat, torch.full_like(x0, v_raw)], dim=1)
    got = vlb_term(s, out, x0, x_t, t)
    c1, c2, beta_tilde, beta = _textbook_posterior(s, t)
    ab = torch.cumprod(1 - s.betas, dim=0)[t].reshape(-1, 1, 1, 1)
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    frac = (v_raw + 1) / 2
    model_var = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(beta_tilde))
    q = Normal(c1 * x0 + c2 * x_t, beta_tilde.sqrt().expand_as(x0))
    p = Normal(c1 * x0_hat + c2 * x_t, model_var.sqrt().expand_as(x0))
    want = kl_divergence(q, p).mean(dim=(1, 2, 3)) / math.log(2)
    assert bool((want > 1e-3).all())
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("v_raw", [-1.0, 0.0, 1.0])
def test_vlb_term_at_t0_is_the_decoder_nll_with_edge_bins(v_raw: float) -> None:
    """At t = 0 (in a batch with t > 0) L_0 = -mean log P(bin of x0) / log 2 under N(x0_hat,
    Sigma), x0 holding -1 and 1 exactly, whose bins are tails; Sigma interpolates log beta_0
    and log beta_tilde_1 (improved DDPM). Exact CDF here, tanh approximation in the code."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(14)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=g).double() / 127.5 - 1
    x0[:, :, 0, :2] = -1.0
    x0[:, :, 1, :2] = 1.0
    t = torch.tensor([0, 0, 5])
    x_t = add_noise(s, x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    frac = (v_raw + 1) / 2
    beta_0, beta_1 = float(s.betas[0]), float(s.betas[1])
    beta_tilde_1 = beta_1 * beta_0 / (1 - (1 - beta_0) * (1 - beta_1))  # 1 - ab_0 = beta_0
    std = math.exp(0.5 * (frac * math.log(beta_0) + (1 - frac) * math.log(beta_tilde_1)))
    x0_hat = x0 + std * torch.empty_like(x0).uniform_(-1.5, 1.5, generator=g)
    out = torch.cat([x0_hat, torch.full_like(x0, v_raw)], dim=1)
    got = vlb_term(s, out, x0, x_t, t, prediction="sample")
    # At t = 0 the posterior mean is x0_hat itself (c1 = 1, c2 = 0).
    log_p = _binned_log_likelihood(x0, x0_hat, torch.full_like(x0, std))
    want = -log_p.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(got[:2], want[:2], rtol=2e-3, atol=0)
    assert 0.5 < float(want[:2].mean()) < 3.0


def test_step_at_takes_noise_at_the_state_dtype_not_the_samples() -> None:
    """A float32 sample with a float64 state: float64 noise reaches the step unrounded (it used to
    pass through the sample's dtype first)."""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    got = sampler.step_at(out, x, 500, 480, noise=noise).state
    want = sampler.step_at(out, x.double(), 500, 480, noise=noise).state
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
