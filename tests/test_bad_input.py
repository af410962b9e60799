"""Bad input to every public entry point raises an imgdiff error that names the argument.

Project rule: wrong shapes, dtypes, ranges or step counts raise :class:`imgdiff.InputValueError`
or :class:`imgdiff.InputTypeError` (both :class:`imgdiff.ImgdiffError`) whose message names the
argument, what was expected and what came; never a traceback from deep inside torch, a silent
broadcast or NaN. Entry points also leave every tensor the caller passed unchanged.

"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import imgdiff
from imgdiff import (
    DDIM,
    DDPM,
    Clip,
    DynamicThreshold,
    EmpiricalDenoiser,
    GaussianDenoiser,
    NoiseSchedule,
    add_noise,
    inference_timesteps,
    karras_sigmas,
    randn,
    respace_timesteps,
    respaced_betas,
    sigma_to_timestep,
    training_target,
)
from imgdiff.losses import (
    denoising_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    min_snr_weight,
    min_snr_weight_from_alpha_bar,
    normal_kl,
    vlb_term,
)
from imgdiff.prediction import (
    convert_prediction,
    eps_from_v,
    eps_from_x0,
    linear_prediction_coefficients,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from imgdiff.timesteps import SamplingPlan

from .conftest import backends_here, device_for

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError

T = 20
SCHEDULE = NoiseSchedule.linear(T)
ZSNR = SCHEDULE.rescale_zero_terminal_snr()  # alpha_bar[T-1] == 0
# W differs from B and C, so a (W,) tensor can never pass for a per-sample (B,) one.
B, C, H, W = 2, 3, 4, 5
SHAPE = (B, C, H, W)
STEPS = 3


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def zero_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def affine_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Depends on x and t, so every coefficient of a step matters."""
    return 0.5 * x + 0.01 * t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def learned_variance_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.cat([0.5 * x, torch.zeros_like(x)], dim=1)


def _sample(sampler: imgdiff.Sampler, model=zero_model, noise=None, **kw) -> torch.Tensor:
    kw.setdefault("num_steps", STEPS)
    kw.setdefault("progress", False)
    return sampler.sample(model, _randn(*SHAPE) if noise is None else noise, **kw)


def _invert(sampler: DDIM, model=zero_model, x0=None, **kw) -> torch.Tensor:
    kw.setdefault("num_steps", STEPS)
    kw.setdefault("progress", False)
    return sampler.invert(model, _randn(*SHAPE) if x0 is None else x0, **kw)


def _case(fn: Callable[[], object], exc: type[Exception], pattern: str, id: str):
    return pytest.param(fn, exc, pattern, id=id)


def _check(fn: Callable[[], object], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        fn()


# ====================================================================== the error classes


def test_error_hierarchy():
    assert issubclass(IVE, ValueError)
    assert issubclass(IVE, imgdiff.ImgdiffError)
    assert issubclass(ITE, TypeError)
    assert issubclass(ITE, imgdiff.ImgdiffError)
    assert not issubclass(imgdiff.ImgdiffError, (ValueError, TypeError))
    # one category filters every imgdiff warning: warnings.filterwarnings(..., imgdiff.ImgdiffWarning)
    for warning in (imgdiff.PrecisionWarning, imgdiff.PerformanceWarning):
        assert issubclass(warning, imgdiff.ImgdiffWarning)


def test_numpy_scalars_count_as_ints_and_floats():
    """Step counts, timesteps and strengths from numpy (an ``np.arange`` sweep) are accepted and
    give what the Python numbers give; numpy bools are not ints."""
    s = NoiseSchedule.linear()
    x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert torch.equal(add_noise(s, x0, noise, np.int64(5)), add_noise(s, x0, noise, 5))
    model = GaussianDenoiser(s)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    a = DDIM(s).sample(model, x, num_steps=np.int64(3), strength=np.float32(0.5), progress=False)
    b = DDIM(s).sample(model, x, num_steps=3, strength=0.5, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ITE, match=r"^num_steps: expected an int, got"):
        DDIM(s).sample(model, x, num_steps=np.bool_(True), progress=False)


# ====================================================================== NoiseSchedule

SCHEDULE_CASES = [
    # -- step count
    _case(
        lambda: NoiseSchedule.linear(1),
        IVE,
        r"^num_train_timesteps: expected an int >= 2, got 1",
        "linear-T1",
    ),
    _case(
        lambda: NoiseSchedule.linear(0), IVE, r"^num_train_timesteps: .*>= 2, got 0", "linear-T0"
    ),
    _case(
        lambda: NoiseSchedule.linear(20.0),
        ITE,
        r"^num_train_timesteps: expected an int, got 20\.0",
        "linear-T-float",
    ),
    _case(lambda: NoiseSchedule.linear(True), ITE, r"^num_train_timesteps: ", "linear-T-bool"),
    _case(lambda: NoiseSchedule.scaled_linear(1), IVE, r"^num_train_timesteps: ", "scaled-T1"),
    _case(lambda: NoiseSchedule.cosine(1), IVE, r"^num_train_timesteps: ", "cosine-T1"),
    _case(lambda: NoiseSchedule.sigmoid(1), IVE, r"^num_train_timesteps: ", "sigmoid-T1"),
    _case(lambda: NoiseSchedule.sigmoid_chen(1), IVE, r"^num_train_timesteps: ", "chen-T1"),
    _case(lambda: NoiseSchedule.sigmoid_chen(20.5), ITE, r"^num_train_timesteps: ", "chen-T-float"),
    # -- beta range
    _case(
        lambda: NoiseSchedule.linear(T, beta_start=0.0),
        IVE,
        r"^beta_start: expected a float > 0\.0, got 0\.0",
        "linear-start-0",
    ),
    _case(
        lambda: NoiseSchedule.linear(T, beta_start=-1e-4),
        IVE,
        r"^beta_start: expected a float > 0\.0, got -0\.0001",
        "linear-start-neg",
    ),
    _case(
        lambda: NoiseSchedule.linear(T, beta_end=1.5),
        IVE,
        r"^beta_end: expected a float <= 1\.0, got 1\.5",
        "linear-end-gt-1",
    ),
    _case(
        lambda: NoiseSchedule.linear(T, beta_start=float("nan")),
        IVE,
        r"^beta_start: expected a finite float, got nan",
        "linear-start-nan",
    ),
    _case(
        lambda: NoiseSchedule.linear(T, beta_end="0.02"),
        ITE,
        r"^beta_end: expected a float, got '0\.02'",
        "linear-end-str",
    ),
    _case(
        lambda: NoiseSchedule.scaled_linear(T, beta_end=0.0),
        IVE,
        r"^beta_end: expected a float > 0\.0, got 0\.0",
        "scaled-end-0",
    ),
    _case(
        lambda: NoiseSchedule.sigmoid(T, beta_start=2.0),
        IVE,
        r"^beta_start: expected a float <= 1\.0, got 2\.0",
        "sigmoid-start-gt-1",
    ),
    # -- cosine
    _case(
        lambda: NoiseSchedule.cosine(T, s=-0.1),
        IVE,
        r"^s: expected a float >= 0\.0, got -0\.1",
        "cosine-s-neg",
    ),
    _case(
        lambda: NoiseSchedule.cosine(T, s=float("inf")),
        IVE,
        r"^s: expected a finite float, got inf",
        "cosine-s-inf",
    ),
    _case(
        lambda: NoiseSchedule.cosine(T, max_beta=0.0),
        IVE,
        r"^max_beta: expected a float > 0\.0, got 0\.0",
        "cosine-max-beta-0",
    ),
    _case(
        lambda: NoiseSchedule.cosine(T, max_beta=1.5),
        IVE,
        r"^max_beta: expected a float <= 1\.0, got 1\.5",
        "cosine-max-beta-gt-1",
    ),
    # -- sigmoid_chen
    _case(
        lambda: NoiseSchedule.sigmoid_chen(T, start=1.0, end=1.0),
        IVE,
        r"^end: expected a value > start \(1\.0\), got 1\.0",
        "chen-end-eq-start",
    ),
    _case(
        lambda: NoiseSchedule.sigmoid_chen(T, start=3.0, end=-3.0),
        IVE,
        r"^end: expected a value > start \(3\.0\), got -3\.0",
        "chen-end-lt-start",
    ),
    _case(
        lambda: NoiseSchedule.sigmoid_chen(T, tau=0.0),
        IVE,
        r"^tau: expected a float > 0\.0, got 0\.0",
        "chen-tau-0",
    ),
    _case(
        lambda: NoiseSchedule.sigmoid_chen(T, max_beta=-0.5),
        IVE,
        r"^max_beta: expected a float > 0\.0, got -0\.5",
        "chen-max-beta-neg",
    ),
    # -- from_betas
    _case(
        lambda: NoiseSchedule.from_betas([0.1]),
        IVE,
        r"^betas: expected at least 2 training timesteps, got 1",
        "betas-T1",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([]),
        IVE,
        r"^betas: expected at least 2 training timesteps, got 0",
        "betas-empty",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([0.0, 0.1]),
        IVE,
        r"^betas: expected values in \(0, 1\], got min 0\.0 and max 0\.1",
        "betas-zero",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([-0.1, 0.1]),
        IVE,
        r"^betas: expected values in \(0, 1\], got min -0\.1",
        "betas-negative",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([0.1, 1.5]),
        IVE,
        r"^betas: expected values in \(0, 1\], got min 0\.1 and max 1\.5",
        "betas-gt-1",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([0.1, 1.0, 0.5]),
        IVE,
        r"^betas: expected beta < 1 before the last timestep",
        "betas-one-before-last",
    ),
    _case(
        lambda: NoiseSchedule.from_betas([0.1, float("nan")]),
        IVE,
        r"^betas: expected finite values, got NaN or infinity",
        "betas-nan",
    ),
    _case(
        lambda: NoiseSchedule.from_betas(torch.tensor([0.1, float("inf")])),
        IVE,
        r"^betas: expected finite values, got NaN or infinity",
        "betas-inf-tensor",
    ),
    _case(
        lambda: NoiseSchedule.from_betas(torch.full((2, 3), 0.1)),
        IVE,
        r"^betas: expected a tensor with 1 dimensions, got shape \(2, 3\)",
        "betas-2d",
    ),
    _case(
        lambda: NoiseSchedule.from_betas(["a", "b"]),
        imgdiff.ImgdiffError,
        r"^betas: expected a 1-d sequence of floats",
        "betas-strings",
    ),
    # -- from_alphas_cumprod
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.5, 0.9]),
        IVE,
        r"^alphas_cumprod: expected a strictly decreasing sequence",
        "abar-increasing",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.5, 0.5, 0.1]),
        IVE,
        r"^alphas_cumprod: expected a strictly decreasing sequence",
        "abar-non-decreasing",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([1.0, 0.5]),
        IVE,
        r"^alphas_cumprod: expected values in \(0, 1\) \(the last may be 0\), got first 1\.0",
        "abar-first-one",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([1.5, 0.5]),
        IVE,
        r"^alphas_cumprod: expected values in \(0, 1\).*got first 1\.5",
        "abar-gt-1",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.5, -0.1]),
        IVE,
        r"^alphas_cumprod: expected values in \(0, 1\).*last -0\.1",
        "abar-negative-last",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.9, 0.0, 0.0]),
        IVE,
        r"^alphas_cumprod: expected values in \(0, 1\) \(the last may be 0\)",
        "abar-zero-before-last",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.9, float("nan"), 0.1]),
        IVE,
        r"^alphas_cumprod: expected finite values, got NaN",
        "abar-nan",
    ),
    _case(
        lambda: NoiseSchedule.from_alphas_cumprod([0.9]),
        IVE,
        r"^alphas_cumprod: expected at least 2 training timesteps, got 1",
        "abar-T1",
    ),
    # -- alpha_bar_at
    _case(
        lambda: SCHEDULE.alpha_bar_at(torch.tensor([1.0, 2.0])),
        ITE,
        r"^t: expected an integer tensor of timesteps, got dtype torch\.float32",
        "alpha-bar-at-float",
    ),
    _case(
        lambda: SCHEDULE.alpha_bar_at(T),
        IVE,
        r"^t: expected a timestep in \[-1, 19\], got 20",
        "alpha-bar-at-T",
    ),
    _case(
        lambda: SCHEDULE.alpha_bar_at(torch.tensor([0, -2])),
        IVE,
        r"^t: expected timesteps in \[-1, 19\], got values from -2 to 0",
        "alpha-bar-at-neg",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), SCHEDULE_CASES)
def test_schedule_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: NoiseSchedule.from_betas(torch.full((1000,), 0.9)), id="from_betas"),
        pytest.param(lambda: NoiseSchedule.linear(1000, 0.5, 0.99), id="linear"),
    ],
)
def test_schedule_rejects_alpha_bar_underflow(build):
    with pytest.raises(IVE, match=r"beta.*alpha_bar|alpha_bar.*beta"):
        build()


def test_sigmoid_chen_saturation_names_its_arguments():
    with pytest.raises(IVE, match=r"^(tau|start|end): "):
        NoiseSchedule.sigmoid_chen(T, tau=0.01)


def test_schedule_cannot_be_mutated():
    with pytest.raises(AttributeError, match="immutable"):
        SCHEDULE.foo = 1  # type: ignore[attr-defined]
    SCHEDULE.betas.zero_()
    SCHEDULE.alphas_cumprod.zero_()
    assert float(SCHEDULE.alphas_cumprod[0]) > 0.99


def test_paired_inputs_follow_the_first_ones_dtype_and_device():
    """add_noise returns x0's dtype and x0_from_eps x_t's, as documented, for a float64 partner
    (they returned float64); a partner on another device is named, not a raw torch error."""
    from imgdiff.prediction import x0_from_eps
    from imgdiff.timesteps import respaced_betas

    x0, noise = torch.rand(2, 3), torch.randn(2, 3, dtype=torch.float64)
    out = add_noise(SCHEDULE, x0, noise, 5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, add_noise(SCHEDULE, x0, noise.float(), 5), rtol=0, atol=0)
    assert x0_from_eps(x0, noise, 0.5).dtype == torch.float32
    with pytest.raises(IVE, match=r"^noise: expected a tensor on x0's device cpu, got meta"):
        add_noise(SCHEDULE, x0, torch.ones(2, 3, device="meta"), 5)
    with pytest.raises(IVE, match=r"^eps: expected a tensor on x_t's device cpu, got meta"):
        x0_from_eps(x0, torch.ones(2, 3, device="meta"), 0.5)
    # respaced_betas takes the integer tensors the samplers take
    torch.testing.assert_close(
        respaced_betas(SCHEDULE, torch.tensor([18, 9, 0])),
        respaced_betas(SCHEDULE, [18, 9, 0]),
        rtol=0,
        atol=0,
    )
    # a diffusers config ("trailing", steps_offset=1) gets told what the offset means here
    with pytest.raises(IVE, match=r"diffusers applies steps_offset to 'leading' spacing only"):
        DDIM(SCHEDULE, spacing="trailing", steps_offset=1).timesteps(10)


def test_schedule_constructor_validates_and_copies_its_tables():
    """``NoiseSchedule(betas, alphas_cumprod)`` keeps float64 copies of consistent tables and
    names bad ones (it trusted and aliased them: a float32 table, an alpha_bar above 1, a
    later write into the caller's tensor all reached the schedule)."""
    import pickle

    b32, ab32 = SCHEDULE.betas.float(), SCHEDULE.alphas_cumprod.float()
    s = NoiseSchedule(b32, ab32.double())
    assert s.betas.dtype == torch.float64
    b32[:] = 0.5
    assert float(s.betas[0]) < 1e-3
    assert pickle.loads(pickle.dumps(SCHEDULE)) == SCHEDULE
    with pytest.raises(IVE, match=r"^alphas_cumprod: expected values in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.5, 2.0]), torch.tensor([0.5, -0.5]))
    with pytest.raises(IVE, match=r"^betas: expected alphas_cumprod = cumprod\(1 - betas\)"):
        NoiseSchedule(torch.tensor([0.1, 0.1]), torch.tensor([0.5, 0.4]))
    with pytest.raises(IVE, match=r"^betas: expected shape \(2,\) like alphas_cumprod"):
        NoiseSchedule(torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.9, 0.81]))


# ====================================================================== karras_sigmas, sigma_to_timestep

KARRAS_CASES = [
    _case(
        lambda: karras_sigmas(SCHEDULE, 1),
        IVE,
        r"^num_steps: expected an int >= 2, got 1",
        "num-steps-1",
    ),
    _case(lambda: karras_sigmas(SCHEDULE, 0), IVE, r"^num_steps: .*got 0", "num-steps-0"),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5.0),
        ITE,
        r"^num_steps: expected an int, got 5\.0",
        "num-steps-float",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, rho=0.0),
        IVE,
        r"^rho: expected a float > 0\.0, got 0\.0",
        "rho-0",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, sigma_min=0.0),
        IVE,
        r"^sigma_min: expected 0 < sigma_min < sigma_max \([0-9.]+\), got 0\.0",
        "sigma-min-0",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, sigma_min=-1.0),
        IVE,
        r"^sigma_min: expected a float >= 0\.0, got -1\.0",
        "sigma-min-neg",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, sigma_min=10.0, sigma_max=1.0),
        IVE,
        r"^sigma_min: expected 0 < sigma_min < sigma_max \(1\.0\), got 10\.0",
        "sigma-min-gt-max",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, sigma_max=0.0),
        IVE,
        r"^sigma_max: expected a float > 0\.0, got 0\.0",
        "sigma-max-0",
    ),
    _case(
        lambda: karras_sigmas(SCHEDULE, 5, sigma_max=float("inf")),
        IVE,
        r"^sigma_max: expected a finite float, got inf",
        "sigma-max-inf",
    ),
    _case(
        lambda: karras_sigmas(ZSNR, 5),
        IVE,
        r"^sigma_max: .*infinite \(zero terminal SNR\); expected an explicit finite sigma_max",
        "zero-terminal-snr-without-sigma-max",
    ),
    _case(
        lambda: sigma_to_timestep(torch.tensor([1.0, 0.0]), SCHEDULE),
        IVE,
        r"^sigmas: expected positive finite noise levels",
        "s2t-zero",
    ),
    _case(
        lambda: sigma_to_timestep(torch.tensor([-1.0, 2.0]), SCHEDULE),
        IVE,
        r"^sigmas: expected positive finite noise levels",
        "s2t-negative",
    ),
    _case(
        lambda: sigma_to_timestep(torch.tensor([float("inf")]), SCHEDULE),
        IVE,
        r"^sigmas: expected positive finite noise levels",
        "s2t-inf",
    ),
    _case(
        lambda: sigma_to_timestep(torch.tensor([float("nan")]), SCHEDULE),
        IVE,
        r"^sigmas: expected positive finite noise levels",
        "s2t-nan",
    ),
    _case(
        lambda: sigma_to_timestep(torch.tensor([1, 2]), SCHEDULE),
        ITE,
        r"^sigmas: expected a floating-point tensor, got dtype torch\.int64",
        "s2t-int",
    ),
    _case(
        lambda: sigma_to_timestep([1.0, 2.0], SCHEDULE),
        ITE,
        r"^sigmas: expected a torch\.Tensor, got object of type list",
        "s2t-list",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), KARRAS_CASES)
def test_karras_and_sigma_to_timestep_reject(fn, exc, pattern):
    _check(fn, exc, pattern)


def test_karras_zero_terminal_snr_with_sigma_max_is_finite():
    sig = karras_sigmas(ZSNR, 5, sigma_max=80.0)
    assert sig.shape == (6,)
    assert torch.isfinite(sig).all()
    t = sigma_to_timestep(sig[:-1], ZSNR)
    assert torch.isfinite(t).all()
    assert float(t.min()) >= 0.0
    assert float(t.max()) <= T - 1


# ====================================================================== inference_timesteps

INFERENCE_CASES = [
    _case(
        lambda: inference_timesteps(1000, 0),
        IVE,
        r"^num_steps: expected an int >= 1, got 0",
        "num-steps-0",
    ),
    _case(
        lambda: inference_timesteps(1000, -5),
        IVE,
        r"^num_steps: expected an int >= 1, got -5",
        "num-steps-neg",
    ),
    _case(
        lambda: inference_timesteps(1000, 1001),
        IVE,
        r"^num_steps: expected an int <= 1000, got 1001",
        "num-steps-gt-T",
    ),
    _case(
        lambda: inference_timesteps(1000, 10.0),
        ITE,
        r"^num_steps: expected an int, got 10\.0 \(float\)",
        "num-steps-float",
    ),
    _case(
        lambda: inference_timesteps(1000, True),
        ITE,
        r"^num_steps: expected an int, got True \(bool\)",
        "num-steps-bool",
    ),
    _case(
        lambda: inference_timesteps(1000, None),
        ITE,
        r"^num_steps: expected an int, got None",
        "num-steps-none",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "foo"),
        IVE,
        r"^spacing: expected one of 'leading', 'trailing', 'linspace', got 'foo'",
        "spacing-foo",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "Leading"),
        IVE,
        r"^spacing: expected one of .*got 'Leading'",
        "spacing-case",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, None),
        IVE,
        r"^spacing: expected one of .*got None",
        "spacing-none",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "trailing", 1),
        IVE,
        r"^offset: expected a shift that keeps every timestep in \[0, 999\], got 1 "
        r"\(trailing spacing with 10 steps gives 100\.\.1000\)",
        "offset-trailing",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "linspace", 1),
        IVE,
        r"^offset: .*\[0, 999\], got 1",
        "offset-linspace",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "leading", 100),
        IVE,
        r"^offset: .*got 100 \(leading spacing with 10 steps gives 100\.\.1000\)",
        "offset-leading-high",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "leading", -1),
        IVE,
        r"^offset: .*got -1 \(leading spacing with 10 steps gives -1\.\.899\)",
        "offset-negative",
    ),
    _case(
        lambda: inference_timesteps(1000, 10, "leading", 1.5),
        ITE,
        r"^offset: expected an int, got 1\.5",
        "offset-float",
    ),
    _case(
        lambda: inference_timesteps(0, 1),
        IVE,
        r"^num_train_timesteps: expected an int >= 1, got 0",
        "T-0",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), INFERENCE_CASES)
def test_inference_timesteps_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


# ====================================================================== sampler.timesteps / explicit timesteps


def _ts(**kw):
    return DDIM(SCHEDULE).timesteps(**kw)


EXPLICIT_CASES = [
    _case(
        lambda: _ts(timesteps=[5, 10, 3]),
        IVE,
        r"^timesteps: expected a strictly descending list without duplicates "
        r"\(noisiest first\), got 5 followed by 10",
        "unsorted",
    ),
    _case(
        lambda: _ts(timesteps=[1, 2, 3]),
        IVE,
        r"^timesteps: expected a strictly descending .*got 1 followed by 2",
        "ascending",
    ),
    _case(
        lambda: _ts(timesteps=range(5)),
        IVE,
        r"^timesteps: expected a strictly descending .*got 0 followed by 1",
        "ascending-range",
    ),
    _case(
        lambda: _ts(timesteps=[10, 5, 5, 1]),
        IVE,
        r"^timesteps: expected a strictly descending list without duplicates .*got 5 followed by 5",
        "duplicates",
    ),
    _case(
        lambda: _ts(timesteps=torch.tensor([10, 5, 5])),
        IVE,
        r"^timesteps: expected a strictly descending .*got 5 followed by 5",
        "duplicates-tensor",
    ),
    _case(
        lambda: _ts(timesteps=[T, 3]),
        IVE,
        r"^timesteps: expected values in \[0, 19\] \(T = 20 training timesteps\), "
        r"got values from 3 to 20",
        "out-of-range",
    ),
    _case(
        lambda: _ts(timesteps=[5, -1]),
        IVE,
        r"^timesteps: expected values in \[0, 19\] .*got values from -1 to 5",
        "negative",
    ),
    _case(
        lambda: _ts(timesteps=[5.0, 3.0]),
        ITE,
        r"^timesteps: expected ints, got 5\.0 \(float\)",
        "floats",
    ),
    _case(
        lambda: _ts(timesteps=[5, 3.5]),
        ITE,
        r"^timesteps: expected ints, got 3\.5 \(float\)",
        "one-float",
    ),
    _case(
        lambda: _ts(timesteps=[True, False]),
        ITE,
        r"^timesteps: expected ints, got True \(bool\)",
        "bools",
    ),
    pytest.param(
        lambda: _ts(timesteps=torch.tensor([5.0, 3.0])),
        ITE,
        r"^timesteps: expected a 1-d integer tensor, got tensor of shape \(2,\) and dtype "
        r"torch\.float32",
        id="float-tensor",
    ),
    _case(
        lambda: _ts(timesteps=torch.tensor([[5, 3]])),
        IVE,
        r"^timesteps: expected a 1-d integer tensor, got tensor of shape \(1, 2\)",
        "tensor-2d",
    ),
    _case(
        lambda: _ts(timesteps=[]),
        IVE,
        r"^timesteps: expected at least one timestep, got an empty sequence",
        "empty",
    ),
    _case(
        lambda: _ts(timesteps=torch.tensor([], dtype=torch.int64)),
        IVE,
        r"^timesteps: expected at least one timestep",
        "empty-tensor",
    ),
    _case(
        lambda: _ts(timesteps="10,5"),
        ITE,
        r"^timesteps: expected a sequence of ints, got '10,5'",
        "string",
    ),
    _case(
        lambda: _ts(timesteps=10),
        ITE,
        r"^timesteps: expected a sequence of ints, got 10 \(int\)",
        "scalar",
    ),
    _case(
        lambda: _ts(num_steps=5, timesteps=[10, 5]),
        IVE,
        r"^num_steps: expected None when timesteps are given explicitly, got 5",
        "both-num-steps-and-timesteps",
    ),
    _case(
        lambda: _ts(num_steps=0),
        IVE,
        r"^num_steps: expected an int >= 1, got 0",
        "num-steps-0",
    ),
    _case(
        lambda: _ts(num_steps=T + 1),
        IVE,
        r"^num_steps: expected an int <= 20, got 21",
        "num-steps-gt-T",
    ),
    _case(
        lambda: _ts(num_steps=5.0),
        ITE,
        r"^num_steps: expected an int, got 5\.0",
        "num-steps-float",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=0.0),
        IVE,
        r"^strength: expected a float > 0\.0, got 0\.0",
        "strength-0",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=-0.5),
        IVE,
        r"^strength: expected a float > 0\.0, got -0\.5",
        "strength-negative",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=1.5),
        IVE,
        r"^strength: expected a float <= 1\.0, got 1\.5",
        "strength-gt-1",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=float("nan")),
        IVE,
        r"^strength: expected a finite float, got nan",
        "strength-nan",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=True),
        ITE,
        r"^strength: expected a float, got True",
        "strength-bool",
    ),
    _case(
        lambda: _ts(num_steps=5, strength=0.1),
        IVE,
        r"^strength: 0\.1 keeps int\(5 \* 0\.1\) = 0 of 5 steps; "
        r"expected a strength that keeps at least one step",
        "strength-keeps-no-step",
    ),
    _case(
        lambda: _ts(timesteps=[10, 5, 1], strength=0.2),
        IVE,
        r"^strength: 0\.2 keeps int\(3 \* 0\.2\) = 0 of 3 steps",
        "strength-keeps-no-explicit-step",
    ),
    _case(
        lambda: SamplingPlan.denoising(SCHEDULE, [5, 3], "zero"),
        IVE,
        r"^final_alpha_bar: expected one of 'one', 'first', got 'zero'",
        "plan-final-alpha-bar",
    ),
    _case(
        lambda: SamplingPlan.inversion(SCHEDULE, [3, 5]),
        IVE,
        r"^timesteps: expected a strictly descending",
        "plan-inversion-ascending",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), EXPLICIT_CASES)
def test_sampler_timesteps_reject(fn, exc, pattern):
    _check(fn, exc, pattern)


def test_sampler_timesteps_accept_valid_edge_cases():
    assert DDIM(SCHEDULE, spacing="trailing").timesteps(5)[0] == T - 1
    assert DDIM(SCHEDULE).timesteps(T) == tuple(range(T - 1, -1, -1))
    assert DDIM(SCHEDULE).timesteps(timesteps=[np.int64(5), 3]) == (5, 3)
    assert DDIM(SCHEDULE).timesteps(timesteps=[5], strength=1.0) == (5,)


def test_sampler_steps_offset_out_of_range_names_steps_offset():
    with pytest.raises(IVE, match=r"^steps_offset: .*got 1"):
        DDIM(SCHEDULE, spacing="trailing", steps_offset=1).timesteps(5)


# ====================================================================== respace_timesteps, respaced_betas

RESPACE_CASES = [
    _case(
        lambda: respace_timesteps(1000, "ddimX"),
        IVE,
        r"^section_counts: expected 'ddimN' with an integer N, got 'ddimX'",
        "ddim-not-int",
    ),
    _case(
        lambda: respace_timesteps(1000, "ddim"),
        IVE,
        r"^section_counts: expected 'ddimN' with an integer N, got 'ddim'",
        "ddim-empty",
    ),
    _case(
        lambda: respace_timesteps(1000, "ddim0"),
        IVE,
        r"^section_counts: no integer stride gives exactly 0 of 1000 timesteps",
        "ddim-0",
    ),
    _case(
        lambda: respace_timesteps(1000, "ddim2000"),
        IVE,
        r"^section_counts: no integer stride gives exactly 2000 of 1000 timesteps",
        "ddim-gt-T",
    ),
    _case(
        lambda: respace_timesteps(1000, "abc"),
        IVE,
        r"^section_counts: expected 'ddimN' or comma-separated ints, got 'abc'",
        "garbage",
    ),
    _case(
        lambda: respace_timesteps(1000, "10,,20"),
        IVE,
        r"^section_counts: expected 'ddimN' or comma-separated ints, got '10,,20'",
        "empty-field",
    ),
    _case(
        lambda: respace_timesteps(1000, "10.5"),
        IVE,
        r"^section_counts: expected 'ddimN' or comma-separated ints, got '10\.5'",
        "float-field",
    ),
    _case(
        lambda: respace_timesteps(1000, ""),
        IVE,
        r"^section_counts: expected 'ddimN' or comma-separated ints, got ''",
        "empty-string",
    ),
    _case(
        lambda: respace_timesteps(1000, "0"),
        IVE,
        r"^section_counts: expected a positive total count, got 0",
        "zero-total",
    ),
    _case(
        lambda: respace_timesteps(1000, []),
        IVE,
        r"^section_counts: expected at least one section",
        "empty-list",
    ),
    _case(
        lambda: respace_timesteps(1000, "600,10"),
        IVE,
        r"^section_counts: section 0 has 500 timesteps, cannot take 600",
        "section-too-big",
    ),
    _case(
        lambda: respace_timesteps(1000, [10, -5]),
        IVE,
        r"^section_counts\[.*\]: expected an int >= 0, got -5",
        "negative-list",
    ),
    _case(
        lambda: respace_timesteps(1000, [2.5]),
        ITE,
        r"^section_counts\[.*\]: expected an int, got 2\.5",
        "float-list",
    ),
    _case(
        lambda: respace_timesteps(0, "10"),
        IVE,
        r"^num_train_timesteps: expected an int >= 1, got 0",
        "T-0",
    ),
    _case(
        lambda: respaced_betas(SCHEDULE, [T, 5]),
        IVE,
        r"^timesteps: expected values in \[0, 19\]",
        "betas-out-of-range",
    ),
    _case(
        lambda: respaced_betas(SCHEDULE, [5, -1]),
        IVE,
        r"^timesteps: expected values in \[0, 19\]",
        "betas-negative",
    ),
    _case(
        lambda: respaced_betas(SCHEDULE, []),
        IVE,
        r"^timesteps: expected at least one timestep",
        "betas-empty",
    ),
    _case(
        lambda: respaced_betas(SCHEDULE, [5.0, 3.0]),
        ITE,
        r"^timesteps: expected ints, got",
        "betas-floats",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), RESPACE_CASES)
def test_respace_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


@pytest.mark.parametrize("counts", ["10,-5", "-5"])
def test_respace_rejects_negative_string_counts(counts):
    with pytest.raises(IVE, match=r"^section_counts.*-5"):
        respace_timesteps(1000, counts)


@pytest.mark.parametrize("counts", [5, None, 2.5])
def test_respace_rejects_non_sequence(counts):
    with pytest.raises(ITE, match=r"^section_counts: "):
        respace_timesteps(1000, counts)


# ====================================================================== sampler construction

CONSTRUCTION_CASES = [
    _case(
        lambda: DDIM(SCHEDULE, prediction="eps"),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'eps'",
        "ddim-prediction",
    ),
    _case(
        lambda: DDPM(SCHEDULE, prediction="x0"),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'x0'",
        "ddpm-prediction",
    ),
    _case(
        lambda: DDIM(SCHEDULE, prediction=None),
        IVE,
        r"^prediction: expected one of .*got None",
        "prediction-none",
    ),
    _case(
        lambda: DDIM(SCHEDULE, spacing="uniform"),
        IVE,
        r"^spacing: expected one of 'leading', 'trailing', 'linspace', got 'uniform'",
        "spacing",
    ),
    _case(
        lambda: DDIM(SCHEDULE, steps_offset=-1),
        IVE,
        r"^steps_offset: expected an int >= 0, got -1",
        "steps-offset-negative",
    ),
    _case(
        lambda: DDPM(SCHEDULE, steps_offset=1.5),
        ITE,
        r"^steps_offset: expected an int, got 1\.5",
        "steps-offset-float",
    ),
    _case(
        lambda: DDIM(SCHEDULE, dtype=torch.int64),
        ITE,
        r"^dtype: expected None or a floating torch\.dtype",
        "dtype-int64",
    ),
    _case(
        lambda: DDIM(SCHEDULE, dtype=torch.complex64),
        ITE,
        r"^dtype: expected None or a floating torch\.dtype",
        "dtype-complex",
    ),
    _case(
        lambda: DDPM(SCHEDULE, dtype="float32"),
        ITE,
        r"^dtype: expected None or a floating torch\.dtype, got 'float32'",
        "dtype-string",
    ),
    _case(
        lambda: DDIM("linear"),
        ITE,
        r"^schedule: expected an imgdiff\.NoiseSchedule, got 'linear'",
        "schedule-string",
    ),
    _case(
        lambda: DDPM(SCHEDULE.betas),
        ITE,
        r"^schedule: expected an imgdiff\.NoiseSchedule, got tensor of shape \(20,\)",
        "schedule-tensor",
    ),
    _case(
        lambda: DDIM(None),
        ITE,
        r"^schedule: expected an imgdiff\.NoiseSchedule, got None",
        "schedule-none",
    ),
    _case(
        lambda: DDIM(SCHEDULE, eta=-0.1),
        IVE,
        r"^eta: expected a float >= 0\.0, got -0\.1",
        "ddim-eta-negative",
    ),
    _case(
        lambda: DDIM(SCHEDULE, eta=float("nan")),
        IVE,
        r"^eta: expected a finite float, got nan",
        "ddim-eta-nan",
    ),
    _case(
        lambda: DDIM(SCHEDULE, eta="0"),
        ITE,
        r"^eta: expected a float, got '0'",
        "ddim-eta-string",
    ),
    _case(
        lambda: DDIM(SCHEDULE, final_alpha_bar="zero"),
        IVE,
        r"^final_alpha_bar: expected one of 'one', 'first', got 'zero'",
        "ddim-final-alpha-bar",
    ),
    _case(
        lambda: DDIM(SCHEDULE, thresholding=lambda x: x.clamp(-1, 1)),
        ITE,
        r"^thresholding: expected None or an imgdiff\.Thresholding \(Clip, DynamicThreshold\), "
        r"got object of type function",
        "ddim-thresholding-function",
    ),
    _case(
        lambda: DDPM(SCHEDULE, thresholding=1.0),
        ITE,
        r"^thresholding: expected None or an imgdiff\.Thresholding.*got 1\.0 \(float\)",
        "ddpm-thresholding-float",
    ),
    _case(
        lambda: DDPM(SCHEDULE, variance="learnt"),
        IVE,
        r"^variance: expected one of 'fixed_small', 'fixed_large', 'learned', "
        r"'learned_range', got 'learnt'",
        "ddpm-variance",
    ),
    _case(lambda: Clip(0.0), IVE, r"^limit: expected a float > 0\.0, got 0\.0", "clip-0"),
    _case(lambda: Clip(-1.0), IVE, r"^limit: expected a float > 0\.0, got -1\.0", "clip-neg"),
    _case(
        lambda: Clip(float("inf")),
        IVE,
        r"^limit: expected a finite float, got inf",
        "clip-inf",
    ),
    _case(lambda: Clip("1"), ITE, r"^limit: expected a float, got '1'", "clip-string"),
    _case(
        lambda: DynamicThreshold(ratio=1.5),
        IVE,
        r"^ratio: expected a float <= 1\.0, got 1\.5",
        "dyn-ratio-gt-1",
    ),
    _case(
        lambda: DynamicThreshold(ratio=-0.1),
        IVE,
        r"^ratio: expected a float >= 0\.0, got -0\.1",
        "dyn-ratio-negative",
    ),
    _case(
        lambda: DynamicThreshold(ratio=float("nan")),
        IVE,
        r"^ratio: expected a finite float, got nan",
        "dyn-ratio-nan",
    ),
    _case(
        lambda: DynamicThreshold(max_value=0.5),
        IVE,
        r"^max_value: expected a float >= 1\.0, got 0\.5",
        "dyn-max-value-lt-1",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), CONSTRUCTION_CASES)
def test_construction_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


def test_ddim_rederive_eps_non_bool_is_a_type_error():
    with pytest.raises(ITE, match=r"^rederive_eps: expected a bool, got 1"):
        DDIM(SCHEDULE, rederive_eps=1)


# ====================================================================== sample / invert

SAMPLE_CASES = [
    _case(
        lambda: _sample(DDIM(SCHEDULE), noise=[[0.0]]),
        ITE,
        r"^noise: expected a torch\.Tensor, got object of type list",
        "noise-list",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), noise=np.zeros(SHAPE, dtype=np.float32)),
        ITE,
        r"^noise: expected a torch\.Tensor, got object of type ndarray",
        "noise-ndarray",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), noise=torch.zeros(SHAPE, dtype=torch.int64)),
        ITE,
        r"^noise: expected a floating-point tensor, got dtype torch\.int64",
        "noise-int",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), noise=torch.zeros(SHAPE, dtype=torch.bool)),
        ITE,
        r"^noise: expected a floating-point tensor, got dtype torch\.bool",
        "noise-bool",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), noise=torch.randn(W)),
        IVE,
        r"^noise: expected a tensor with at least 2 dimensions \(batch first\), got shape \(5,\)",
        "noise-1d",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), noise=torch.tensor(1.0)),
        IVE,
        r"^noise: expected a tensor with at least 2 dimensions .*got shape \(\)",
        "noise-0d",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=lambda x, t: (x,)),
        ITE,
        r"^model: expected the model to return a torch\.Tensor, got object of type tuple",
        "model-returns-tuple",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), model=lambda x, t: x.numpy()),
        ITE,
        r"^model: expected the model to return a torch\.Tensor, got object of type ndarray",
        "model-returns-ndarray",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=lambda x, t: None),
        ITE,
        r"^model: expected the model to return a torch\.Tensor, got None",
        "model-returns-none",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=lambda x, t: torch.zeros(B, C, H, W + 1)),
        IVE,
        r"^model output: expected shape \(2, 3, 4, 5\) for a sample of shape \(2, 3, 4, 5\), "
        r"got \(2, 3, 4, 6\)",
        "model-output-wrong-shape",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=lambda x, t: torch.zeros(1, C, H, W)),
        IVE,
        r"^model output: expected shape \(2, 3, 4, 5\) .*got \(1, 3, 4, 5\)",
        "model-output-broadcastable",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), model=lambda x, t: torch.zeros(B, C * H * W)),
        IVE,
        r"^model output: expected shape \(2, 3, 4, 5\) .*got \(2, 60\)",
        "model-output-flat",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=learned_variance_model),
        IVE,
        r"^model output: expected shape \(2, 3, 4, 5\) .*got \(2, 6, 4, 5\); "
        r"a learned-variance model returns 2C channels: wrap it with "
        r"imgdiff\.without_variance\(model\)",
        "ddim-2C-hint",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE, variance="learned_range")),
        IVE,
        r"^model output: expected shape \(2, 6, 4, 5\) for a sample of shape \(2, 3, 4, 5\), "
        r"got \(2, 3, 4, 5\)",
        "ddpm-learned-needs-2C",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), step_noise=torch.zeros(STEPS - 1, *SHAPE)),
        IVE,
        r"^step_noise: expected shape \(3, 2, 3, 4, 5\) \(steps, \*sample shape\), "
        r"got \(2, 2, 3, 4, 5\)",
        "step-noise-steps",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE, eta=1.0), step_noise=torch.zeros(STEPS, 1, C, H, W)),
        IVE,
        r"^step_noise: expected shape \(3, 2, 3, 4, 5\) .*got \(3, 1, 3, 4, 5\)",
        "step-noise-batch",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), step_noise=torch.zeros(SHAPE)),
        IVE,
        r"^step_noise: expected shape \(3, 2, 3, 4, 5\) .*got \(2, 3, 4, 5\)",
        "step-noise-missing-step-dim",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), step_noise=lambda i: torch.zeros(1, C, H, W)),
        IVE,
        r"^step_noise: expected a tensor of shape \(2, 3, 4, 5\) for step 0, "
        r"got tensor of shape \(1, 3, 4, 5\)",
        "step-noise-fn-shape",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), step_noise=lambda i: None),
        IVE,
        r"^step_noise: expected a tensor of shape \(2, 3, 4, 5\) for step 0, got None",
        "step-noise-fn-none",
    ),
    _case(
        lambda: _sample(
            DDPM(SCHEDULE),
            step_noise=torch.zeros(STEPS, *SHAPE),
            generator=torch.Generator().manual_seed(0),
        ),
        IVE,
        r"^step_noise: expected None when a generator is given \(one source of noise\), got both",
        "step-noise-and-generator",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), generator=[torch.Generator()]),
        IVE,
        r"^generator: expected one generator per sample \(2\), got 1",
        "generator-list-short",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), generator=[torch.Generator()] * (B + 1)),
        IVE,
        r"^generator: expected one generator per sample \(2\), got 3",
        "generator-list-long-ddim",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), generator=[torch.Generator(), 0]),
        ITE,
        r"^generator: expected a torch\.Generator or a sequence of them, "
        r"got a sequence containing 0 \(int\)",
        "generator-list-non-generator",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), generator=0),
        ITE,
        r"^generator: expected None, a torch\.Generator or a sequence of them, got 0 \(int\)",
        "generator-seed-int",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), generator="cpu"),
        ITE,
        r"^generator: expected None, a torch\.Generator or a sequence of them, got 'cpu'",
        "generator-string",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), callback=5),
        ITE,
        r"^callback: expected a callable, got 5 \(int\)",
        "callback-not-callable",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), num_steps=0),
        IVE,
        r"^num_steps: expected an int >= 1, got 0",
        "num-steps-0",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), num_steps=None, timesteps=[3, 7]),
        IVE,
        r"^timesteps: expected a strictly descending",
        "timesteps-ascending",
    ),
    # -- invert
    _case(
        lambda: _invert(DDIM(SCHEDULE, eta=0.5)),
        IVE,
        r"^eta: invert\(\) inverts the deterministic step, expected eta == 0, got 0\.5",
        "invert-eta",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE, thresholding=Clip())),
        IVE,
        r"^thresholding: expected None for invert\(\), got Clip\(limit=1\.0\)",
        "invert-clip",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE, thresholding=DynamicThreshold())),
        IVE,
        r"^thresholding: expected None for invert\(\), got DynamicThreshold",
        "invert-dynamic-threshold",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), x0=[0.0]),
        ITE,
        r"^x0: expected a torch\.Tensor, got object of type list",
        "invert-x0-list",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), x0=torch.zeros(SHAPE, dtype=torch.uint8)),
        ITE,
        r"^x0: expected a floating-point tensor, got dtype torch\.uint8",
        "invert-x0-uint8",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), x0=torch.randn(W)),
        IVE,
        r"^x0: expected a tensor with at least 2 dimensions .*got shape \(5,\)",
        "invert-x0-1d",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), model=lambda x, t: torch.zeros(1, C, H, W)),
        IVE,
        r"^model output: expected shape \(2, 3, 4, 5\)",
        "invert-model-output-shape",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), model=learned_variance_model),
        IVE,
        r"^model output: .*without_variance",
        "invert-2C-hint",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), model=lambda x, t: 0.0),
        ITE,
        r"^model: expected the model to return a torch\.Tensor, got 0\.0",
        "invert-model-returns-float",
    ),
    _case(
        lambda: _sample(DDIM(SCHEDULE), model=lambda x, t: torch.zeros(x.shape, dtype=torch.int64)),
        ITE,
        r"^model: expected the model to return a floating-point tensor, got torch\.int64",
        "sample-model-returns-int",
    ),
    _case(
        lambda: _sample(DDPM(SCHEDULE), model=lambda x, t: torch.zeros(x.shape, dtype=torch.bool)),
        ITE,
        r"^model: expected the model to return a floating-point tensor, got torch\.bool",
        "ddpm-model-returns-bool",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), callback="print"),
        ITE,
        r"^callback: expected a callable, got 'print'",
        "invert-callback",
    ),
    _case(
        lambda: _invert(DDIM(SCHEDULE), strength=0.0),
        IVE,
        r"^strength: expected a float > 0\.0, got 0\.0",
        "invert-strength",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), SAMPLE_CASES)
def test_sample_and_invert_reject(fn, exc, pattern):
    _check(fn, exc, pattern)


@pytest.mark.parametrize(
    ("fn", "exc", "pattern"),
    [
        pytest.param(
            lambda: _sample(DDPM(SCHEDULE), step_noise=[torch.zeros(SHAPE)] * STEPS),
            ITE,
            r"^step_noise: expected",
            id="step-noise-list",
        ),
        pytest.param(
            lambda: _sample(DDPM(SCHEDULE), step_noise=3),
            ITE,
            r"^step_noise: expected",
            id="step-noise-int",
        ),
        pytest.param(
            lambda: _sample(
                DDPM(SCHEDULE), step_noise=torch.zeros(STEPS, *SHAPE, dtype=torch.int64)
            ),
            ITE,
            r"^step_noise: expected a floating-point tensor, got dtype torch\.int64",
            id="step-noise-int-dtype",
        ),
        pytest.param(
            lambda: _sample(
                DDPM(SCHEDULE), step_noise=lambda i: torch.zeros(SHAPE, dtype=torch.int64)
            ),
            ITE,
            r"^step_noise: .*float",
            id="step-noise-fn-int-dtype",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), model_kwargs=["cond"]),
            ITE,
            r"^model_kwargs: expected",
            id="model-kwargs-list",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), model_kwargs="cond"),
            ITE,
            r"^model_kwargs: expected",
            id="model-kwargs-string",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), model_dtype=torch.int64),
            ITE,
            r"^model_dtype: expected .*float.*torch\.int64",
            id="model-dtype-int64",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), model_dtype="float16"),
            ITE,
            r"^model_dtype: expected .*'float16'",
            id="model-dtype-string",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), callback=lambda info: "state"),
            ITE,
            r"^callback: ",
            id="callback-returns-string",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), num_steps=1, callback=lambda info: 42),
            ITE,
            r"^callback: ",
            id="callback-returns-int-on-last-step",
        ),
        pytest.param(
            lambda: _sample(DDIM(SCHEDULE), callback=lambda info: torch.zeros(W)),
            IVE,
            r"^callback: .*\(2, 3, 4, 5\)",
            id="callback-returns-wrong-shape",
        ),
    ],
)
def test_sample_rejects_unvalidated_arguments(fn, exc, pattern):
    _check(fn, exc, pattern)


# -- zero terminal SNR


@pytest.mark.parametrize("sampler_cls", [DDIM, DDPM])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_epsilon_at_zero_terminal_snr_raises_naming_the_timestep(sampler_cls, spacing):
    sampler = sampler_cls(ZSNR, prediction="epsilon", spacing=spacing)
    with pytest.raises(
        IVE,
        match=r"^prediction='epsilon' cannot recover x0 where alpha_bar = 0 \(zero terminal SNR\)"
        r".*\(timesteps \[19\]\)",
    ):
        _sample(sampler, num_steps=5)


def test_epsilon_at_zero_terminal_snr_raises_for_explicit_timesteps():
    with pytest.raises(IVE, match=r"prediction='epsilon'.*\(timesteps \[19\]\)"):
        _sample(DDIM(ZSNR), num_steps=None, timesteps=[19, 10, 0])


@pytest.mark.parametrize(
    "sampler",
    [
        DDIM(ZSNR, prediction="v", spacing="trailing"),
        DDIM(ZSNR, prediction="v", spacing="trailing", eta=1.0),
        DDPM(ZSNR, prediction="v", spacing="trailing"),
        DDIM(ZSNR, prediction="sample", spacing="linspace"),
        DDIM(ZSNR, prediction="epsilon", spacing="leading"),  # never visits t = T-1
    ],
    ids=["ddim-v", "ddim-v-eta1", "ddpm-v", "ddim-sample", "ddim-eps-leading"],
)
@pytest.mark.filterwarnings("ignore:spacing. a zero-terminal-SNR schedule:UserWarning")
def test_zero_terminal_snr_valid_combinations_are_finite(sampler):
    out = _sample(sampler, model=affine_model, num_steps=5)
    assert out.shape == SHAPE
    assert torch.isfinite(out).all()


def test_zero_terminal_snr_with_a_spacing_that_skips_pure_noise_warns():
    """Spec 1.3: a zero-terminal-SNR schedule is sampled from t = T-1; leading spacing never
    visits it, which is allowed (the result is finite) but warned about. Explicit timesteps and
    strength < 1 are the user's choice and do not warn."""
    import warnings

    sampler = DDIM(ZSNR, prediction="v")  # spacing "leading"
    with pytest.warns(
        UserWarning,
        match=r"^spacing: a zero-terminal-SNR schedule .* t = 19, but spacing .leading. starts at t = 16",
    ):
        sampler.timesteps(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DDIM(ZSNR, prediction="v", spacing="trailing").timesteps(5)
        sampler.timesteps(timesteps=[16, 8, 0])
        sampler.timesteps(5, strength=0.6)
        DDIM(SCHEDULE, prediction="v").timesteps(5)
        imgdiff.EDICT(ZSNR, prediction="v").timesteps(5)  # it must skip t = T-1: no warning


def test_invert_epsilon_to_zero_terminal_snr_is_finite():
    out = _invert(DDIM(ZSNR, spacing="trailing"), model=affine_model, num_steps=5)
    assert torch.isfinite(out).all()


# -- inputs are left unchanged


def _snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _assert_unchanged(tensors, snapshots) -> None:
    for t, s in zip(tensors, snapshots, strict=True):
        assert torch.equal(t, s), "an input tensor was modified in place"


@pytest.mark.parametrize(
    "sampler",
    [
        DDIM(SCHEDULE),
        DDIM(SCHEDULE, eta=1.0),
        DDIM(SCHEDULE, thresholding=Clip(), rederive_eps=True),
        DDPM(SCHEDULE),
        DDPM(SCHEDULE, thresholding=DynamicThreshold(max_value=1.5)),
        DDIM(SCHEDULE, dtype=torch.float32),
    ],
    ids=["ddim", "ddim-eta1", "ddim-clip", "ddpm", "ddpm-dynamic", "ddim-dtype"],
)
def test_sample_leaves_inputs_unchanged(sampler):
    noise = _randn(*SHAPE)
    step_noise = _randn(STEPS, *SHAPE, seed=1)
    cond = _randn(*SHAPE, seed=2)
    before = _snapshot(noise, step_noise, cond)

    def model(x, t, cond):
        return 0.5 * x + cond

    out = sampler.sample(
        model,
        noise,
        num_steps=STEPS,
        step_noise=step_noise if sampler.needs_noise(_first_coeffs(sampler)) else None,
        model_kwargs={"cond": cond},
        progress=False,
    )
    assert out is not noise
    _assert_unchanged([noise, step_noise, cond], before)


def _first_coeffs(sampler):
    return sampler.coefficients(sampler.plan(STEPS)).unbind()[0]


def test_sample_callback_states_do_not_alias_the_noise():
    noise = _randn(*SHAPE)
    before = _snapshot(noise)
    seen = []
    DDIM(SCHEDULE).sample(
        affine_model,
        noise,
        num_steps=STEPS,
        callback=lambda info: seen.append(info.state),
        progress=False,
    )
    assert all(s is not noise for s in seen)
    _assert_unchanged([noise], before)


def test_invert_leaves_input_unchanged():
    x0 = _randn(*SHAPE)
    before = _snapshot(x0)
    out = _invert(DDIM(SCHEDULE), model=affine_model, x0=x0)
    assert out is not x0
    _assert_unchanged([x0], before)


# ====================================================================== step_at


def _step_at(sampler=None, model_output=None, x=None, t=5, prev_t=-1, **kw):
    sampler = DDPM(SCHEDULE) if sampler is None else sampler
    x = _randn(*SHAPE) if x is None else x
    model_output = _randn(*SHAPE, seed=1) if model_output is None else model_output
    return sampler.step_at(model_output, x, t, prev_t, **kw)


STEP_AT_CASES = [
    _case(
        lambda: _step_at(t=torch.tensor([5, 5, 5])),
        IVE,
        r"^t: expected shape \(2,\) to match the batch size 2, got shape \(3,\)",
        "t-batch-plus-one",
    ),
    _case(
        lambda: _step_at(t=torch.tensor([[5, 5]])),
        IVE,
        r"^t: expected shape \(2,\) to match the batch size 2, got shape \(1, 2\)",
        "t-2d",
    ),
    _case(
        lambda: _step_at(t=torch.tensor([5.0, 4.0])),
        ITE,
        r"^t: expected an integer tensor of timesteps, got dtype torch\.float32",
        "t-float-tensor",
    ),
    _case(
        lambda: _step_at(t=5.0),
        ITE,
        r"^t: expected an int or an integer tensor, got 5\.0 \(float\)",
        "t-float",
    ),
    _case(
        lambda: _step_at(t=True),
        ITE,
        r"^t: expected an int or an integer tensor, got True \(bool\)",
        "t-bool",
    ),
    _case(
        lambda: _step_at(t=torch.tensor([True, False])),
        ITE,
        r"^t: expected an integer tensor of timesteps, got dtype torch\.bool",
        "t-bool-tensor",
    ),
    _case(
        lambda: _step_at(t=T),
        IVE,
        r"^t: expected a timestep in \[0, 19\], got 20",
        "t-T",
    ),
    _case(
        lambda: _step_at(t=-1),
        IVE,
        r"^t: expected a timestep in \[0, 19\], got -1",
        "t-minus-one",
    ),
    _case(
        lambda: _step_at(t=torch.tensor([3, T])),
        IVE,
        r"^t: expected timesteps in \[0, 19\], got values from 3 to 20",
        "t-tensor-out-of-range",
    ),
    _case(
        lambda: _step_at(t=5, prev_t=5),
        IVE,
        r"^prev_t: expected every prev_t < t \(a denoising step\)",
        "prev-t-equal",
    ),
    _case(
        lambda: _step_at(t=torch.tensor([5, 5]), prev_t=torch.tensor([4, 6])),
        IVE,
        r"^prev_t: expected every prev_t < t",
        "prev-t-greater",
    ),
    _case(
        lambda: _step_at(t=5, prev_t=-2),
        IVE,
        r"^prev_t: expected a timestep in \[-1, 19\], got -2",
        "prev-t-below-final",
    ),
    _case(
        lambda: _step_at(t=5, prev_t=torch.tensor([1, 2, 3])),
        IVE,
        r"^prev_t: expected shape \(2,\) to match the batch size 2, got shape \(3,\)",
        "prev-t-batch",
    ),
    _case(
        lambda: _step_at(t=5, prev_t=torch.tensor([1.0, 2.0])),
        ITE,
        r"^prev_t: expected an integer tensor of timesteps, got dtype torch\.float32",
        "prev-t-float",
    ),
    _case(
        lambda: _step_at(noise=_randn(1, C, H, W)),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\) \(the shape of x\), got \(1, 3, 4, 5\)",
        "noise-broadcastable",
    ),
    _case(
        lambda: _step_at(noise=_randn(B, C, H)),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\) \(the shape of x\), got \(2, 3, 4\)",
        "noise-rank",
    ),
    _case(
        lambda: _step_at(DDIM(SCHEDULE), noise=_randn(1, C, H, W)),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\)",
        "ddim-noise-shape",
    ),
    _case(
        lambda: _step_at(noise=torch.zeros(SHAPE, dtype=torch.int64)),
        ITE,
        r"^noise: expected a floating-point tensor, got dtype torch\.int64",
        "noise-int",
    ),
    _case(
        lambda: _step_at(noise=np.zeros(SHAPE)),
        ITE,
        r"^noise: expected a torch\.Tensor, got object of type ndarray",
        "noise-ndarray",
    ),
    _case(
        lambda: _step_at(generator=[torch.Generator()]),
        IVE,
        r"^generator: expected one generator per sample \(2\), got 1",
        "generator-list-short",
    ),
    _case(
        lambda: _step_at(model_output=_randn(B, C, H, W + 1)),
        IVE,
        r"^model_output: expected shape \(2, 3, 4, 5\) for a sample of shape \(2, 3, 4, 5\), "
        r"got \(2, 3, 4, 6\)",
        "model-output-shape",
    ),
    _case(
        lambda: _step_at(DDIM(SCHEDULE), model_output=_randn(B, 2 * C, H, W)),
        IVE,
        r"^model_output: .*2C channels.*without_variance",
        "ddim-2C-hint",
    ),
    _case(
        lambda: _step_at(DDPM(SCHEDULE, variance="learned")),
        IVE,
        r"^model_output: expected shape \(2, 6, 4, 5\)",
        "ddpm-learned-needs-2C",
    ),
    _case(
        lambda: _step_at(model_output=[0.0]),
        ITE,
        r"^model_output: expected a torch\.Tensor, got object of type list",
        "model-output-list",
    ),
    _case(
        lambda: _step_at(model_output=torch.zeros(SHAPE, dtype=torch.int32)),
        ITE,
        r"^model_output: expected a floating-point tensor, got dtype torch\.int32",
        "model-output-int",
    ),
    _case(
        lambda: _step_at(x=torch.zeros(SHAPE, dtype=torch.int64)),
        ITE,
        r"^x: expected a floating-point tensor, got dtype torch\.int64",
        "x-int",
    ),
    _case(
        lambda: _step_at(x=torch.randn(W), model_output=torch.randn(W)),
        IVE,
        r"^x: expected a tensor with at least 2 dimensions .*got shape \(5,\)",
        "x-1d",
    ),
    _case(
        lambda: _step_at(x="x"),
        ITE,
        r"^x: expected a torch\.Tensor, got 'x'",
        "x-string",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), STEP_AT_CASES)
def test_step_at_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


def test_step_at_rejects_noise_and_generator_together():
    with pytest.raises(IVE, match=r"^(noise|generator): "):
        _step_at(noise=_randn(*SHAPE), generator=torch.Generator().manual_seed(0))


def test_step_at_model_output_shape_error_names_the_argument():
    with pytest.raises(IVE, match=r"^model_output: expected shape \(2, 3, 4, 5\)"):
        _step_at(model_output=_randn(B, C, H, W + 1))


@pytest.mark.parametrize(
    ("sampler", "model_channels", "with_noise"),
    [
        (DDPM(SCHEDULE), C, True),
        (DDPM(SCHEDULE), C, False),
        (DDPM(SCHEDULE, variance="learned_range"), 2 * C, True),
        (DDPM(SCHEDULE, thresholding=Clip()), C, True),
        (DDIM(SCHEDULE, eta=1.0), C, True),
        (DDIM(SCHEDULE, thresholding=DynamicThreshold(), rederive_eps=True), C, False),
    ],
    ids=["ddpm", "ddpm-drawn-noise", "ddpm-learned", "ddpm-clip", "ddim-eta1", "ddim-dynamic"],
)
def test_step_at_leaves_inputs_unchanged(sampler, model_channels, with_noise):
    x = _randn(*SHAPE)
    out = _randn(B, model_channels, H, W, seed=1)
    t = torch.tensor([7, 3])
    prev_t = torch.tensor([2, -1])
    noise = _randn(*SHAPE, seed=2)
    before = _snapshot(x, out, t, prev_t, noise)
    kw = {"noise": noise} if with_noise else {"generator": torch.Generator().manual_seed(0)}
    res = sampler.step_at(out, x, t, prev_t, **kw)
    assert res.state is not x
    assert torch.isfinite(res.state).all()
    assert torch.isfinite(res.x0_hat).all()
    _assert_unchanged([x, out, t, prev_t, noise], before)


# ====================================================================== add_noise, training_target


def _noising(fn):
    """add_noise, or training_target with prediction 'v', both as fn(schedule, x0, noise, t)."""
    if fn is add_noise:
        return add_noise
    return lambda schedule, x0, noise, t: training_target(schedule, x0, noise, t, "v")


NOISING_CASES = [
    (
        lambda x0, n: (x0, n[:1], 5),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\) \(the shape of x0\), got \(1, 3, 4, 5\)",
        "noise-broadcastable",
    ),
    (
        lambda x0, n: (x0, n[0], 5),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\) \(the shape of x0\), got \(3, 4, 5\)",
        "noise-missing-batch",
    ),
    (
        lambda x0, n: (x0, n.long(), 5),
        ITE,
        r"^noise: expected a floating-point tensor, got dtype torch\.int64",
        "noise-int",
    ),
    (
        lambda x0, n: (x0, 0.0, 5),
        ITE,
        r"^noise: expected a torch\.Tensor, got 0\.0 \(float\)",
        "noise-float",
    ),
    (
        lambda x0, n: (x0, n, torch.tensor([5, 5, 5])),
        IVE,
        r"^t: expected shape \(2,\) to match the batch size 2, got shape \(3,\)",
        "t-batch-plus-one",
    ),
    (
        lambda x0, n: (x0, n, torch.full((W,), 5)),
        IVE,
        r"^t: expected shape \(2,\) to match the batch size 2, got shape \(5,\)",
        "t-width",
    ),
    (
        lambda x0, n: (x0, n, torch.tensor([5.0, 3.0])),
        ITE,
        r"^t: expected an integer tensor of timesteps, got dtype torch\.float32",
        "t-float-tensor",
    ),
    (
        lambda x0, n: (x0, n, 5.5),
        ITE,
        r"^t: expected an int or an integer tensor, got 5\.5 \(float\)",
        "t-float",
    ),
    (
        lambda x0, n: (x0, n, True),
        ITE,
        r"^t: expected an int or an integer tensor, got True \(bool\)",
        "t-bool",
    ),
    (
        lambda x0, n: (x0, n, [5, 3]),
        ITE,
        r"^t: expected an int or an integer tensor, got object of type list",
        "t-list",
    ),
    (
        lambda x0, n: (x0, n, T),
        IVE,
        r"^t: expected a timestep in \[0, 19\], got 20",
        "t-T",
    ),
    (
        lambda x0, n: (x0, n, -1),
        IVE,
        r"^t: expected a timestep in \[0, 19\], got -1",
        "t-minus-one",
    ),
    (
        lambda x0, n: (x0, n, torch.tensor([0, T + 5])),
        IVE,
        r"^t: expected timesteps in \[0, 19\], got values from 0 to 25",
        "t-tensor-out-of-range",
    ),
    (
        lambda x0, n: (x0.long(), n, 5),
        ITE,
        r"^x0: expected a floating-point tensor, got dtype torch\.int64",
        "x0-int",
    ),
    (
        lambda x0, n: (torch.tensor(1.0), torch.tensor(1.0), 5),
        IVE,
        r"^x0: expected a tensor with at least 1 dimensions \(batch first\), got shape \(\)",
        "x0-0d",
    ),
    (
        lambda x0, n: (x0.numpy(), n, 5),
        ITE,
        r"^x0: expected a torch\.Tensor, got object of type ndarray",
        "x0-ndarray",
    ),
]


@pytest.mark.parametrize("fn", [add_noise, training_target], ids=["add_noise", "training_target"])
@pytest.mark.parametrize(
    ("make_args", "exc", "pattern"),
    [pytest.param(*c[:3], id=c[3]) for c in NOISING_CASES],
)
def test_noising_rejects(fn, make_args, exc, pattern):
    x0, noise = _randn(*SHAPE), _randn(*SHAPE, seed=1)
    with pytest.raises(exc, match=pattern):
        _noising(fn)(SCHEDULE, *make_args(x0, noise))


@pytest.mark.parametrize("prediction", ["eps", "x0", "V", None])
def test_training_target_rejects_unknown_prediction(prediction):
    x0 = _randn(*SHAPE)
    with pytest.raises(IVE, match=r"^prediction: expected one of 'epsilon', 'sample', 'v', got "):
        training_target(SCHEDULE, x0, x0, 5, prediction)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_noising_leaves_inputs_unchanged(prediction):
    x0, noise, t = _randn(*SHAPE), _randn(*SHAPE, seed=1), torch.tensor([3, 17])
    before = _snapshot(x0, noise, t)
    xt = add_noise(SCHEDULE, x0, noise, t)
    target = training_target(SCHEDULE, x0, noise, t, prediction)
    assert xt is not x0
    assert target is not x0
    assert target is not noise
    target.add_(1.0)  # the returned target must not alias an input
    _assert_unchanged([x0, noise, t], before)


# ====================================================================== prediction conversions

CONVERSIONS = {
    "x0_from_eps": lambda a, b, ab: x0_from_eps(a, b, ab),
    "eps_from_x0": lambda a, b, ab: eps_from_x0(a, b, ab),
    "x0_from_v": lambda a, b, ab: x0_from_v(a, b, ab),
    "eps_from_v": lambda a, b, ab: eps_from_v(a, b, ab),
    "v_from_x0_eps": lambda a, b, ab: v_from_x0_eps(a, b, ab),
    "convert_eps_to_v": lambda a, b, ab: convert_prediction(b, a, ab, source="epsilon", target="v"),
    "convert_sample_to_eps": lambda a, b, ab: convert_prediction(
        b, a, ab, source="sample", target="epsilon"
    ),
    "convert_v_to_sample": lambda a, b, ab: convert_prediction(
        b, a, ab, source="v", target="sample"
    ),
    "top_level_convert": lambda a, b, ab: imgdiff.convert_prediction(
        b, a, ab, source="v", target="epsilon"
    ),
}

BAD_ALPHA_BARS = [
    pytest.param(
        lambda: torch.full((W,), 0.5),
        IVE,
        r"^alpha_bar: expected a float, a 0-d tensor or shape \(2,\) to match the batch, "
        r"got shape \(5,\)",
        id="shape-W",
    ),
    pytest.param(
        lambda: torch.full((B + 1,), 0.5),
        IVE,
        r"^alpha_bar: expected .*shape \(2,\) to match the batch, got shape \(3,\)",
        id="shape-B+1",
    ),
    pytest.param(
        lambda: torch.full((1,), 0.5).expand(B, C),
        IVE,
        r"^alpha_bar: expected .*got shape \(2, 3\)",
        id="shape-2d",
    ),
    pytest.param(lambda: 1.5, IVE, r"^alpha_bar: expected values in \[0, 1\]", id="gt-1"),
    pytest.param(lambda: -0.1, IVE, r"^alpha_bar: expected values in \[0, 1\]", id="negative"),
    pytest.param(
        lambda: torch.tensor([0.5, 1.2]),
        IVE,
        r"^alpha_bar: expected values in \[0, 1\]",
        id="tensor-gt-1",
    ),
    pytest.param(lambda: float("nan"), IVE, r"^alpha_bar: expected values in \[0, 1\]", id="nan"),
    pytest.param(
        lambda: True,
        ITE,
        r"^alpha_bar: expected a float or a tensor of shape \(2,\), got True \(bool\)",
        id="bool",
    ),
    pytest.param(
        lambda: [0.5, 0.5],
        ITE,
        r"^alpha_bar: expected a float or a tensor of shape \(2,\), got object of type list",
        id="list",
    ),
    pytest.param(
        lambda: "0.5",
        ITE,
        r"^alpha_bar: expected a float or a tensor of shape \(2,\), got '0\.5'",
        id="string",
    ),
]


@pytest.mark.parametrize("conv", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
@pytest.mark.parametrize(("make_ab", "exc", "pattern"), BAD_ALPHA_BARS)
def test_conversions_reject_bad_alpha_bar(conv, make_ab, exc, pattern):
    a, b = _randn(*SHAPE), _randn(*SHAPE, seed=1)
    with pytest.raises(exc, match=pattern):
        conv(a, b, make_ab())


PREDICTION_CASES = [
    _case(
        lambda: x0_from_eps(_randn(*SHAPE), _randn(*SHAPE), 0.0),
        IVE,
        r"^alpha_bar: x0 cannot be recovered from eps where alpha_bar = 0 \(zero terminal SNR\)",
        "x0-from-eps-at-0",
    ),
    _case(
        lambda: x0_from_eps(_randn(*SHAPE), _randn(*SHAPE), torch.tensor([0.5, 0.0])),
        IVE,
        r"^alpha_bar: x0 cannot be recovered from eps where alpha_bar = 0",
        "x0-from-eps-one-sample-at-0",
    ),
    _case(
        lambda: convert_prediction(
            _randn(*SHAPE), _randn(*SHAPE), 0.0, source="epsilon", target="sample"
        ),
        IVE,
        r"^alpha_bar: x0 cannot be recovered from eps where alpha_bar = 0",
        "convert-eps-to-sample-at-0",
    ),
    _case(
        lambda: convert_prediction(
            _randn(*SHAPE), _randn(*SHAPE), 0.0, source="epsilon", target="v"
        ),
        IVE,
        r"^alpha_bar: x0 cannot be recovered from eps where alpha_bar = 0",
        "convert-eps-to-v-at-0",
    ),
    _case(
        lambda: eps_from_x0(_randn(*SHAPE), _randn(*SHAPE), 1.0),
        IVE,
        r"^alpha_bar: eps cannot be recovered from x0 where alpha_bar = 1",
        "eps-from-x0-at-1",
    ),
    _case(
        lambda: convert_prediction(
            _randn(*SHAPE), _randn(*SHAPE), 1.0, source="sample", target="v"
        ),
        IVE,
        r"^alpha_bar: eps cannot be recovered from x0 where alpha_bar = 1",
        "convert-sample-to-v-at-1",
    ),
    _case(
        lambda: x0_from_v(_randn(*SHAPE).long(), _randn(*SHAPE), 0.5),
        ITE,
        r"^x_t: expected a floating-point tensor, got dtype torch\.int64",
        "x-t-int",
    ),
    _case(
        lambda: x0_from_v(_randn(*SHAPE), _randn(1, C, H, W), 0.5),
        IVE,
        r"^v: expected shape \(2, 3, 4, 5\) \(the shape of x_t\), got \(1, 3, 4, 5\)",
        "v-broadcastable",
    ),
    _case(
        lambda: v_from_x0_eps(_randn(*SHAPE), _randn(B, C, H), 0.5),
        IVE,
        r"^eps: expected shape \(2, 3, 4, 5\) \(the shape of x0\), got \(2, 3, 4\)",
        "eps-rank",
    ),
    _case(
        lambda: convert_prediction(
            _randn(*SHAPE), _randn(1, C, H, W), 0.5, source="v", target="sample"
        ),
        IVE,
        r"^output: expected shape \(1, 3, 4, 5\) \(the shape of x_t\), got \(2, 3, 4, 5\)",
        "convert-output-shape",
    ),
    _case(
        lambda: convert_prediction(_randn(*SHAPE), _randn(*SHAPE), 0.5, source="eps", target="v"),
        IVE,
        r"^source: expected one of 'epsilon', 'sample', 'v', got 'eps'",
        "convert-source",
    ),
    _case(
        lambda: convert_prediction(_randn(*SHAPE), _randn(*SHAPE), 0.5, source="v", target="x0"),
        IVE,
        r"^target: expected one of 'epsilon', 'sample', 'v', got 'x0'",
        "convert-target",
    ),
    _case(
        lambda: linear_prediction_coefficients("x0", torch.tensor([0.5])),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'x0'",
        "linear-coefficients-prediction",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), PREDICTION_CASES)
def test_prediction_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


@pytest.mark.parametrize(
    "alpha_bar",
    [
        pytest.param(lambda: torch.full((W,), 0.5), id="shape-W"),
        pytest.param(lambda: 1.5, id="gt-1"),
        pytest.param(lambda: "0.5", id="string"),
    ],
)
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v"])
def test_convert_prediction_identity_still_validates_alpha_bar(alpha_bar, kind):
    x = _randn(*SHAPE)
    with pytest.raises(imgdiff.ImgdiffError, match=r"^alpha_bar: "):
        convert_prediction(x, x, alpha_bar(), source=kind, target=kind)


@pytest.mark.parametrize(
    "alpha_bar",
    [
        pytest.param(torch.tensor([1.5], dtype=torch.float64), id="gt-1-gives-nan"),
        pytest.param(torch.tensor([-0.5], dtype=torch.float64), id="negative-gives-nan"),
        pytest.param(0.5, id="float-gives-attribute-error"),
    ],
)
def test_linear_prediction_coefficients_validates_alpha_bar(alpha_bar):
    with pytest.raises(imgdiff.ImgdiffError, match=r"^alpha_bar: "):
        linear_prediction_coefficients("v", alpha_bar)


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_conversions_leave_inputs_unchanged(name):
    a, b, ab = _randn(*SHAPE), _randn(*SHAPE, seed=1), torch.tensor([0.3, 0.7])
    before = _snapshot(a, b, ab)
    out = CONVERSIONS[name](a, b, ab)
    assert out is not a
    assert out is not b
    _assert_unchanged([a, b, ab], before)


# ====================================================================== thresholding


@pytest.mark.parametrize(
    "threshold", [Clip(), Clip(0.5), DynamicThreshold(), DynamicThreshold(0.9, 2.0)]
)
def test_thresholding_leaves_input_unchanged(threshold):
    x0 = 3.0 * _randn(*SHAPE)
    before = _snapshot(x0)
    out = threshold(x0)
    assert out.shape == x0.shape
    _assert_unchanged([x0], before)


# ====================================================================== oracles

ORACLE_CASES = [
    _case(
        lambda: GaussianDenoiser(SCHEDULE, std=0.0),
        IVE,
        r"^std: expected a float > 0\.0, got 0\.0",
        "gaussian-std-0",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE, std=-0.3),
        IVE,
        r"^std: expected a float > 0\.0, got -0\.3",
        "gaussian-std-negative",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE, std=float("nan")),
        IVE,
        r"^std: expected a finite float, got nan",
        "gaussian-std-nan",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE, mean=float("inf")),
        IVE,
        r"^mean: expected a finite float, got inf",
        "gaussian-mean-inf",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE, std="0.3"),
        ITE,
        r"^std: expected a float, got '0\.3'",
        "gaussian-std-string",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE, prediction="x0"),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'x0'",
        "gaussian-prediction",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE)(_randn(*SHAPE), torch.tensor([1, 2, 3])),
        IVE,
        r"^t: expected shape \(2,\) to match the batch, got \(3,\)",
        "gaussian-t-batch",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE)(_randn(*SHAPE), torch.tensor([[1, 2]])),
        IVE,
        r"^t: expected a tensor with 1 dimensions, got shape \(1, 2\)",
        "gaussian-t-2d",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE)(_randn(*SHAPE), 5),
        ITE,
        r"^t: expected a torch\.Tensor, got 5 \(int\)",
        "gaussian-t-int",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE)(
            torch.zeros(SHAPE, dtype=torch.int64), torch.tensor([1, 2])
        ),
        ITE,
        r"^x: expected a floating-point tensor, got dtype torch\.int64",
        "gaussian-x-int",
    ),
    _case(
        lambda: GaussianDenoiser(SCHEDULE)(torch.randn(W), torch.tensor([1] * W)),
        IVE,
        r"^x: expected a tensor with at least 2 dimensions .*got shape \(5,\)",
        "gaussian-x-1d",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, torch.randn(W)),
        IVE,
        r"^data: expected a tensor with at least 2 dimensions .*got shape \(5,\)",
        "empirical-data-1d",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, torch.zeros(4, C, dtype=torch.int64)),
        ITE,
        r"^data: expected a floating-point tensor, got dtype torch\.int64",
        "empirical-data-int",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, [[0.0, 1.0]]),
        ITE,
        r"^data: expected a torch\.Tensor, got object of type list",
        "empirical-data-list",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, _randn(4, C, H, W), prediction="noise"),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'noise'",
        "empirical-prediction",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, _randn(4, C, H, H))(
            _randn(*SHAPE), torch.tensor([1, 2])
        ),
        IVE,
        r"^x: expected items of shape \(3, 4, 4\) like data, got \(3, 4, 5\)",
        "empirical-item-shape",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, _randn(4, C * H * W))(
            _randn(*SHAPE), torch.tensor([1, 2])
        ),
        IVE,
        r"^x: expected items of shape \(60,\) like data, got \(3, 4, 5\)",
        "empirical-item-flat",
    ),
    _case(
        lambda: EmpiricalDenoiser(SCHEDULE, _randn(4, C, H, W))(
            _randn(*SHAPE), torch.tensor([1, 2, 3])
        ),
        IVE,
        r"^t: expected shape \(2,\) to match the batch, got \(3,\)",
        "empirical-t-batch",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), ORACLE_CASES)
def test_oracles_reject(fn, exc, pattern):
    _check(fn, exc, pattern)


ORACLES = {
    "gaussian": lambda: GaussianDenoiser(SCHEDULE),
    "empirical": lambda: EmpiricalDenoiser(SCHEDULE, _randn(4, C, H, W, seed=3)),
}


@pytest.mark.parametrize("oracle", list(ORACLES.values()), ids=list(ORACLES))
@pytest.mark.parametrize(
    ("t", "exc", "pattern"),
    [
        pytest.param(torch.tensor([3.7, 1.2]), ITE, r"^t: .*integer", id="float-t-truncated"),
        pytest.param(torch.tensor([T, 1]), IVE, r"^t: .*\[0, 19\]", id="t-T-raw-index-error"),
        pytest.param(torch.tensor([-1, 1]), IVE, r"^t: .*\[0, 19\]", id="t-minus-one-wraps"),
    ],
)
def test_oracle_timesteps_are_validated(oracle, t, exc, pattern):
    with pytest.raises(exc, match=pattern):
        oracle()(_randn(*SHAPE), t)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_empirical_denoiser_is_finite_at_zero_terminal_snr(prediction):
    oracle = EmpiricalDenoiser(ZSNR, _randn(4, C, H, W, seed=3), prediction=prediction)
    out = oracle(_randn(*SHAPE), torch.tensor([T - 1, T - 1]))
    assert torch.isfinite(out).all()


# ====================================================================== losses

LOSS_CASES = [
    _case(
        lambda: denoising_loss(_randn(*SHAPE), _randn(B, 2, H, W)),
        IVE,
        r"^target: expected shape \(2, 3, 4, 5\) \(the shape of model_output\), got \(2, 2, 4, 5\)",
        "denoising-shape",
    ),
    _case(
        lambda: denoising_loss(_randn(*SHAPE), _randn(1, C, H, W)),
        IVE,
        r"^target: expected shape \(2, 3, 4, 5\) .*got \(1, 3, 4, 5\)",
        "denoising-broadcastable",
    ),
    _case(
        lambda: denoising_loss(_randn(*SHAPE), _randn(*SHAPE), norm="l3"),
        IVE,
        r"^norm: expected one of 'l2', 'l1', got 'l3'",
        "denoising-norm",
    ),
    _case(
        lambda: denoising_loss(_randn(*SHAPE), _randn(*SHAPE), norm="L2"),
        IVE,
        r"^norm: expected one of 'l2', 'l1', got 'L2'",
        "denoising-norm-case",
    ),
    _case(
        lambda: denoising_loss(torch.zeros(SHAPE, dtype=torch.int64), _randn(*SHAPE)),
        ITE,
        r"^model_output: expected a floating-point tensor, got dtype torch\.int64",
        "denoising-int",
    ),
    _case(
        lambda: denoising_loss(_randn(*SHAPE), SHAPE),
        ITE,
        r"^target: expected a torch\.Tensor, got object of type tuple",
        "denoising-target-tuple",
    ),
    _case(
        lambda: denoising_loss(torch.tensor(1.0), torch.tensor(1.0)),
        IVE,
        r"^model_output: expected a tensor with at least 1 dimensions",
        "denoising-0d",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1, 2]), "v", gamma=0.0),
        IVE,
        r"^gamma: expected a float > 0\.0, got 0\.0",
        "min-snr-gamma-0",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1, 2]), "v", gamma=-5.0),
        IVE,
        r"^gamma: expected a float > 0\.0, got -5\.0",
        "min-snr-gamma-negative",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1, 2]), "v", gamma=float("nan")),
        IVE,
        r"^gamma: expected a finite float, got nan",
        "min-snr-gamma-nan",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1, 2]), "eps"),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'eps'",
        "min-snr-prediction",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1.0, 2.0]), "v"),
        ITE,
        r"^t: expected an integer tensor of timesteps, got dtype torch\.float32",
        "min-snr-t-float",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([[1, 2]]), "v"),
        IVE,
        r"^t: expected a tensor with 1 dimensions, got shape \(1, 2\)",
        "min-snr-t-2d",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, torch.tensor([1, T]), "v"),
        IVE,
        r"^t: expected timesteps in \[.*, 19\], got values from 1 to 20",
        "min-snr-t-T",
    ),
    _case(
        lambda: min_snr_weight(SCHEDULE, 5, "v"),
        ITE,
        r"^t: expected a torch\.Tensor, got 5 \(int\)",
        "min-snr-t-int",
    ),
    _case(
        lambda: min_snr_weight_from_alpha_bar(torch.tensor([0.5, 1.5]), "sample"),
        IVE,
        r"^alpha_bar: expected values in \[0, 1\], got values from 0\.5 to 1\.5",
        "min-snr-alpha-bar-above-1",
    ),
    _case(
        lambda: min_snr_weight_from_alpha_bar(torch.tensor([float("nan")]), "epsilon"),
        IVE,
        r"^alpha_bar: expected values in \[0, 1\], got 1 NaN",
        "min-snr-alpha-bar-nan",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE, _randn(*SHAPE), _randn(*SHAPE), _randn(*SHAPE), torch.tensor([1, 2])
        ),
        IVE,
        r"^model_output: expected shape \(2, 6, 4, 5\) \(mean and variance channels\), "
        r"got \(2, 3, 4, 5\)",
        "vlb-model-output-C",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(1, C, H, W),
            torch.tensor([1, 2]),
        ),
        IVE,
        r"^x_t: expected shape \(2, 3, 4, 5\) \(the shape of x0\), got \(1, 3, 4, 5\)",
        "vlb-x-t-shape",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2, 3]),
        ),
        IVE,
        r"^t: expected shape \(2,\) to match the batch size 2, got shape \(3,\)",
        "vlb-t-batch",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE, _randn(B, 2 * C, H, W), _randn(*SHAPE), _randn(*SHAPE), torch.tensor([-1, 2])
        ),
        IVE,
        r"^t: expected timesteps in \[0, 19\], got values from -1 to 2",
        "vlb-t-minus-one",
    ),
    _case(
        lambda: vlb_term(SCHEDULE, _randn(B, 2 * C), _randn(B), _randn(B), torch.tensor([1, 2])),
        IVE,
        r"^x0: expected a tensor with at least 2 dimensions",
        "vlb-x0-1d",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
            prediction="eps",
        ),
        IVE,
        r"^prediction: expected one of 'epsilon', 'sample', 'v', got 'eps'",
        "vlb-prediction",
    ),
    _case(
        lambda: vlb_term(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
            variance="foo",
        ),
        IVE,
        r"^variance: expected one of .*'learned', 'learned_range', got 'foo'",
        "vlb-variance",
    ),
    _case(
        lambda: hybrid_loss(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
            vlb_weight=-1.0,
        ),
        IVE,
        r"^vlb_weight: expected a float >= 0\.0, got -1\.0",
        "hybrid-vlb-weight",
    ),
    _case(
        lambda: hybrid_loss(
            SCHEDULE,
            _randn(*SHAPE),
            _randn(*SHAPE),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
        ),
        IVE,
        r"^model_output: expected shape \(2, 6, 4, 5\)",
        "hybrid-model-output-C",
    ),
    _case(
        lambda: hybrid_loss(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            _randn(1, C, H, W),
            torch.tensor([1, 2]),
        ),
        IVE,
        r"^noise: expected shape \(2, 3, 4, 5\) \(the shape of x0\), got \(1, 3, 4, 5\)",
        "hybrid-noise-shape",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), LOSS_CASES)
def test_losses_reject(fn, exc, pattern):
    _check(fn, exc, pattern)


def test_min_snr_weight_rejects_t_minus_one():
    with pytest.raises(IVE, match=r"^t: expected timesteps in \[0, 19\], got values from -1"):
        min_snr_weight(SCHEDULE, torch.tensor([-1, 3]), "epsilon")


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    w = min_snr_weight(ZSNR, torch.tensor([T - 1, 3]), "epsilon")
    assert torch.isfinite(w).all()
    assert float(w[0]) == 1.0


def test_vlb_term_rejects_fixed_variance():
    with pytest.raises(IVE, match=r"^variance: expected one of 'learned', 'learned_range'"):
        vlb_term(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
            variance="fixed_small",
        )


@pytest.mark.parametrize(
    ("x0", "exc"),
    [
        pytest.param("x0", ITE, id="string-attribute-error"),
        pytest.param(_randn(B), IVE, id="1d-index-error"),
    ],
)
def test_hybrid_loss_validates_x0_first(x0, exc):
    with pytest.raises(exc, match=r"^x0: "):
        hybrid_loss(
            SCHEDULE,
            _randn(B, 2 * C, H, W),
            x0,
            _randn(*SHAPE),
            _randn(*SHAPE),
            torch.tensor([1, 2]),
        )


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(
            lambda: discretized_gaussian_log_likelihood(
                _randn(*SHAPE), torch.zeros(W), torch.zeros(1)
            ),
            id="discretized-gaussian",
        ),
        pytest.param(
            lambda: normal_kl(_randn(*SHAPE), torch.zeros(W), torch.zeros(C, 1, 1), 0.0),
            id="normal-kl",
        ),
    ],
)
def test_elementwise_losses_reject_mismatched_shapes(fn):
    with pytest.raises(IVE, match=r"expected shape \(2, 3, 4, 5\)"):
        fn()


def test_losses_leave_inputs_unchanged():
    out = _randn(B, 2 * C, H, W)
    x0, xt, noise = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), _randn(*SHAPE, seed=3)
    t = torch.tensor([0, 7])
    before = _snapshot(out, x0, xt, noise, t)
    denoising_loss(out[:, :C], noise, norm="l1")
    min_snr_weight(SCHEDULE, t, "v")
    vlb_term(SCHEDULE, out, x0, xt, t)
    hybrid_loss(SCHEDULE, out, x0, xt, noise, t)
    _assert_unchanged([out, x0, xt, noise, t], before)


# ====================================================================== randn

RANDN_CASES = [
    _case(
        lambda: randn(()),
        IVE,
        r"^shape: expected at least a batch dimension, got \(\)",
        "empty-shape",
    ),
    _case(
        lambda: randn([]),
        IVE,
        r"^shape: expected at least a batch dimension, got \(\)",
        "empty-list-shape",
    ),
    _case(
        lambda: randn((2, 3), generator=[torch.Generator()]),
        IVE,
        r"^generator: expected one generator per sample \(2\), got 1",
        "generator-list-short",
    ),
    _case(
        lambda: randn((2, 3), generator=[torch.Generator()] * 3),
        IVE,
        r"^generator: expected one generator per sample \(2\), got 3",
        "generator-list-long",
    ),
    _case(
        lambda: randn((2, 3), generator=[torch.Generator(), None]),
        ITE,
        r"^generator: expected a torch\.Generator or a sequence of them, "
        r"got a sequence containing None",
        "generator-list-none",
    ),
    _case(
        lambda: randn((2, 3), generator=42),
        ITE,
        r"^generator: expected None, a torch\.Generator or a sequence of them, got 42 \(int\)",
        "generator-seed",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "pattern"), RANDN_CASES)
def test_randn_rejects(fn, exc, pattern):
    _check(fn, exc, pattern)


@pytest.mark.parametrize(
    ("fn", "exc", "pattern"),
    [
        pytest.param(lambda: randn(5), ITE, r"^shape: ", id="int-shape-raw-type-error"),
        pytest.param(lambda: randn((2.5, 3)), ITE, r"^shape: ", id="float-dim-truncated"),
        pytest.param(
            lambda: randn((2, -3)), IVE, r"^shape: .*-3", id="negative-dim-raw-runtime-error"
        ),
        pytest.param(
            lambda: randn((2, 3), dtype=torch.int64),
            ITE,
            r"^dtype: .*torch\.int64",
            id="int-dtype-raw-not-implemented",
        ),
    ],
)
def test_randn_validates_shape_and_dtype(fn, exc, pattern):
    _check(fn, exc, pattern)


# ====================================================================== schedule arguments of free functions


def _x4():
    return _randn(*SHAPE)


NEEDS_SCHEDULE = {
    "karras_sigmas": lambda s: karras_sigmas(s, 5),
    "sigma_to_timestep": lambda s: sigma_to_timestep(torch.tensor([1.0]), s),
    "add_noise": lambda s: add_noise(s, _x4(), _x4(), 1),
    "training_target": lambda s: training_target(s, _x4(), _x4(), 1, "v"),
    "respaced_betas": lambda s: respaced_betas(s, [10, 5, 0]),
    "min_snr_weight": lambda s: min_snr_weight(s, torch.tensor([1, 2]), "v"),
    # t beyond len("linear"): otherwise the DDPM built inside vlb_term catches the string
    "vlb_term": lambda s: vlb_term(s, _randn(B, 2 * C, H, W), _x4(), _x4(), torch.tensor([7, 12])),
    "GaussianDenoiser": lambda s: GaussianDenoiser(s),
    "EmpiricalDenoiser": lambda s: EmpiricalDenoiser(s, _x4()),
}


@pytest.mark.parametrize("fn", list(NEEDS_SCHEDULE.values()), ids=list(NEEDS_SCHEDULE))
def test_functions_taking_a_schedule_check_its_type(fn):
    with pytest.raises(ITE, match=r"^schedule: expected an imgdiff\.NoiseSchedule, got 'linear'"):
        fn("linear")


# ====================================================================== messages say what came

MESSAGE_GOT_CASES = [
    (lambda: x0_from_v(_x4(), _x4(), 1.5), r"^alpha_bar: .*got 1\.5", "alpha-bar-range"),
    (
        lambda: sigma_to_timestep(torch.tensor([2.0, -1.0]), SCHEDULE),
        r"^sigmas: .*got .*-1\.0",
        "sigmas-non-positive",
    ),
    (
        lambda: _step_at(t=torch.tensor([5, 5]), prev_t=torch.tensor([4, 6])),
        r"^prev_t: .*got .*6",
        "prev-t-not-below-t",
    ),
    (
        lambda: NoiseSchedule.from_alphas_cumprod([0.5, 0.9]),
        r"^alphas_cumprod: .*got .*0\.9",
        "alphas-cumprod-increasing",
    ),
    (
        lambda: NoiseSchedule.from_betas([0.1, 1.0, 0.5]),
        r"^betas: .*got .*1\.0",
        "betas-one-before-last",
    ),
    (lambda: DDIM(SCHEDULE, dtype=torch.int64), r"^dtype: .*got torch\.int64", "dtype-name"),
    (
        lambda: respace_timesteps(1000, [10, -5]),
        r"^section_counts\[1\]: ",
        "section-counts-index",
    ),
]


@pytest.mark.parametrize(
    ("fn", "pattern"), [pytest.param(*c[:2], id=c[2]) for c in MESSAGE_GOT_CASES]
)
def test_messages_say_what_came(fn, pattern):
    with pytest.raises(imgdiff.ImgdiffError, match=pattern):
        fn()


# -- the public update()/step() forward user tensors to the fused kernels -----------------------


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize(
    "make",
    [
        lambda b: DDIM(NoiseSchedule.linear(), eta=0.5, backend=b),
        lambda b: DDPM(NoiseSchedule.linear(), backend=b),
        lambda b: DDPM(NoiseSchedule.linear(), variance="learned_range", backend=b),
    ],
)
def test_update_rejects_outputs_and_noise_of_another_shape(backend, make):
    """A model output or noise that is not x's shape raises naming it on every backend: never a
    silent broadcast (torch) nor a read past the tensor (the kernels walk x's elements)."""
    sampler = make(backend)
    c = sampler.coefficients(sampler.plan(10)).unbind()[3]
    dev = device_for(backend)
    x = torch.randn(4, 3, 8, 8, device=dev)
    factor = sampler.output_channels_factor
    good_out = torch.randn(4, 3 * factor, 8, 8, device=dev)
    noise = torch.randn(4, 3, 8, 8, device=dev)
    for shape in ((1, 3 * factor, 8, 8), (4, 3 * factor, 1, 1)):
        with pytest.raises(imgdiff.InputValueError, match=r"^out: expected"):
            sampler.update(x, torch.randn(shape, device=dev), c, noise)
    with pytest.raises(imgdiff.InputValueError, match=r"^noise: expected shape \(4, 3, 8, 8\)"):
        sampler.update(x, good_out, c, torch.randn(1, 3, 8, 8, device=dev))
    assert sampler.update(x, good_out, c, noise).state.shape == x.shape


@pytest.mark.parametrize("backend", backends_here())
def test_update_result_dtype_is_torch_promotion_on_every_backend(backend):
    """Mixed dtypes between x and the model output: every backend gives torch's promoted dtype
    (the kernels run only where the dtypes agree)."""
    for x_dtype, out_dtype in [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
    ]:
        for sampler in (
            DDIM(NoiseSchedule.linear(), backend=backend),
            DDPM(NoiseSchedule.linear(), backend=backend),
        ):
            c = sampler.coefficients(sampler.plan(10)).unbind()[3]
            x, out = torch.randn(2, 3, 8, 8).to(x_dtype), torch.randn(2, 3, 8, 8).to(out_dtype)
            noise = torch.randn(2, 3, 8, 8).to(x_dtype)
            got = sampler.update(x, out, c, noise).state
            reference = type(sampler)(NoiseSchedule.linear(), backend="torch")
            ref = reference.update(x, out, c, noise).state
            assert got.dtype == ref.dtype == torch.promote_types(x_dtype, out_dtype)
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", backends_here())
def test_edict_step_rejects_a_pair_of_two_shapes(backend):
    from imgdiff.models import BoundModel
    from imgdiff.samplers.step import StepContext

    sampler = imgdiff.EDICT(NoiseSchedule.linear(), dtype=None, backend=backend)
    c = sampler.coefficients(sampler.plan(10)).unbind()[3]
    ctx = StepContext(3, 10, 700, 600, torch.full((2,), 700), torch.full((2,), 600))
    model = BoundModel(lambda z, t: 0.1 * z, model_dtype=torch.float32, state_dtype=torch.float32)
    pair = (torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8))
    for step in (sampler.step, sampler.inverse_step):
        with pytest.raises(
            imgdiff.InputValueError, match=r"^state: expected a pair \(x, y\) of one shape"
        ):
            step(model, pair, c, ctx, None)


# -- tensors on another device than the sample ("meta" stands in for a GPU here): the fused CPU
# kernels read raw pointers, so such a tensor must be named before it reaches them


class _MetaGradient(imgdiff.Guidance):
    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _meta_like(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        pytest.param(
            lambda b: _sample(DDIM(SCHEDULE, backend=b), model=_meta_like),
            r"^model output: expected a tensor on the sample's device cpu, got meta",
            id="ddim-model",
        ),
        pytest.param(
            lambda b: _sample(DDPM(SCHEDULE, backend=b), model=_meta_like),
            r"^model output: expected a tensor on the sample's device cpu, got meta",
            id="ddpm-model",
        ),
        pytest.param(
            lambda b: _sample(imgdiff.EDICT(SCHEDULE, backend=b), model=_meta_like),
            r"^model output: expected a tensor on the sample's device cpu, got meta",
            id="edict-model",
        ),
        pytest.param(
            lambda b: _sample(
                imgdiff.EDICT(SCHEDULE, backend=b),
                noise=(_randn(*SHAPE), _meta_like(_randn(*SHAPE))),
            ),
            r"^noise\[1\]: expected a tensor on noise\[0\]'s device cpu, got meta",
            id="edict-pair",
        ),
        pytest.param(
            lambda b: _sample(DDIM(SCHEDULE, backend=b, guidance=_MetaGradient())),
            r"^guidance: expected a gradient on the sample's device cpu, got meta",
            id="guidance-gradient",
        ),
        pytest.param(
            lambda b: DDPM(SCHEDULE, backend=b).step_at(
                _meta_like(_randn(*SHAPE)), _randn(*SHAPE), 5, 3
            ),
            r"^model_output: expected a tensor on the sample's device cpu, got meta",
            id="step-at-output",
        ),
        pytest.param(
            lambda b: DDPM(SCHEDULE, backend=b).step_at(
                _randn(*SHAPE), _randn(*SHAPE), 5, 3, noise=_meta_like(_randn(*SHAPE))
            ),
            r"^noise: expected a tensor on x's device cpu, got meta",
            id="step-at-noise",
        ),
    ],
)
def test_tensors_on_another_device_are_named(backend, call, pattern):
    """No segfault in the CPU kernels and no raw torch error: the argument and both devices."""
    _check(lambda: call(backend), IVE, pattern)
