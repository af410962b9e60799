"""DDIM and DDIM inversion: spec tests DDIM-1..9 and a textbook-formula oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imgdiff import DDIM, DDPM, Clip, DynamicThreshold, GaussianDenoiser, NoiseSchedule
from imgdiff.thresholding import _row_quantile

from .conftest import TanhModel, TimeOnlyModel
from .test_sampler_contract import _SyncCounter


def textbook_ddim(
    s: NoiseSchedule,
    model: TanhModel,
    x: torch.Tensor,
    timesteps: list[int],
    eta: float,
    z: torch.Tensor | None,
    *,
    final: float = 1.0,
    clip: float | None = None,
    rederive: bool = False,
) -> torch.Tensor:
    """DDIM eq. 12 and 16 written out plainly in float64 (an independent oracle)."""
    ab = s.alphas_cumprod
    for i, t in enumerate(timesteps):
        a_t = ab[t]
        a_s = (
            ab[timesteps[i + 1]]
            if i + 1 < len(timesteps)
            else torch.tensor(final, dtype=torch.float64)
        )
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            if rederive:
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma**2).sqrt() * eps
        if eta > 0 and z is not None:
            x = x + sigma * z[i]
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(("clip", "rederive"), [(None, False), (1.0, False), (1.0, True)])
def test_ddim_matches_the_textbook_formula(
    eta: float, spacing: str, clip: float | None, rederive: bool
) -> None:
    """The fused-coefficient DDIM step equals eq. 12/16 evaluated term by term (float64, 1e-12)."""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3), scale=2.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    z = torch.randn(30, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    sampler = DDIM(
        s,
        eta=eta,
        spacing=spacing,
        thresholding=None if clip is None else Clip(clip),
        rederive_eps=rederive,
    )  # type: ignore[arg-type]
    got = sampler.sample(model, noise, num_steps=30, step_noise=z, progress=False)
    want = textbook_ddim(
        s, model, noise, list(sampler.timesteps(30)), eta, z, clip=clip, rederive=rederive
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ddim1_eta_one_consecutive_is_ddpm_fixed_small() -> None:
    """DDIM-1: eta=1 over all t: sigma^2 = beta_tilde (1e-10) and the mean equals DDPM's (1e-10)."""
    s = NoiseSchedule.linear()
    ddim, ddpm = DDIM(s, eta=1.0), DDPM(s)
    plan = ddim.plan(1000)
    assert plan.timesteps.tolist() == list(range(999, -1, -1))
    c, d = ddim.coefficients(plan), ddpm.coefficients(plan)
    torch.testing.assert_close(c.sigma**2, s.posterior_variance[plan.timesteps], rtol=1e-10, atol=0)  # type: ignore[operator]
    torch.testing.assert_close(c.x_coef, d.x_coef, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out_coef, d.out_coef, rtol=0, atol=1e-10)
    # And the whole trajectories agree given the same noise.
    model = TanhModel((1, 2, 2), scale=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    z = torch.randn(1000, 2, 1, 2, 2, generator=g, dtype=torch.float64)
    z[-1] = 0  # DDPM adds no noise at the last step; DDIM's sigma there is 0 anyway
    a = ddim.sample(model, x, num_steps=1000, step_noise=z, progress=False)
    b = ddpm.sample(model, x, step_noise=z, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim2_eta_one_strided_variance() -> None:
    """DDIM-2: eta=1, N=50: sigma^2 = (1-ab_s)/(1-ab_t) (1-ab_t/ab_s)."""
    s = NoiseSchedule.linear()
    sampler = DDIM(s, eta=1.0)
    plan = sampler.plan(50)
    ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
    c = sampler.coefficients(plan)
    torch.testing.assert_close(
        c.sigma**2, (1 - ab_s) / (1 - ab) * (1 - ab / ab_s), rtol=1e-12, atol=0
    )  # type: ignore[operator]


def test_ddim3_eta_zero_is_deterministic() -> None:
    """DDIM-3: eta=0 runs with different generators give identical output and draw no noise."""
    s = NoiseSchedule.linear()
    model = TanhModel((3, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    a = DDIM(s).sample(model, x, generator=torch.Generator().manual_seed(1), progress=False)
    b = DDIM(s).sample(model, x, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    DDIM(s).sample(model, x, progress=False)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spacing", "n", "std_tol"),
    [
        ("leading", 1000, 0.01),
        ("leading", 50, 0.10),
        ("trailing", 50, 0.10),
        ("linspace", 50, 0.10),
    ],
)
def test_ddim4_gaussian_oracle(spacing: str, n: int, std_tol: float) -> None:
    """DDIM-4: eta=0 with the exact denoiser of N(0.5, 0.3^2): mean within 0.01, std within 1 % / 10 %."""
    s = NoiseSchedule.linear()
    model = GaussianDenoiser(s, mean=0.5, std=0.3)
    noise = torch.randn(
        200, 1, 20, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    x = DDIM(s, spacing=spacing).sample(model, noise, num_steps=n, progress=False)  # type: ignore[arg-type]
    assert abs(float(x.mean()) - 0.5) < 0.01
    assert abs(float(x.std()) / 0.3 - 1) < std_tol


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("final", ["one", "first"])
@pytest.mark.parametrize(("n", "strength"), [(50, 1.0), (37, 1.0), (50, 0.82)])
def test_ddim5_inversion_is_exact_for_a_time_only_model(
    spacing: str, final: str, n: int, strength: float
) -> None:
    """DDIM-5: when eps_hat depends only on t, invert then sample is exact (1e-10, float64)."""
    s = NoiseSchedule.scaled_linear()
    model = TimeOnlyModel((3, 4, 4))
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = DDIM(s, spacing=spacing, final_alpha_bar=final)  # type: ignore[arg-type]
    x_T = sampler.invert(model, x0, num_steps=n, strength=strength, progress=False)
    rec = sampler.sample(model, x_T, num_steps=n, strength=strength, progress=False)
    assert float((rec - x0).abs().max()) < 1e-10
    assert float((x_T - x0).abs().max()) > 0.1  # the inversion really moved


def test_v_prediction_inversion_is_first_order() -> None:
    """v prediction: diffusers' convention recovers eps at the current level, so even a model whose
    eps is time-only at its own level round-trips only to first order: the error halves as the
    steps double."""
    s = NoiseSchedule.scaled_linear()
    ab = s.alphas_cumprod
    table = TimeOnlyModel((3, 4, 4)).table

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # implied eps = table[t]
        a, sg = ab[t].sqrt().reshape(-1, 1, 1, 1), (1 - ab[t]).sqrt().reshape(-1, 1, 1, 1)
        return (table[t] - sg * x) / a

    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampler = DDIM(s, prediction="v")
    err = {}
    for n in (50, 100, 200):
        x_T = sampler.invert(v_model, x0, num_steps=n, progress=False)
        err[n] = float((sampler.sample(v_model, x_T, num_steps=n, progress=False) - x0).abs().max())
    assert err[100] < err[50] / 1.8
    assert err[200] < err[100] / 1.8


@pytest.mark.slow
def test_ddim6_inversion_error_shrinks_with_steps() -> None:
    """DDIM-6: with the Gaussian oracle, error(250) < error(50)/3 and error(1000) < 0.02."""
    s = NoiseSchedule.linear()
    model = GaussianDenoiser(s, mean=0.5, std=0.3)
    x0 = torch.linspace(-0.5, 1.5, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    sampler = DDIM(s)
    errors = {}
    for n in (50, 250, 1000):
        rec = sampler.sample(
            model,
            sampler.invert(model, x0, num_steps=n, progress=False),
            num_steps=n,
            progress=False,
        )
        errors[n] = float((rec - x0).abs().max())
    assert errors[250] < errors[50] / 3
    assert errors[1000] < 0.02


def test_ddim7_dynamic_thresholding() -> None:
    """DDIM-7: s_max=1 equals clipping; a sample with |x| quantile 2 and s_max=3 gives clip(x,-2,2)/2; per sample."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, generator=g) * 3
    torch.testing.assert_close(DynamicThreshold(0.995, 1.0)(x), Clip(1.0)(x), rtol=0, atol=0)
    # Sample 0: |values| are 0..2 with most mass at 2, so its 0.9 quantile is exactly 2.
    a = torch.full((1, 1, 10, 10), 2.0)
    a[0, 0, 0, :5] = torch.tensor([0.1, -0.5, 1.0, -1.5, 0.3])
    b = torch.randn(1, 1, 10, 10, generator=g) * 0.1  # quantile < 1: clamped up to s = 1
    batch = torch.cat([a, b])
    out = DynamicThreshold(0.9, 3.0)(batch)
    torch.testing.assert_close(out[0:1], a.clamp(-2, 2) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(out[1:2], b.clamp(-1, 1), rtol=0, atol=0)
    # Per-sample independence: a sample's result does not depend on its batch mates.
    torch.testing.assert_close(DynamicThreshold(0.9, 3.0)(a), out[0:1], rtol=0, atol=0)


def test_ddim8_zero_snr_trailing_v_prediction() -> None:
    """DDIM-8: zero-SNR + trailing + v: the first step (ab = 0) is finite; eps prediction raises."""
    s = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    model = TanhModel((3, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    seen: list[int] = []
    out = DDIM(s, spacing="trailing", prediction="v").sample(
        model, x, num_steps=10, callback=lambda i: seen.append(i.timestep), progress=False
    )
    assert seen[0] == 999
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"alpha_bar = 0.*timesteps \[999\]"):
        DDIM(s, spacing="trailing").sample(model, x, num_steps=10, progress=False)


def test_ddim9_previous_timestep_follows_the_list() -> None:
    """DDIM-9: trailing N=30 steps to the next list entry (checked through the trajectory)."""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    sampler = DDIM(s, spacing="trailing")
    ts = list(sampler.timesteps(30))
    assert sorted({a - b for a, b in itertools.pairwise(ts)}) == [33, 34]
    got = sampler.sample(model, x, num_steps=30, progress=False)
    torch.testing.assert_close(
        got, textbook_ddim(s, model, x, ts, 0.0, None), rtol=1e-12, atol=1e-12
    )


def test_final_alpha_bar_first_ends_at_alpha_bar_0() -> None:
    """final_alpha_bar='first' makes the last step land on alpha_bar_0 instead of 1."""
    s = NoiseSchedule.scaled_linear()
    sampler = DDIM(s, final_alpha_bar="first", steps_offset=1)
    plan = sampler.plan(50)
    assert plan.timesteps[-1] == 1
    assert float(plan.alpha_bar_next[-1]) == float(s.alphas_cumprod[0])
    model = TanhModel((1, 2, 2))
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    got = sampler.sample(model, x, progress=False)
    want = textbook_ddim(
        s, model, x, list(plan.timesteps.tolist()), 0.0, None, final=float(s.alphas_cumprod[0])
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_eta_positive_draws_noise_of_variance_sigma_squared() -> None:
    """eta > 0: the sampler draws its own noise (different generators, different samples), and
    the spread of one step across noise draws is sigma = eta sqrt((1-ab_s)/(1-ab_t)) sqrt(1-ab_t/ab_s)."""
    s = NoiseSchedule.linear()
    model = TanhModel((1, 2, 2))
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    sampler = DDIM(s, eta=0.6)
    a = sampler.sample(
        model, x, num_steps=5, generator=torch.Generator().manual_seed(1), progress=False
    )
    b = sampler.sample(
        model, x, num_steps=5, generator=torch.Generator().manual_seed(2), progress=False
    )
    assert not torch.equal(a, b)
    # one step from t = 600 to 400 on a batch of copies: per-element std is sigma
    xs = x.expand(20000, 1, 2, 2).contiguous()
    out = model(x, torch.tensor([600])).expand(20000, 1, 2, 2).contiguous()
    step = sampler.step_at(out, xs, 600, 400, generator=torch.Generator().manual_seed(3)).state
    ab_t, ab_s = s.alphas_cumprod[600], s.alphas_cumprod[400]
    sigma = 0.6 * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
    assert abs(float(step.std(dim=0).mean()) / float(sigma) - 1) < 0.03
    mean = DDIM(s, eta=0.6).step_at(out[:1], x, 600, 400, noise=torch.zeros_like(x)).state
    torch.testing.assert_close(step.mean(dim=0, keepdim=True), mean, rtol=0, atol=0.03)


def test_default_eta_is_deterministic_ddim() -> None:
    """Spec 3.1 defaults: eta = 0; and invert() refuses any eta > 0 (it breaks invertibility)."""
    s = NoiseSchedule.linear()
    assert DDIM(s).eta == 0.0
    x0 = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    for eta in (0.3, 1.0):
        with pytest.raises(ValueError, match=r"^eta: invert\(\) inverts the deterministic step"):
            DDIM(s, eta=eta).invert(TimeOnlyModel((1, 2, 2)), x0, num_steps=5, progress=False)


def test_dynamic_threshold_uses_the_quantile_of_absolute_values() -> None:
    """Spec 3.3: s = quantile(|x0|, p): a sample whose large values are negative is scaled like
    its mirror image (the threshold is odd-symmetric: T(-x) = -T(x))."""
    a = torch.full((1, 1, 10, 10), -2.0)
    a[0, 0, 0, :5] = torch.tensor([0.1, -0.5, 1.0, -1.5, 0.3])
    th = DynamicThreshold(0.9, 3.0)
    torch.testing.assert_close(th(a), a.clamp(-2, 2) / 2, rtol=0, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2.5
    torch.testing.assert_close(th(-x), -th(x), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    q=st.one_of(st.sampled_from([0.0, 0.5, 0.995, 1.0]), st.floats(0.0, 1.0)),
    float64=st.booleans(),
    ties=st.booleans(),
    nan_at=st.one_of(st.none(), st.integers(0, 2999)),
    seed=st.integers(0, 2**31 - 1),
)
def test_dynamic_threshold_quantile_equals_torch_quantile(
    n: int, q: float, float64: bool, ties: bool, nan_at: int | None, seed: int
) -> None:
    """The threshold's own sort-based quantile equals torch.quantile (linear interpolation) over
    sizes, levels, ties and NaN rows: exactly in float64, to float32 rounding of the
    interpolation weight in float32 (torch 2.11 and earlier form that weight in float32)."""
    dtype = torch.float64 if float64 else torch.float32
    v = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3
    if ties:
        v = v.round()
    if nan_at is not None:
        v[1, nan_at % n] = float("nan")
    got = _row_quantile(v, q)
    want = torch.quantile(v, q, dim=1)
    assert torch.equal(got.isnan(), want.isnan())
    assert got.isnan().any() == (nan_at is not None)
    if float64:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        return
    # a float32 weight is off by up to rank * eps, which moves the result by that much of the
    # gap between the two neighbours it interpolates
    below = math.floor(q * (n - 1))
    ordered = v.sort(dim=1).values
    gap = (ordered[:, min(below + 1, n - 1)] - ordered[:, below]).abs()
    eps = torch.finfo(dtype).eps
    tol = gap * (n * eps) + 4 * eps * want.abs()
    ok = (got - want).abs() <= tol
    assert bool((ok | want.isnan()).all()), (got - want, tol)


def test_dynamic_threshold_reads_no_value_on_the_host() -> None:
    """The quantile runs on the device with no host read (torch 2.11's quantile checked q with
    one in every call), and on the meta device, where any host read would raise."""
    th = DynamicThreshold(0.9, 1.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    with _SyncCounter() as counter:
        th(x)
    assert counter.count == 0
    out = th(torch.empty(2, 3, 8, 8, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (2, 3, 8, 8)


def test_sampler_strength_starts_from_a_less_noisy_level() -> None:
    """strength keeps the last int(N * strength) timesteps of the plan, so the run starts lower."""
    s = NoiseSchedule.linear()
    sampler = DDIM(s)
    full = sampler.timesteps(50)
    part = sampler.timesteps(50, strength=0.3)
    assert tuple(part) == tuple(full[-15:])
    assert part[-1] == 0
