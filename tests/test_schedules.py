"""Noise schedules and timestep spacing: spec tests SCH-1..8 and the spec's reference values (spec 1.1)."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import imgdiff
from imgdiff import NoiseSchedule, inference_timesteps, karras_sigmas, respace_timesteps
from imgdiff.timesteps import SamplingPlan, respaced_betas, truncate_for_strength

SCHEDULES = {
    "linear": NoiseSchedule.linear,
    "scaled_linear": NoiseSchedule.scaled_linear,
    "cosine": NoiseSchedule.cosine,
    "sigmoid": NoiseSchedule.sigmoid,
    "sigmoid_chen": NoiseSchedule.sigmoid_chen,
}

# Spec 1.1 reference table (float64, T=1000): beta_0, beta_{T-1}, alpha_bar_{T-1}, lambda_0,
# lambda_{T-1}, sigma_min, sigma_max, as printed by the spec's independent numpy simulation. Each
# value is checked to the precision it was printed with (half a unit in its last digit).
REFERENCE = {
    "linear": ("1.000e-4", "0.0200", "4.036e-5", "9.210", "-10.118", "0.0100", "157.41"),
    "scaled_linear": ("8.500e-4", "0.0120", "4.660e-3", "7.069", "-5.364", "0.0292", "14.615"),
    "cosine": ("4.128e-5", "0.9990", "2.429e-9", "10.095", "-19.836", "0.0064", "20291"),
    "sigmoid": ("1.492e-4", "0.0200", "3.968e-5", "8.810", "-10.135", "0.0122", "158.74"),
    "sigmoid_chen": ("3.003e-4", "0.9990", "3.003e-7", "8.110", "-15.019", "0.0173", "1824.9"),
}


def _printed_tolerance(text: str) -> float:
    """Half a unit in the last printed digit of ``text``."""
    return 0.5 * 10.0 ** Decimal(text).as_tuple().exponent


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_values_match_the_spec_table(name: str) -> None:
    """Every constructor reproduces the spec's independently computed reference values."""
    s = SCHEDULES[name]()
    got = (
        float(s.betas[0]),
        float(s.betas[-1]),
        float(s.alphas_cumprod[-1]),
        float(s.log_snr[0]),
        float(s.log_snr[-1]),
        float(s.sigmas.min()),
        float(s.sigmas.max()),
    )
    for value, text in zip(got, REFERENCE[name], strict=True):
        assert abs(value - float(text)) <= _printed_tolerance(text), (name, text, value)


def test_sch1_linear_endpoints() -> None:
    """SCH-1: linear T=1000 has beta_0 = 1e-4 and beta_999 = 0.02 exactly; alpha_bar_999 = 4.036e-5."""
    s = NoiseSchedule.linear()
    assert abs(float(s.betas[0]) - 1e-4) <= 1e-15
    assert abs(float(s.betas[999]) - 0.02) <= 1e-15
    assert math.isclose(float(s.alphas_cumprod[999]), 4.036e-5, rel_tol=1e-3)


def test_sch2_scaled_linear_matches_k_diffusion_sigmas() -> None:
    """SCH-2: Stable Diffusion's schedule has sigma_max = 14.615 and sigma_min = 0.0292."""
    s = NoiseSchedule.scaled_linear()
    assert math.isclose(float(s.alphas_cumprod[999]), 4.660e-3, rel_tol=1e-3)
    assert math.isclose(float(s.sigmas.max()), 14.615, rel_tol=1e-3)
    assert math.isclose(float(s.sigmas.min()), 0.0292, rel_tol=1e-2)


def test_sch3_cosine_caps_only_the_last_beta_and_telescopes() -> None:
    """SCH-3: exactly one beta hits the 0.999 cap (the last); alpha_bar_t = f((t+1)/T)/f(0)."""
    s = NoiseSchedule.cosine()
    betas = s.betas
    capped = torch.nonzero(betas == 0.999).flatten().tolist()
    assert capped == [999]
    assert math.isclose(float(betas[0]), 4.128e-5, rel_tol=1e-3)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(s.alphas_cumprod[:-1], (f / f0)[:-1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_sch4_monotone_and_consistent(name: str, zero_snr: bool) -> None:
    """SCH-4: 0 < beta <= 0.999 (<= 1 rescaled), alpha_bar and lambda strictly decrease, sigma = exp(-lambda/2)."""
    s = SCHEDULES[name]()
    if zero_snr:
        s = s.rescale_zero_terminal_snr()
    b = s.betas
    assert bool((b > 0).all())
    assert bool((b <= (1.0 if zero_snr else 0.999)).all())
    ab = s.alphas_cumprod
    assert bool((ab[1:] < ab[:-1]).all())
    lam = s.log_snr
    assert bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(s.sigmas, torch.exp(-lam / 2), rtol=1e-12, atol=0)
    # The two stored tables agree: cumprod(1 - beta) == alpha_bar.
    torch.testing.assert_close(torch.cumprod(1 - b, 0), ab, rtol=1e-12, atol=1e-300)


def test_sch5_zero_terminal_snr_rescaling() -> None:
    """SCH-5: on scaled_linear, alpha_bar'_999 = 0, alpha_bar'_0 kept, sqrt affine in sqrt, idempotent."""
    s = NoiseSchedule.scaled_linear()
    r = s.rescale_zero_terminal_snr()
    assert abs(float(r.alphas_cumprod[999])) <= 1e-12
    assert math.isclose(float(r.alphas_cumprod[0]), float(s.alphas_cumprod[0]), rel_tol=1e-12)
    x, y = s.sqrt_alphas_cumprod, r.sqrt_alphas_cumprod
    A = torch.stack([x, torch.ones_like(x)], dim=1)
    coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution
    residual = (A @ coef).squeeze(1) - y
    assert float(residual.abs().max()) < 1e-12
    assert math.isclose(float(r.alphas_cumprod[500]), 0.2410, rel_tol=1e-3)
    torch.testing.assert_close(
        r.rescale_zero_terminal_snr().alphas_cumprod, r.alphas_cumprod, rtol=1e-10, atol=1e-12
    )
    assert float(r.betas[-1]) == 1.0
    assert math.isinf(float(r.sigmas[-1]))
    assert float(r.log_snr[-1]) == -math.inf


def test_sch6_spacing_tables() -> None:
    """SCH-6: the spacing tables of spec 1.4 for (T, N) = (1000, 10) and (1000, 50)."""
    assert inference_timesteps(1000, 10, "leading") == tuple(range(900, -1, -100))
    assert inference_timesteps(1000, 10, "trailing") == tuple(range(999, 0, -100))
    assert inference_timesteps(1000, 10, "linspace") == (
        999,
        888,
        777,
        666,
        555,
        444,
        333,
        222,
        111,
        0,
    )
    assert inference_timesteps(1000, 50, "leading") == tuple(range(980, -1, -20))
    assert inference_timesteps(1000, 50, "leading", offset=1) == tuple(range(981, 0, -20))
    assert inference_timesteps(1000, 50, "trailing") == tuple(range(999, 0, -20))
    lin = inference_timesteps(1000, 50, "linspace")
    assert lin[0] == 999
    assert lin[-1] == 0
    assert len(lin) == 50
    strides = {a - b for a, b in itertools.pairwise(lin)}
    assert strides == {20, 21}  # why t - T//N is wrong for linspace


def test_sch6_trailing_30_previous_is_the_next_list_entry() -> None:
    """SCH-6 / DDIM-9: with trailing N=30 every step's previous timestep is the next list entry."""
    s = NoiseSchedule.linear()
    ts = inference_timesteps(1000, 30, "trailing")
    plan = SamplingPlan.denoising(s, ts)
    assert plan.next_timesteps.tolist() == [*ts[1:], -1]
    # ...which differs from t - T//N for some steps (the stride alternates 33 and 34).
    assert any(t - 33 != nxt for t, nxt in itertools.pairwise(ts))
    ab = s.alphas_cumprod
    torch.testing.assert_close(plan.alpha_bar_next[:-1], ab[list(ts[1:])], rtol=0, atol=0)
    assert float(plan.alpha_bar_next[-1]) == 1.0


def test_sch7_respacing() -> None:
    """SCH-7: rebuilt betas telescope to alpha_bar; ddim50 is {0, 20, ..., 980}; "50" has 0 and 999."""
    s = NoiseSchedule.linear()
    kept = respace_timesteps(1000, "ddim50")
    assert kept == tuple(range(980, -1, -20))
    b = respaced_betas(s, kept)
    torch.testing.assert_close(
        torch.cumprod(1 - b, 0), s.alphas_cumprod[sorted(kept)], rtol=1e-12, atol=0
    )
    fifty = respace_timesteps(1000, "50")
    assert len(fifty) == 50
    assert 0 in fifty
    assert 999 in fifty
    sections = respace_timesteps(1000, [10, 5])
    assert len(sections) == 15
    assert all(t < 500 for t in sections[-10:])
    assert all(t >= 500 for t in sections[:5])


def test_sch8_karras_sigmas() -> None:
    """SCH-8: first == sigma_max, last before the appended 0 == sigma_min, strictly decreasing."""
    s = NoiseSchedule.scaled_linear()
    sig = karras_sigmas(s, 25)
    assert sig.shape == (26,)
    assert float(sig[-1]) == 0.0
    assert math.isclose(float(sig[0]), float(s.sigmas.max()), rel_tol=1e-12)
    assert math.isclose(float(sig[-2]), float(s.sigmas.min()), rel_tol=1e-12)
    assert bool((sig[1:] < sig[:-1]).all())
    # rho = 7: sigma^(1/7) is linear in the step index.
    root = sig[:-1] ** (1 / 7)
    torch.testing.assert_close(
        root[1:] - root[:-1], (root[1] - root[0]).expand(24), rtol=1e-9, atol=0
    )


def test_sigma_to_timestep_inverts_the_table() -> None:
    """Fractional timesteps: the table's own sigmas map back to their integer timesteps."""
    s = NoiseSchedule.scaled_linear()
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    back = imgdiff.sigma_to_timestep(s.sigmas[t], s)
    torch.testing.assert_close(back, t.double(), rtol=0, atol=1e-9)
    # between entries the interpolation is linear in log sigma (k-diffusion's sigma_to_t): the
    # geometric mean of two neighbours is half-way, a weighted one the weight's way
    mid = imgdiff.sigma_to_timestep(torch.sqrt(s.sigmas[10] * s.sigmas[11]).reshape(1), s)
    assert abs(float(mid) - 10.5) < 1e-9
    quarter = s.sigmas[10] ** 0.75 * s.sigmas[11] ** 0.25
    assert abs(float(imgdiff.sigma_to_timestep(quarter.reshape(1), s)) - 10.25) < 1e-9


def test_posterior_tables() -> None:
    """DDPM-3 on the schedule's own tables: E[mu|x0] = sqrt(ab_{t-1}) x0 and variance is preserved."""
    s = NoiseSchedule.linear()
    c1, c2 = s.posterior_mean_coef1, s.posterior_mean_coef2
    torch.testing.assert_close(
        c1 + c2 * s.sqrt_alphas_cumprod, torch.sqrt(s.alphas_cumprod_prev), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        c2**2 * (1 - s.alphas_cumprod) + s.posterior_variance,
        1 - s.alphas_cumprod_prev,
        rtol=0,
        atol=1e-12,
    )
    assert float(s.posterior_variance[0]) == 0.0
    # improved DDPM's clipped log-variance substitutes beta_tilde_1 at t = 0.
    clipped = s.posterior_log_variance_clipped
    assert float(clipped[0]) == float(clipped[1]) == math.log(float(s.posterior_variance[1]))
    torch.testing.assert_close(clipped[1:], torch.log(s.posterior_variance[1:]), rtol=0, atol=0)


def test_schedule_is_immutable() -> None:
    """Tables returned by a schedule are copies; attributes cannot be set."""
    s = NoiseSchedule.linear()
    ab = s.alphas_cumprod
    ab[:] = 0.5
    assert float(s.alphas_cumprod[0]) != 0.5
    with pytest.raises(AttributeError):
        s.foo = 1  # type: ignore[attr-defined]
    assert s == NoiseSchedule.linear()
    assert s != NoiseSchedule.cosine()
    assert len({s, NoiseSchedule.linear()}) == 1


def test_from_alphas_cumprod_round_trips_from_betas() -> None:
    """Building from alpha_bar recovers the betas of a schedule built from betas."""
    s = NoiseSchedule.cosine()
    r = NoiseSchedule.from_alphas_cumprod(s.alphas_cumprod)
    torch.testing.assert_close(r.betas, s.betas, rtol=1e-9, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(min_value=2, max_value=2000),
    data=st.data(),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
)
def test_inference_timesteps_property(T: int, data: st.DataObject, spacing: str) -> None:
    """Any (T, N, spacing): N distinct descending timesteps in [0, T-1]; trailing starts at T-1."""
    N = data.draw(st.integers(min_value=1, max_value=T))
    ts = inference_timesteps(T, N, spacing)  # type: ignore[arg-type]
    assert len(ts) == N
    assert all(0 <= t <= T - 1 for t in ts)
    assert all(a > b for a, b in itertools.pairwise(ts))
    if spacing == "trailing":
        assert ts[0] == T - 1
    if spacing == "linspace" and N > 1:
        assert ts[0] == T - 1
        assert ts[-1] == 0


def test_shifted_tables_pad_with_the_spec_boundary_levels() -> None:
    """Spec 1.2: alpha_bar_prev[t] = alpha_bar_{t-1} with alpha_bar_{-1} = 1, and
    alpha_bar_next[t] = alpha_bar_{t+1} with alpha_bar_next[T-1] = 0 (improved-diffusion)."""
    s = NoiseSchedule.cosine(50)
    ab = s.alphas_cumprod
    prev, nxt = s.alphas_cumprod_prev, s.alphas_cumprod_next
    assert prev.shape == nxt.shape == ab.shape
    assert float(prev[0]) == 1.0
    assert float(nxt[-1]) == 0.0
    assert torch.equal(prev[1:], ab[:-1])
    assert torch.equal(nxt[:-1], ab[1:])


def test_trailing_spacing_rounds_to_nearest() -> None:
    """Spec 1.4 trailing: t = round(arange(T, 0, -T/N)) - 1. T=1000, N=3: 1000, 666.67, 333.33
    round to 1000, 667, 333 (floor would give 666 for the middle one)."""
    want = tuple(round(1000 - k * 1000 / 3) - 1 for k in range(3))
    assert want == (999, 666, 332)
    assert inference_timesteps(1000, 3, "trailing") == want
    # and for every N the trailing entries are the nearest integers to T - k T / N, minus 1
    for n in (3, 6, 7, 30, 70, 300):
        got = inference_timesteps(1000, n, "trailing")
        exact = [1000 - k * 1000 / n for k in range(n)]
        assert all(abs((t + 1) - e) <= 0.5 for t, e in zip(got, exact, strict=True)), n


def test_offset_shifts_every_spacing() -> None:
    """imgdiff applies the offset to every spacing, not only to leading (as diffusers does)."""
    trailing = inference_timesteps(1000, 10, "trailing")
    assert inference_timesteps(1000, 10, "trailing", offset=-9) == tuple(t - 9 for t in trailing)
    assert inference_timesteps(1000, 10, "trailing", offset=-9)[0] == 990
    # linspace already spans [0, 999]: any shift leaves the range and is refused
    for shift in (1, -1):
        with pytest.raises(imgdiff.InputValueError, match=r"^offset: expected a shift"):
            inference_timesteps(1000, 10, "linspace", offset=shift)


def test_truncate_for_strength_keeps_the_least_noisy_steps() -> None:
    """strength keeps the *last* int(N * strength) timesteps (start from a less noisy level)."""
    ts = tuple(range(90, -1, -10))  # 90, 80, ..., 0
    assert truncate_for_strength(ts, 1.0) == ts
    assert truncate_for_strength(ts, 0.5) == (40, 30, 20, 10, 0)
    assert truncate_for_strength(ts, 0.35) == (20, 10, 0)  # int(10 * 0.35) = 3
    with pytest.raises(imgdiff.InputValueError, match=r"^strength: .* keeps int"):
        truncate_for_strength(ts, 0.05)


def test_inversion_plan_walks_the_generation_plan_backwards() -> None:
    """Spec 3.4 convention B: step k of the inversion goes from the level of u[k-1] (the final
    level for k = 0) to the level of u[k], and the model sees u[k]; every transition of the
    generation plan appears reversed."""
    s = NoiseSchedule.linear()
    ts = inference_timesteps(1000, 7, "trailing")
    for final in ("one", "first"):
        fwd = SamplingPlan.denoising(s, ts, final)  # type: ignore[arg-type]
        inv = SamplingPlan.inversion(s, ts, final)  # type: ignore[arg-type]
        u = list(reversed(ts))
        assert inv.timesteps.tolist() == u
        assert inv.next_timesteps.tolist() == u
        ab = s.alphas_cumprod
        first = 1.0 if final == "one" else float(ab[0])
        torch.testing.assert_close(inv.alpha_bar_next, ab[u], rtol=0, atol=0)
        assert float(inv.alpha_bar[0]) == first
        torch.testing.assert_close(inv.alpha_bar[1:], ab[u[:-1]], rtol=0, atol=0)
        # noisier after every inversion step; the reverse of the forward transitions
        assert bool((inv.alpha_bar_next < inv.alpha_bar).all())
        assert torch.equal(inv.alpha_bar, fwd.alpha_bar_next.flip(0))
        assert torch.equal(inv.alpha_bar_next, fwd.alpha_bar.flip(0))
