"""Tests written from a mutation-testing pass over the samplers (base, DDPM, DDIM, EDICT, step
records, timesteps, posterior, noising, thresholding): each pins a behaviour that a hand-made
mutant of the library changed without any other test noticing (the mutant is named in the
docstring, e.g. "[M13]"; the list is in the mutation report).

The checks are math written out by hand (the spec's formulas in float64), identities between two
entry points, or contracts stated in the docstrings; no golden numbers.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import imgdiff
from imgdiff import (
    DDIM,
    DDPM,
    EDICT,
    Clip,
    DynamicThreshold,
    NoiseSchedule,
    PrecisionWarning,
    StepOutput,
    inference_timesteps,
)

from .conftest import TanhModel

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _x0_from_eps(s: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """Spec 2.2: x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), float64."""
    ab = float(s.alphas_cumprod[t])
    return (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


def _ddim_step(x0: torch.Tensor, eps: torch.Tensor, ab_s: float) -> torch.Tensor:
    """Spec 3.1 with eta = 0: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s) eps_hat."""
    return math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps


# ---------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("n", [50, 30, 7])
def test_linspace_spacing_rounds_to_nearest(n: int) -> None:
    """Spec 1.4: linspace is ``round(linspace(0, T-1, N))`` reversed; with N = 50 the grid
    999 k / 49 is fractional, so truncating instead of rounding gives other timesteps. [T04]"""
    want = tuple(round(k * 999 / (n - 1)) for k in range(n - 1, -1, -1))
    assert inference_timesteps(1000, n, "linspace") == want
    assert DDIM(NoiseSchedule.linear(), spacing="linspace").timesteps(n) == want


# ---------------------------------------------------------------------------------- thresholding


def test_threshold_defaults_follow_the_spec() -> None:
    """Spec 3.3 defaults: Clip() clamps at 1; DynamicThreshold() has p = 0.995 and s_max = 1, so it
    equals static clipping; with a larger s_max the threshold is the 0.995 quantile of |x0|.
    [H06, H07, H09]
    """
    x = 3 * _randn(2, 3, 8, 8, seed=1)
    torch.testing.assert_close(Clip()(x), x.clamp(-1.0, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(DynamicThreshold()(x), x.clamp(-1.0, 1.0), rtol=0, atol=0)
    q = torch.quantile(x.reshape(2, -1).abs(), 0.995, dim=1)
    assert bool((q > 2.0).all())  # so s_max = 1 really clamps s
    s = q.reshape(2, 1, 1, 1)
    want = torch.maximum(torch.minimum(x, s), -s) / s
    # float64 input: the quantile is taken in float64 too (exact equality)
    torch.testing.assert_close(DynamicThreshold(max_value=100.0)(x), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- step_at


@pytest.mark.parametrize("sampler_cls", [DDIM, DDPM])
def test_step_at_to_the_final_level_follows_final_alpha_bar(sampler_cls: type) -> None:
    """prev_t = -1 is the sampler's final level: alpha_bar_0 under final_alpha_bar="first".

    DDIM lands on sqrt(ab_0) x0_hat + sqrt(1 - ab_0) eps; the DDPM step from t = 0 to that level
    does not move (beta = 1 - ab_0/ab_0 = 0), so it returns x itself. [D16]"""
    s = NoiseSchedule.scaled_linear()
    model = TanhModel((2, 3, 3), scale=0.7)
    x = _randn(2, 2, 3, 3, seed=5)
    ab0 = float(s.alphas_cumprod[0])
    if sampler_cls is DDIM:
        out = model(x, torch.full((2,), 20))
        got = DDIM(s, final_alpha_bar="first").step_at(out, x, 20, -1).state
        want = _ddim_step(_x0_from_eps(s, x, out, 20), out, ab0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        # and the loop agrees
        loop = DDIM(s, final_alpha_bar="first").sample(model, x, timesteps=[20], progress=False)
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-12)
    else:
        out = model(x, torch.zeros(2, dtype=torch.int64))
        got = DDPM(s, final_alpha_bar="first").step_at(out, x, 0, -1).state
        torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


def test_ddpm_step_at_draws_noise_when_any_sample_needs_it() -> None:
    """A batch whose samples step 5 -> 4 and 0 -> final: the first needs noise, so step_at draws
    it from the generator (the same draw as imgdiff.randn), and only the second gets none. [D18]"""
    s = NoiseSchedule.linear()
    x, out = _randn(2, 2, 3, 3, seed=6), _randn(2, 2, 3, 3, seed=7)
    t, prev = torch.tensor([5, 0]), torch.tensor([4, -1])
    sampler = DDPM(s, variance="fixed_large")
    drawn = sampler.step_at(out, x, t, prev, generator=torch.Generator().manual_seed(9)).state
    z = imgdiff.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    injected = sampler.step_at(out, x, t, prev, noise=z).state
    clean = sampler.step_at(out, x, t, prev, noise=torch.zeros_like(z)).state
    assert torch.equal(drawn, injected)
    assert not torch.allclose(drawn[0], clean[0])
    assert torch.equal(drawn[1], clean[1])


# ---------------------------------------------------------------------------------- DDPM


class _PullTo(imgdiff.Guidance):
    """log p(y | x) = -|x - c|^2 / 2: the gradient is c - x."""

    def __init__(self, c: float) -> None:
        self.c = c

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c - x


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_guidance_in_the_loop_shifts_the_mean_by_the_variance(variance: str) -> None:
    """Dhariwal & Nichol Alg. 1 inside the sampling loop (one step's coefficients as floats):
    the guided step is the unguided one plus Sigma g, Sigma the variance (not the std). [M13]"""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3), scale=0.5)
    x = _randn(2, 2, 3, 3, seed=32)
    kw = {"timesteps": [500, 480], "step_noise": torch.zeros(2, *x.shape, dtype=F64)}
    states: dict[str, list[torch.Tensor]] = {"plain": [], "guided": []}
    for name, guidance in (("plain", None), ("guided", _PullTo(0.7))):
        DDPM(s, variance=variance, guidance=guidance).sample(  # type: ignore[arg-type]
            model,
            x,
            callback=lambda i, name=name: states[name].append(i.state),
            progress=False,
            **kw,  # type: ignore[arg-type]
        )
    ab, ab_s = float(s.alphas_cumprod[500]), float(s.alphas_cumprod[480])
    beta = 1 - ab / ab_s
    var = beta * (1 - ab_s) / (1 - ab) if variance == "fixed_small" else beta
    want = states["plain"][0] + var * (0.7 - x)
    torch.testing.assert_close(states["guided"][0], want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("v_raw", [-1.0, -3.0])
def test_guided_learned_range_ends_finite_at_the_first_level(v_raw: float) -> None:
    """final_alpha_bar="first": the step from t = 0 does not move (beta = 0), so guidance must shift
    it by a (floored) zero variance, not by exp(log 0) or inf; the result is finite and that last
    step leaves the sample where the previous one put it. [M16]"""
    s = NoiseSchedule.linear()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.tanh(x), torch.full_like(x, v_raw)], dim=1)

    x = _randn(2, 1, 3, 3, seed=33)
    states: list[torch.Tensor] = []
    out = DDPM(s, variance="learned_range", final_alpha_bar="first", guidance=_PullTo(0.5)).sample(
        model,
        x,
        timesteps=[20, 10, 0],
        generator=torch.Generator().manual_seed(0),
        callback=lambda i: states.append(i.state),
        progress=False,
    )
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(states[-1], states[-2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_ddpm_update_to_the_final_level_adds_no_noise(variance: str) -> None:
    """DDPM's step to the final level adds no noise for every variance type, even when update()
    is handed noise with that step's (float) coefficients. [M12]"""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, variance=variance)  # type: ignore[arg-type]
    last = sampler.coefficients(sampler.plan(5)).unbind()[-1]
    x = _randn(2, 2, 3, 3, seed=38)
    out = _randn(2, 2 * sampler.output_channels_factor, 3, 3, seed=39)
    noisy = sampler.update(x, out, last, _randn(2, 2, 3, 3, seed=40)).state
    assert torch.equal(noisy, sampler.update(x, out, last, None).state)


def test_ddpm_update_checks_the_learned_variance_channels() -> None:
    """DDPM.update with a learned variance needs the model's 2C channels: C + 1 channels (which
    would broadcast one variance channel over C) are refused. [M17]"""
    s = NoiseSchedule.linear()
    sampler = DDPM(s, variance="learned_range")
    c = sampler.coefficients(sampler.plan(5)).unbind()[0]
    x = _randn(2, 2, 3, 3, seed=34)
    bad = _randn(2, 3, 3, 3, seed=35)
    with pytest.raises(imgdiff.InputValueError, match=r"expected shape \(2, 4, 3, 3\)"):
        sampler.update(x, bad, c, _randn(2, 2, 3, 3, seed=36))


# ---------------------------------------------------------------------------------- DDIM options


def test_rederive_eps_defaults_off_and_needs_thresholding() -> None:
    """rederive_eps is off by default (diffusers' use_clipped_model_output=False), and without
    thresholding it changes nothing, bit for bit (there is no clipped x0_hat to re-derive from).
    [I10]
    """
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3), scale=2.0)
    x = _randn(2, 2, 3, 3, seed=11)
    kw = {"num_steps": 10, "progress": False}
    clip = Clip(1.0)
    default = DDIM(s, thresholding=clip).sample(model, x, **kw)
    assert torch.equal(
        default, DDIM(s, thresholding=clip, rederive_eps=False).sample(model, x, **kw)
    )
    assert not torch.allclose(
        default, DDIM(s, thresholding=clip, rederive_eps=True).sample(model, x, **kw)
    )
    for dtype in (F64, torch.float32):
        xd = x.to(dtype)
        plain = DDIM(s).sample(model, xd, **kw)
        assert torch.equal(plain, DDIM(s, rederive_eps=True).sample(model, xd, **kw))


def test_x0_model_inversion_from_the_clean_level_is_refused() -> None:
    """DDIM inversion starts at the final level; with final_alpha_bar="one" that is ab = 1, where
    an x0-prediction carries no eps: refused by name, while "first" (ab_0 < 1) inverts to a
    finite sample. [I14]"""
    s = NoiseSchedule.linear()
    x0 = _randn(1, 2, 3, 3, seed=29)
    c = _randn(1, 2, 3, 3, seed=30)

    def const_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return c.expand_as(x).clone()

    with pytest.raises(
        imgdiff.InputValueError, match=r"^final_alpha_bar: inversion starts from the final level"
    ):
        DDIM(s, prediction="sample").invert(const_x0, x0, num_steps=3, progress=False)
    sampler = DDIM(s, prediction="sample", final_alpha_bar="first")
    x_T = sampler.invert(const_x0, x0, num_steps=3, progress=False)
    assert bool(torch.isfinite(x_T).all())


@pytest.mark.parametrize(
    ("sampler", "want"),
    [
        (DDPM(NoiseSchedule.linear()), [0, 1, 2, 3]),
        (DDPM(NoiseSchedule.linear(), variance="learned_range"), [0, 1, 2, 3]),
        (DDIM(NoiseSchedule.linear(), eta=0.5), [0, 1, 2, 3]),
        (DDIM(NoiseSchedule.linear()), []),
    ],
    ids=["ddpm", "ddpm-learned", "ddim-eta", "ddim"],
)
def test_noise_is_requested_only_for_steps_that_add_it(sampler: object, want: list[int]) -> None:
    """needs_noise: a step consumes noise only where it adds some. DDPM's step to the final level
    and DDIM's (sigma = 0 there) ask a step_noise function for nothing, and a generator is
    advanced by exactly the draws used (the next draw continues after them). [M05, I09]"""
    asked: list[int] = []
    x = _randn(2, 2, 3, 3, seed=31)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x)
        if getattr(sampler, "variance", None) == "learned_range":
            return torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    def fn(i: int) -> torch.Tensor:
        asked.append(i)
        return torch.zeros_like(x)

    sampler.sample(model, x, num_steps=5, step_noise=fn, progress=False)  # type: ignore[attr-defined]
    assert asked == want
    g = torch.Generator().manual_seed(4)
    sampler.sample(model, x, num_steps=5, generator=g, progress=False)  # type: ignore[attr-defined]
    ref = torch.Generator().manual_seed(4)
    for _ in want:
        imgdiff.randn(x.shape, generator=ref, dtype=F64)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))


# ---------------------------------------------------------------------------------- the loop


def test_generated_noise_is_drawn_in_the_state_dtype() -> None:
    """A float64 run with a generator uses float64 draws of that generator (torch draws float32
    and float64 differently), as injected float64 noise shows. [B11]"""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = _randn(2, 2, 3, 3, seed=15)
    n = 6
    a = DDPM(s).sample(
        model, x, num_steps=n, generator=torch.Generator().manual_seed(3), progress=False
    )
    g = torch.Generator().manual_seed(3)
    z = torch.stack(
        [imgdiff.randn((2, 2, 3, 3), generator=g, dtype=F64) for _ in range(n - 1)]
        + [torch.zeros(2, 2, 3, 3, dtype=F64)]
    )
    b = DDPM(s).sample(model, x, num_steps=n, step_noise=z, progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("as_function", [False, True])
def test_injected_noise_is_used_in_the_state_dtype(as_function: bool) -> None:
    """float64 step noise with a float32 state is rounded to float32 first: the run equals the
    same run given the float32 noise, bit for bit, and stays float32. [B09, B13]"""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 4, 4))
    x = _randn(2, 2, 4, 4, seed=16, dtype=torch.float32)
    z64 = _randn(5, 2, 2, 4, 4, seed=17)
    z32 = z64.float()
    for sampler in (DDIM(s, eta=1.0), DDPM(s)):
        noise64 = (lambda i: z64[i]) if as_function else z64
        a = sampler.sample(model, x, num_steps=5, step_noise=noise64, progress=False)
        b = sampler.sample(model, x, num_steps=5, step_noise=z32, progress=False)
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_state_dtype_applies_from_the_first_step() -> None:
    """DDIM(dtype=float32) with a float64 start computes in float32 from the first step: the
    result is float32 and equals the run started from the float32-rounded sample (the model run
    in float32 in both, since by default it would take the input's dtype). [B25]"""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = _randn(2, 2, 3, 3, seed=27)
    for sampler in (DDIM(s, dtype=torch.float32), DDPM(s, dtype=torch.float32)):
        kw = {
            "num_steps": 4,
            "generator": torch.Generator().manual_seed(1),
            "model_dtype": torch.float32,
            "progress": False,
        }
        a = sampler.sample(model, x, **kw)  # type: ignore[arg-type]
        kw["generator"] = torch.Generator().manual_seed(1)
        b = sampler.sample(model, x.float(), **kw)  # type: ignore[arg-type]
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_a_parameterless_model_runs_in_the_input_dtype() -> None:
    """Without parameters to read, the model sees the dtype of the tensor the caller passed,
    not the sampler's state dtype (float64 here), in every sampler and direction. [B21]"""
    s = NoiseSchedule.linear()
    seen: list[torch.dtype] = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return torch.tanh(x)

    x = _randn(1, 2, 3, 3, seed=28, dtype=torch.float32)
    DDIM(s, dtype=F64).sample(fn, x, num_steps=2, progress=False)
    DDIM(s, dtype=F64).invert(fn, x, num_steps=2, progress=False)
    DDPM(s, dtype=F64).sample(fn, x, num_steps=2, progress=False)
    EDICT(s).sample(fn, x, num_steps=2, progress=False)  # float64 state by default
    EDICT(s).invert(fn, x, num_steps=2, progress=False)
    assert len(seen) == 14
    assert set(seen) == {torch.float32}


def test_callback_replacement_is_cast_to_the_state_dtype() -> None:
    """A callback returning a float64 tensor for a float32 state: the loop carries on in float32
    (the result stays float32) and equals a restart from the float32-rounded replacement. [B19]"""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = _randn(1, 2, 3, 3, seed=18, dtype=torch.float32)
    sampler = DDIM(s)
    seen: list[torch.dtype] = []
    repl = _randn(1, 2, 3, 3, seed=19)

    def cb(info: imgdiff.StepInfo[torch.Tensor]) -> torch.Tensor | None:
        seen.append(info.state.dtype)
        return repl if info.index == 2 else None

    got = sampler.sample(model, x, num_steps=6, callback=cb, progress=False)
    assert got.dtype == torch.float32
    assert seen == [torch.float32] * 6
    ts = list(sampler.timesteps(6))
    want = sampler.sample(model, repl.float(), timesteps=ts[3:], progress=False)
    assert torch.equal(got, want)


def test_sampling_records_no_autograd_graph() -> None:
    """sample/invert run under no_grad: a network with trainable parameters gives outputs that
    do not require grad (no graph over all the steps is kept). [B26]"""
    s = NoiseSchedule.linear()
    net = torch.nn.Conv2d(2, 2, 1).double()
    model = lambda x, t: net(x)  # noqa: E731
    x = _randn(1, 2, 3, 3, seed=20)
    assert torch.is_grad_enabled()
    for out in (
        DDIM(s).sample(model, x, num_steps=3, progress=False),
        DDPM(s).sample(model, x, num_steps=3, progress=False),
        DDIM(s).invert(model, x, num_steps=3, progress=False),
        EDICT(s).sample(model, x, num_steps=3, progress=False),
        EDICT(s).invert(model, x, num_steps=3, progress=False)[0],
    ):
        assert not out.requires_grad
        assert out.grad_fn is None


def test_lazy_x0_hat_is_evaluated_at_most_once() -> None:
    """StepOutput.x0_hat computes a lazy estimate once and then returns that same tensor. [S03]"""
    calls: list[int] = []
    value = torch.ones(2)

    def lazy() -> torch.Tensor:
        calls.append(1)
        return value.clone()

    out = StepOutput(torch.zeros(2), lazy)
    first = out.x0_hat
    assert out.x0_hat is first
    assert len(calls) == 1


# ---------------------------------------------------------------------------------- EDICT


def _sd_edict(**kw: object) -> EDICT:
    return EDICT(NoiseSchedule.scaled_linear(), steps_offset=1, final_alpha_bar="first", **kw)  # type: ignore[arg-type]


def test_edict_run_returns_the_x_sequence() -> None:
    """The base-class loop (``run``, what ``sample`` is built on and what a captured graph replays)
    ends with ``final_sample``: x of the pair, as ``sample`` returns. [E06]"""
    model = TanhModel((2, 3, 3), scale=0.5)
    x = _randn(1, 2, 3, 3, seed=37)
    sampler = _sd_edict()
    got = sampler.run(model, x, sampler.plan(4), progress=False)
    px, py = sampler.sample_pair(model, x, num_steps=4, progress=False)
    assert not torch.allclose(px, py)
    assert torch.equal(got, px)


def test_edict_generation_x0_hat_is_from_the_first_model_call() -> None:
    """A generation step's x0_hat converts the first model call, made at the sequence that is
    *not* updated first (y at even steps, x at odd ones with leapfrog), at the step's input.
    [E11]
    """
    s = NoiseSchedule.scaled_linear()
    sampler = EDICT(s)
    model = TanhModel((2, 3, 3), scale=0.5)
    x = _randn(1, 2, 3, 3, seed=23)
    y = x + 0.3 * _randn(1, 2, 3, 3, seed=24)
    infos: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sampler.sample_pair(
        model,
        (x, y),
        num_steps=4,
        callback=lambda i: infos.append((i.timestep, i.x0_hat, *i.state)),
        progress=False,
    )
    prev = (x, y)
    for k, (t, x0_hat, sx, sy) in enumerate(infos):
        other = prev[1] if k % 2 == 0 else prev[0]
        eps = model(other, torch.full((1,), t))
        torch.testing.assert_close(x0_hat, _x0_from_eps(s, other, eps, t), rtol=0, atol=1e-12)
        prev = (sx, sy)


def test_edict_inversion_x0_hat_is_at_the_level_reached() -> None:
    """An inversion step's x0_hat converts the model output at the sequence it undid first, at the
    level it reached (its timestep): y at inverse rows of even generation index, else x. [E15]"""
    s = NoiseSchedule.scaled_linear()
    sampler = EDICT(s)
    model = TanhModel((2, 3, 3), scale=0.5)
    x0 = _randn(1, 2, 3, 3, seed=25)
    infos: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    n = 5
    sampler.invert(
        model,
        x0,
        num_steps=n,
        callback=lambda i: infos.append((i.timestep, i.x0_hat, *i.state)),
        progress=False,
    )
    assert len(infos) == n
    for k, (t, x0_hat, sx, sy) in enumerate(infos):
        generation_index = n - 1 - k
        undone_first = sy if generation_index % 2 == 0 else sx
        eps = model(undone_first, torch.full((1,), t))
        torch.testing.assert_close(
            x0_hat, _x0_from_eps(s, undone_first, eps, t), rtol=0, atol=1e-12
        )


def test_edict_mix_warning_threshold_is_0_9() -> None:
    """Spec 4.5: keep p >= 0.9. p = 0.9 is accepted silently; below it a PrecisionWarning. [E17]"""
    s = NoiseSchedule.scaled_linear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EDICT(s, mix=0.9)
    with pytest.warns(PrecisionWarning, match="mix=0.89"):
        EDICT(s, mix=0.89)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_edict_warns_for_every_state_dtype_below_float64(dtype: torch.dtype) -> None:
    """Exactness needs a float64 state: every lower-precision state dtype is warned about. [E22]"""
    with pytest.warns(PrecisionWarning, match="inversion is exact only to rounding"):
        EDICT(NoiseSchedule.scaled_linear(), dtype=dtype)
