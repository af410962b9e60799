"""Parity of imgdiff's DDIM, DDPM and DDIM inversion with diffusers' schedulers.

Each test runs imgdiff and the installed diffusers scheduler side by side on the same model,
starting sample and injected noise, and compares the numbers they produce: trajectories after
every step, posterior means and variances, timestep tables. Where diffusers is known to be wrong
(algorithms spec 1.4) the tests assert the difference instead.

Schedule tables: diffusers builds betas and ``alphas_cumprod`` in float32, imgdiff in float64.
The named constructors agree with diffusers to float32 precision
(``test_named_schedules_match_diffusers_tables``), but with imgdiff's own float64 tables
(``NoiseSchedule.linear()`` etc.) half of the 50-step DDIM trajectories (every leading-spacing
case) drift from diffusers' by more than the 1e-5 budget: up to 9.5e-5 (linear), 6.1e-5
(scaled_linear) and 3.4e-4 (cosine), against at most 8e-6 on the same table. The trajectory tests therefore build imgdiff's schedule with
``NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod.double())``: both libraries then
see the same table and any difference comes from the samplers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

import imgdiff
from imgdiff.errors import InputValueError
from imgdiff.timesteps import inference_timesteps

diffusers = pytest.importorskip("diffusers")
ddpm_module = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")

T = 1000
N = 50
SHAPE = (2, 3, 8, 8)
C = SHAPE[1]
TOL = 1e-5  # max abs difference of float32 states (values of order 1..4)
TOL64 = 1e-12  # one step of the same formulas evaluated in float64 (measured <= 2e-15)
TOL64_TRAJECTORY = 1e-11  # a float64 trajectory (measured <= 3.2e-13 after 50 DDIM steps)

# name: (diffusers config, imgdiff constructor); scaled_linear with Stable Diffusion's betas
# (diffusers' default beta_start/beta_end are the linear schedule's).
SCHEDULES: dict[str, tuple[dict[str, object], Callable[[], imgdiff.NoiseSchedule]]] = {
    "linear": ({"beta_schedule": "linear"}, imgdiff.NoiseSchedule.linear),
    "scaled_linear": (
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        imgdiff.NoiseSchedule.scaled_linear,
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, imgdiff.NoiseSchedule.cosine),
}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}

_gen = torch.Generator().manual_seed(20240611)
_CONV_WEIGHT = torch.randn(2 * C, C, 3, 3, generator=_gen) * 0.05
_CONV_BIAS = torch.randn(2 * C, generator=_gen) * 0.1
_PATTERN = torch.randn(2 * C, *SHAPE[2:], generator=_gen) * 1.5


def _features(x: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` timesteps and ``h = pattern + conv(x)`` (``2C`` channels) in ``x``'s dtype."""
    t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
    weight, bias, pattern = (p.to(x.dtype) for p in (_CONV_WEIGHT, _CONV_BIAS, _PATTERN))
    return t, pattern + torch.nn.functional.conv2d(x, weight, bias, padding=1)


def raw_model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """``0.5 tanh(pattern + conv(x)) + 0.1 sin(t)``: a bounded, nonlinear output of ``(x, t)``."""
    t, h = _features(x, t)
    return 0.5 * torch.tanh(h[:, :C]) + 0.1 * torch.sin(t.to(x.dtype)).reshape(-1, 1, 1, 1)


class ToyModel:
    """A fixed, deterministic, nonlinear model of ``(x, t)``, shared by both libraries.

    Its clean-sample guess is ``g(x, t) = 1.5 tanh(pattern + conv(x)) + 0.1 sin(t)`` (fixed
    random pattern and conv weights); it returns ``g`` expressed as ``prediction``
    (``eps = (x - a g)/s``, ``v = a eps - s g`` with ``a, s = sqrt(ab_t), sqrt(1 - ab_t)`` from
    a fixed table). Used as an epsilon output, a bounded output such as :func:`raw_model` is
    inconsistent with ``x``: ``x0_hat ~ x / sqrt(ab_t)`` then blows DDIM states up to 1e2..1e4,
    where float32 rounding alone (diffusers float32 vs diffusers float64) exceeds 1e-5. Through
    ``g`` the states stay of order 1 and ``|g|`` reaches 1.6, so clipping and thresholding act.
    The conv is small (Lipschitz constant of ``g`` below 1), so rounding differences are not
    amplified from step to step. Computes in the dtype of ``x``.

    ``variance``: ``None``; ``"range"`` appends ``C`` channels in ``(-1, 1)`` (learned_range);
    ``"log"`` appends ``C`` channels in ``(-6, -4)`` (a log-variance, for ``learned``).
    """

    def __init__(
        self, alphas_cumprod: torch.Tensor, prediction: str = "epsilon", variance: str | None = None
    ) -> None:
        self.alphas_cumprod = alphas_cumprod.detach().clone()
        self.prediction = prediction
        self.variance = variance

    def x0_guess(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``g(x, t)``, before any clipping."""
        t, h = _features(x, t)
        return 1.5 * torch.tanh(h[:, :C]) + 0.1 * torch.sin(t.to(x.dtype)).reshape(-1, 1, 1, 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t, h = _features(x, t)
        g = self.x0_guess(x, t)
        ab = self.alphas_cumprod.to(x.dtype)[t].reshape(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        eps = (x - a * g) / s
        out = eps if self.prediction == "epsilon" else a * eps - s * g
        if self.variance == "range":
            out = torch.cat([out, torch.tanh(h[:, C:])], dim=1)
        elif self.variance == "log":
            out = torch.cat([out, -5.0 + torch.tanh(h[:, C:])], dim=1)
        return out


def _noise(seed: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A starting sample ``(B, C, H, W)`` and per-step noise ``(steps, B, C, H, W)``, float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn((steps, *SHAPE), generator=g)


def _max_step_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b, strict=True))


def _imgdiff_states(run: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> list:
    """Run an imgdiff ``sample``/``invert`` and collect the state after every step."""
    states: list[torch.Tensor] = []
    run(*args, callback=lambda info: states.append(info.state.clone()), progress=False, **kwargs)
    return states


def _diffusers_ddim_states(
    sched: object,
    model: ToyModel,
    x: torch.Tensor,
    step_noise: torch.Tensor,
    *,
    eta: float,
    use_clipped_model_output: bool = False,
) -> list[torch.Tensor]:
    states = []
    for i, t in enumerate(sched.timesteps):
        out = model(x, t)
        x = sched.step(
            out,
            t,
            x,
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            variance_noise=step_noise[i].to(x.dtype) if eta > 0 else None,
        ).prev_sample
        states.append(x)
    return states


def _ddim_scheduler(schedule: str, **config: object) -> object:
    return diffusers.DDIMScheduler(num_train_timesteps=T, **SCHEDULES[schedule][0], **config)


def _same_table(sched: object) -> imgdiff.NoiseSchedule:
    """imgdiff's schedule on diffusers' float32 table (see the module docstring)."""
    return imgdiff.NoiseSchedule.from_alphas_cumprod(sched.alphas_cumprod.double())


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_named_schedules_match_diffusers_tables(schedule: str) -> None:
    """imgdiff's named schedules are diffusers' schedules up to diffusers' float32 rounding.

    This is what licenses building imgdiff's schedule from diffusers' table in the trajectory
    tests. Cosine's last ``alpha_bar`` differs by 1.3e-5 relative: ``1 - 0.999`` in float32.
    """
    config, make = SCHEDULES[schedule]
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, **config)
    ours = make()
    theirs_betas = sched.betas.double()
    theirs_ab = sched.alphas_cumprod.double()
    assert len(ours) == T
    torch.testing.assert_close(ours.betas, theirs_betas, rtol=5e-7, atol=0.0)
    torch.testing.assert_close(ours.alphas_cumprod[:-1], theirs_ab[:-1], rtol=2e-6, atol=0.0)
    torch.testing.assert_close(ours.alphas_cumprod[-1:], theirs_ab[-1:], rtol=2e-5, atol=0.0)


# --------------------------------------------------------------------------- DDIM trajectories


def _ddim_case(
    schedule: str, spacing: str, prediction: str, clip: bool, eta: float, alpha_to_one: bool
) -> object:
    case_id = (
        f"{schedule}-{spacing}-{prediction}-{'clip' if clip else 'noclip'}-eta{eta:g}-"
        f"{'one' if alpha_to_one else 'first'}"
    )
    return pytest.param(schedule, spacing, prediction, clip, eta, alpha_to_one, id=case_id)


DDIM_CASES = [
    _ddim_case(*combo)
    for combo in itertools.product(
        list(SCHEDULES),
        ["leading", "trailing"],
        ["epsilon", "v"],
        [False, True],
        [0.0, 1.0],
        [True, False],
    )
]


@pytest.mark.parametrize(
    ("schedule", "spacing", "prediction", "clip", "eta", "alpha_to_one"), DDIM_CASES
)
def test_ddim_trajectory_matches_diffusers(
    schedule: str, spacing: str, prediction: str, clip: bool, eta: float, alpha_to_one: bool
) -> None:
    """50 float32 DDIM steps: imgdiff's state equals DDIMScheduler's after every step (< 1e-5).

    Both loops run independently from the same noise with the same model; for eta=1 both get the
    same per-step noise (diffusers ``variance_noise``, imgdiff ``step_noise``).
    """
    sched = _ddim_scheduler(
        schedule,
        clip_sample=clip,
        set_alpha_to_one=alpha_to_one,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=spacing,
    )
    sched.set_timesteps(N)
    model = ToyModel(sched.alphas_cumprod, prediction)
    x, z = _noise(1, N)
    sampler = imgdiff.DDIM(
        _same_table(sched),
        prediction=prediction,
        spacing=spacing,
        eta=eta,
        final_alpha_bar="one" if alpha_to_one else "first",
        thresholding=imgdiff.Clip(1.0) if clip else None,
    )
    assert sampler.timesteps(N) == tuple(sched.timesteps.tolist())

    theirs = _diffusers_ddim_states(sched, model, x.clone(), z, eta=eta)
    ours = _imgdiff_states(sampler.sample, model, x.clone(), num_steps=N, step_noise=z)

    assert all(s.dtype == torch.float32 for s in ours)
    assert _max_step_error(ours, theirs) < TOL


@pytest.mark.parametrize("alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_ill_conditioned_cases_match_in_float64(
    clip: bool, eta: float, alpha_to_one: bool
) -> None:
    """The ill-conditioned cases (cosine, trailing, epsilon: sqrt(ab_999) = 4.9e-5) agree in float64.

    So any float32 difference there is rounding, not a different update.
    """
    sched = _ddim_scheduler(
        "cosine", clip_sample=clip, set_alpha_to_one=alpha_to_one, timestep_spacing="trailing"
    )
    sched.set_timesteps(N)
    model = ToyModel(sched.alphas_cumprod, "epsilon")
    schedule = _same_table(sched)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    x, z = _noise(1, N)
    sampler = imgdiff.DDIM(
        schedule,
        spacing="trailing",
        eta=eta,
        final_alpha_bar="one" if alpha_to_one else "first",
        thresholding=imgdiff.Clip(1.0) if clip else None,
    )
    theirs = _diffusers_ddim_states(sched, model, x.double(), z.double(), eta=eta)
    ours = _imgdiff_states(sampler.sample, model, x.double(), num_steps=N, step_noise=z.double())
    assert ours[0].dtype == torch.float64
    assert _max_step_error(ours, theirs) < TOL64_TRAJECTORY


def test_ddim_epsilon_step_at_low_alpha_bar_is_accurate_in_float32() -> None:
    """One float32 DDIM step from cosine t=999 is within 1e-5 of the float64 step (as diffusers' is).

    At this step the fused coefficients would be 632 and -631 and cancel in float32 (an error of
    6.6e-5); imgdiff forms x0_hat as (x - sigma eps) / alpha first there, like diffusers.
    """
    sched = _ddim_scheduler("cosine", clip_sample=False, timestep_spacing="trailing")
    sched.set_timesteps(N)
    model = ToyModel(sched.alphas_cumprod, "epsilon")
    sampler = imgdiff.DDIM(_same_table(sched), spacing="trailing")
    x, _ = _noise(1, N)
    t, prev = int(sched.timesteps[0]), int(sched.timesteps[1])
    out = model(x, t)
    exact = sampler.step_at(out.double(), x.double(), t, prev).state
    theirs32 = sched.step(out, t, x).prev_sample
    ours32 = sampler.step_at(out, x, t, prev).state
    assert float((theirs32.double() - exact).abs().max()) < TOL  # diffusers: 2.6e-6
    assert float((ours32.double() - exact).abs().max()) < TOL  # the fused form would err by 6.6e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("rederive_eps", [False, True])
@pytest.mark.parametrize(
    "threshold", ["clip", "dynamic-0.995", "dynamic-0.8"], ids=["clip", "dyn995", "dyn80"]
)
def test_ddim_thresholding_matches_diffusers(
    threshold: str, rederive_eps: bool, prediction: str
) -> None:
    """Static clipping and dynamic thresholding (sample_max_value=1.5) inside DDIM, eta=1.

    imgdiff's ``Clip``/``DynamicThreshold`` with ``rederive_eps`` equal diffusers'
    ``clip_sample``/``thresholding=True`` with ``use_clipped_model_output`` after every step
    (< 1e-5), and the thresholding really acts: the per-sample quantile lands strictly inside
    (1, 1.5) at some step, and the trajectory differs from the unthresholded one.
    """
    if threshold == "clip":
        config: dict[str, object] = {"clip_sample": True}
        ours_threshold: imgdiff.Thresholding = imgdiff.Clip(1.0)
        ratio = None
    else:
        ratio = float(threshold.split("-")[1])
        config = {
            "thresholding": True,
            "dynamic_thresholding_ratio": ratio,
            "sample_max_value": 1.5,
        }
        ours_threshold = imgdiff.DynamicThreshold(ratio=ratio, max_value=1.5)
    sched = _ddim_scheduler("linear", prediction_type=DIFFUSERS_PREDICTION[prediction], **config)
    sched.set_timesteps(N)
    model = ToyModel(sched.alphas_cumprod, prediction)
    x, z = _noise(2, N)

    def ddim(thresholding: imgdiff.Thresholding | None) -> imgdiff.DDIM:
        return imgdiff.DDIM(
            _same_table(sched),
            prediction=prediction,
            eta=1.0,
            thresholding=thresholding,
            rederive_eps=rederive_eps,
        )

    theirs = _diffusers_ddim_states(
        sched, model, x.clone(), z, eta=1.0, use_clipped_model_output=rederive_eps
    )
    ours = _imgdiff_states(ddim(ours_threshold).sample, model, x.clone(), num_steps=N, step_noise=z)
    plain = _imgdiff_states(ddim(None).sample, model, x.clone(), num_steps=N, step_noise=z)

    assert _max_step_error(ours, theirs) < TOL
    assert _max_step_error(plain, theirs) > 1e-2
    if ratio is not None:
        inputs = [x, *theirs[:-1]]
        quantiles = torch.stack(
            [
                torch.quantile(model.x0_guess(s, t).abs().reshape(SHAPE[0], -1), ratio, dim=1)
                for s, t in zip(inputs, sched.timesteps, strict=True)
            ]
        )
        assert bool(((quantiles > 1.0) & (quantiles < 1.5)).any())


# --------------------------------------------------------------------------- DDIM inversion


@pytest.mark.parametrize("alpha_to_one", [True, False], ids=["one", "first"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize(("spacing", "offset"), [("leading", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_inversion_matches_ddim_inverse_scheduler(
    schedule: str, spacing: str, offset: int, prediction: str, alpha_to_one: bool
) -> None:
    """``DDIM.invert`` equals DDIMInverseScheduler after every one of 50 float32 steps (< 1e-5).

    Same visiting order (the model sees the target timestep) and same first level
    (``set_alpha_to_one`` <-> ``final_alpha_bar``).
    """
    inv = diffusers.DDIMInverseScheduler(
        num_train_timesteps=T,
        **SCHEDULES[schedule][0],
        clip_sample=False,
        set_alpha_to_one=alpha_to_one,
        steps_offset=offset,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=spacing,
    )
    inv.set_timesteps(N)
    # Inversion moves to noisier levels (x coefficient sqrt(ab_next/ab) < 1), so a bounded raw
    # output keeps the states of order 1; ToyModel's epsilon, evaluated one level off (at the
    # target timestep), would be ~(x - g)/sqrt(1 - ab) and large.
    model = raw_model
    g = torch.Generator().manual_seed(3)
    x0 = 0.9 * torch.tanh(torch.randn(SHAPE, generator=g))

    theirs = []
    x = x0.clone()
    for t in inv.timesteps:
        x = inv.step(model(x, t), t, x).prev_sample
        theirs.append(x)

    sampler = imgdiff.DDIM(
        _same_table(inv),
        prediction=prediction,
        spacing=spacing,
        steps_offset=offset,
        final_alpha_bar="one" if alpha_to_one else "first",
    )
    ours: list[torch.Tensor] = []
    seen: list[int] = []

    def record(info: imgdiff.StepInfo) -> None:
        ours.append(info.state.clone())
        seen.append(info.timestep)

    sampler.invert(model, x0.clone(), num_steps=N, callback=record, progress=False)

    assert seen == inv.timesteps.tolist()
    assert _max_step_error(ours, theirs) < TOL


# --------------------------------------------------------------------------- DDPM


class _InjectedNoise:
    """Stand-in for diffusers' ``randn_tensor`` inside DDPMScheduler.step: returns ``self.z``."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None

    def __call__(self, shape: object, generator: object = None, device: object = None, dtype=None):
        assert self.z is not None
        return self.z.to(dtype)


@pytest.fixture
def ddpm_noise(monkeypatch: pytest.MonkeyPatch) -> _InjectedNoise:
    noise = _InjectedNoise()
    monkeypatch.setattr(ddpm_module, "randn_tensor", noise)
    return noise


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("num_steps", [T, N], ids=["full", "strided"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_posterior_matches_diffusers(
    ddpm_noise: _InjectedNoise, variance: str, num_steps: int, clip: bool
) -> None:
    """DDPM posterior mean and variance equal DDPMScheduler's at every step (float64, 1e-12).

    Mean: diffusers ``step`` with zero noise; variance: ``_get_variance(t, predicted_variance)``
    (a variance for fixed types, a log-variance for learned_range). Also the noisy step
    (``step_at`` with the same noise) and a whole ``DDPM.sample`` run match. The strided run
    (50 leading steps) checks that imgdiff's next timestep is diffusers' ``previous_timestep``.

    float64 because diffusers evaluates ``1 - ab_t/ab_prev`` in float32, which is off by up to
    6e-4 relative near t=0 (see ``test_ddpm_float32_sampling_tracks_diffusers_float64``).
    """
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=clip)
    learned = variance == "learned_range"
    model = ToyModel(sched.alphas_cumprod, "epsilon", "range" if learned else None)
    schedule = _same_table(sched)
    if num_steps != T:
        sched.set_timesteps(num_steps)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    ddpm = imgdiff.DDPM(
        schedule, variance=variance, thresholding=imgdiff.Clip(1.0) if clip else None
    )
    plan = ddpm.plan(num_steps)
    assert plan.timesteps.tolist() == sched.timesteps.tolist()
    assert plan.next_timesteps.tolist() == [
        int(sched.previous_timestep(t)) for t in sched.timesteps
    ]
    coeffs = ddpm.coefficients(plan).unbind()
    x_start, z32 = _noise(4, num_steps)
    z = z32.double()

    x = x_start.double()
    theirs = []
    err_mean = err_var = err_step = 0.0
    for i, t in enumerate(sched.timesteps):
        out = model(x, t)
        ddpm_noise.z = torch.zeros_like(x)
        mean_theirs = sched.step(out, t, x).prev_sample
        var_theirs = sched._get_variance(t, predicted_variance=out[:, C:] if learned else None)
        mean_ours, log_var_ours, _ = ddpm.posterior(x, out, coeffs[i])
        err_mean = max(err_mean, float((mean_ours - mean_theirs).abs().max()))
        if learned:
            assert isinstance(log_var_ours, torch.Tensor)
            err_var = max(err_var, float((log_var_ours - var_theirs).abs().max()))
        else:
            var_ours = torch.exp(torch.tensor(log_var_ours, dtype=torch.float64))
            err_var = max(err_var, float((var_ours / var_theirs - 1.0).abs()))

        ddpm_noise.z = z[i]
        x_next = sched.step(out, t, x).prev_sample
        prev = int(plan.next_timesteps[i])
        step_ours = ddpm.step_at(out, x, int(t), prev, noise=z[i]).state
        err_step = max(err_step, float((step_ours - x_next).abs().max()))
        theirs.append(x_next)
        x = x_next

    assert err_mean < TOL64
    assert err_var < TOL64
    assert err_step < TOL64
    ours = _imgdiff_states(ddpm.sample, model, x_start.double(), num_steps=num_steps, step_noise=z)
    assert _max_step_error(ours, theirs) < TOL64_TRAJECTORY


@pytest.mark.parametrize("num_steps", [T, N], ids=["full", "strided"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_float32_sampling_tracks_diffusers_float64(
    ddpm_noise: _InjectedNoise, variance: str, num_steps: int
) -> None:
    """A float32 ``DDPM.sample`` run stays within 1e-5 of DDPMScheduler's float64 run, every step.

    The reference is diffusers' loop on its own table cast to float64, with the same noise.
    diffusers' float32 run itself is further off over 1000 steps (1.4e-4 measured): it forms
    ``beta_t = 1 - ab_t/ab_prev`` in float32, which loses ~4 digits where beta is 1e-4.
    """
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, variance_type=variance, clip_sample=False
    )
    learned = variance == "learned_range"
    model = ToyModel(sched.alphas_cumprod, "epsilon", "range" if learned else None)
    ddpm = imgdiff.DDPM(_same_table(sched), variance=variance)
    if num_steps != T:
        sched.set_timesteps(num_steps)
    x_start, z = _noise(4, num_steps)

    def diffusers_states(dtype: torch.dtype) -> list[torch.Tensor]:
        states, x = [], x_start.to(dtype)
        for i, t in enumerate(sched.timesteps):
            ddpm_noise.z = z[i]
            x = sched.step(model(x, t), t, x).prev_sample
            states.append(x)
        return states

    ours = _imgdiff_states(ddpm.sample, model, x_start.clone(), num_steps=num_steps, step_noise=z)
    theirs32 = diffusers_states(torch.float32)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    theirs64 = diffusers_states(torch.float64)

    assert ours[-1].dtype == torch.float32
    assert _max_step_error(ours, theirs64) < TOL
    if num_steps == T:
        assert _max_step_error(theirs32, theirs64) > 5e-5


def test_ddpm_learned_variance_is_a_log_variance_unlike_diffusers(
    ddpm_noise: _InjectedNoise,
) -> None:
    """``variance="learned"``: imgdiff reads the extra channels as log Sigma (improved DDPM).

    diffusers' ``learned`` returns the raw channels as the variance itself. Fed ``exp(v)``,
    diffusers gives imgdiff's variance ``exp(v)`` and the same noisy step; fed ``v`` it does not.
    """
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=T, variance_type="learned", clip_sample=False
    )
    model = ToyModel(sched.alphas_cumprod, "epsilon", "log")
    schedule = _same_table(sched)
    sched.set_timesteps(N)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    ddpm = imgdiff.DDPM(schedule, variance="learned", spacing="leading")
    plan = ddpm.plan(N)
    coeffs = ddpm.coefficients(plan).unbind()
    x_start, z32 = _noise(5, N)
    x = x_start.double()
    for i, t in enumerate(sched.timesteps):
        out = model(x, t)
        v = out[:, C:]
        _, log_var_ours, _ = ddpm.posterior(x, out, coeffs[i])
        assert isinstance(log_var_ours, torch.Tensor)
        torch.testing.assert_close(log_var_ours, v, rtol=0.0, atol=0.0)

        raw = sched._get_variance(t, predicted_variance=v)
        fed_exp = sched._get_variance(t, predicted_variance=torch.exp(v))
        torch.testing.assert_close(torch.exp(log_var_ours), fed_exp, rtol=TOL64, atol=0.0)
        assert float((raw - torch.exp(log_var_ours)).abs().min()) > 1e-3  # v in (-6, -4)

        ddpm_noise.z = z32[i].double()
        out_for_diffusers = torch.cat([out[:, :C], torch.exp(v)], dim=1)
        x_theirs = sched.step(out_for_diffusers, t, x).prev_sample
        prev = int(plan.next_timesteps[i])
        x_ours = ddpm.step_at(out, x, int(t), prev, noise=z32[i].double()).state
        torch.testing.assert_close(x_ours, x_theirs, rtol=0.0, atol=TOL64)
        x = x_theirs


# --------------------------------------------------------------------------- timesteps


def _stride_count(stride: int) -> int:
    """An inference step count ``n`` with ``T // n == stride`` (what DDIMScheduler subtracts)."""
    for n in range(1, T + 1):
        if T // n == stride:
            return n
    raise AssertionError(f"no n with {T} // n == {stride}")


@pytest.mark.parametrize(("spacing", "num_steps"), [("trailing", 30), ("linspace", 50)])
def test_ddim_uses_the_listed_previous_timestep_where_diffusers_does_not(
    spacing: str, num_steps: int
) -> None:
    """Spec 1.4: DDIMScheduler steps to ``t - T//N``, wrong for trailing N=30 and linspace N=50.

    imgdiff's plan steps to the next listed timestep; diffusers' own ``step`` forced onto that
    timestep (via ``num_inference_steps``) gives imgdiff's trajectory (< 1e-5), while plain
    diffusers ends elsewhere.
    """
    sched = _ddim_scheduler(
        "scaled_linear", clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing
    )
    sched.set_timesteps(num_steps)
    listed = sched.timesteps.tolist()
    shifted = [*listed[1:], -1]
    sampler = imgdiff.DDIM(_same_table(sched), spacing=spacing, final_alpha_bar="first")
    plan = sampler.plan(num_steps)
    assert plan.timesteps.tolist() == listed
    assert plan.next_timesteps.tolist() == shifted
    diffusers_prev = [max(t - T // num_steps, -1) for t in listed]
    wrong = sum(p != s for p, s in zip(diffusers_prev, shifted, strict=True))
    assert wrong >= num_steps // 3

    model = ToyModel(sched.alphas_cumprod, "epsilon")
    x, z = _noise(6, num_steps)
    ours = _imgdiff_states(sampler.sample, model, x.clone(), num_steps=num_steps)
    plain = _diffusers_ddim_states(sched, model, x.clone(), z, eta=0.0)

    forced = []
    y = x.clone()
    for t, s in zip(listed, shifted, strict=True):
        # step() subtracts T // num_inference_steps; pick a count whose stride lands on s
        # (s = -1: any stride > t, e.g. n = 1).
        sched.num_inference_steps = 1 if s < 0 else _stride_count(t - s)
        y = sched.step(model(y, torch.tensor(t)), t, y).prev_sample
        forced.append(y)
    sched.num_inference_steps = num_steps

    assert _max_step_error(ours, forced) < TOL
    assert _max_step_error(ours, plain) > 1e-3
    assert float((ours[-1] - plain[-1]).abs().max()) > 1e-3


def test_diffusers_trailing_can_return_an_extra_negative_timestep() -> None:
    """diffusers' trailing spacing gives N+1 timesteps ending in -1 for some N (e.g. N=61).

    imgdiff returns exactly N timesteps in [0, T-1]: diffusers' list without the extra entry.
    """
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    sched.set_timesteps(61)
    theirs = sched.timesteps.tolist()
    assert len(theirs) == 62
    assert theirs[-1] == -1
    ours = inference_timesteps(T, 61, "trailing")
    assert len(ours) == 61
    assert all(0 <= t <= T - 1 for t in ours)
    assert list(ours) == theirs[:61]
    assert imgdiff.DDIM(imgdiff.NoiseSchedule.linear(), spacing="trailing").timesteps(61) == ours

    bad = []
    for n in range(1, T + 1):
        sched.set_timesteps(n)
        table = sched.timesteps.tolist()
        if len(table) != n:
            assert len(table) == n + 1
            assert table[-1] == -1
            assert list(inference_timesteps(T, n, "trailing")) == table[:n]
            bad.append(n)
    assert 61 in bad


@pytest.mark.parametrize(
    ("spacing", "offset"),
    [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)],
    ids=["leading", "leading-offset1", "trailing", "linspace"],
)
def test_timestep_tables_match_diffusers(spacing: str, offset: int) -> None:
    """``inference_timesteps`` equals diffusers' ``set_timesteps`` for every N in 1..1000.

    Skipped: the trailing N where diffusers appends -1 (previous test) and leading offset 1 with
    N=1000, where diffusers returns timestep 1000 (out of range) and imgdiff raises.
    """
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset
    )
    compared = 0
    for n in range(1, T + 1):
        sched.set_timesteps(n)
        theirs = sched.timesteps.tolist()
        if spacing == "trailing" and len(theirs) != n:
            continue
        if max(theirs) > T - 1:
            assert (spacing, offset, n) == ("leading", 1, T)
            with pytest.raises(InputValueError):
                inference_timesteps(T, n, spacing, offset)
            continue
        assert list(inference_timesteps(T, n, spacing, offset)) == theirs, n
        compared += 1
    assert compared > 900
    sampler = imgdiff.DDIM(imgdiff.NoiseSchedule.linear(), spacing=spacing, steps_offset=offset)
    sched.set_timesteps(N)
    assert list(sampler.timesteps(N)) == sched.timesteps.tolist()
