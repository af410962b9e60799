"""The sampler contract of DESIGN.md: explicit state, reuse, per-sample generators, dtypes, no syncs."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import warnings
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import imgdiff
from imgdiff import DDIM, DDPM, Clip, DynamicThreshold, GaussianDenoiser, NoiseSchedule
from imgdiff.conditioning import KnownRegion

from .conftest import TanhModel, TimeOnlyModel, backends_here, device_for

SAMPLERS = {
    "ddim": lambda s: DDIM(s),
    "ddim_eta": lambda s: DDIM(s, eta=0.7),
    "ddpm": lambda s: DDPM(s),
    "ddpm_large": lambda s: DDPM(s, variance="fixed_large"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_batch_invariance_with_per_sample_generators(name: str) -> None:
    """A sample drawn inside a batch with one generator per sample equals the same sample alone."""
    s = NoiseSchedule.linear()
    sampler = SAMPLERS[name](s)
    model = GaussianDenoiser(s)  # elementwise: no batch-size-dependent BLAS rounding

    def gens(seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(k) for k in seeds]

    seeds = [11, 22, 33]
    noise = imgdiff.randn((3, 2, 4, 4), generator=gens(seeds), dtype=torch.float64)
    batch = sampler.sample(model, noise, num_steps=20, generator=gens(seeds), progress=False)
    for b, seed in enumerate(seeds):
        alone_noise = imgdiff.randn((1, 2, 4, 4), generator=gens([seed]), dtype=torch.float64)
        assert torch.equal(alone_noise, noise[b : b + 1])
        alone = sampler.sample(
            model, alone_noise, num_steps=20, generator=gens([seed]), progress=False
        )
        assert torch.equal(alone, batch[b : b + 1])


def test_batch_invariance_with_a_network_model() -> None:
    """Same with a matmul model: equal up to BLAS rounding (float64)."""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    g = [torch.Generator().manual_seed(k) for k in (5, 6)]
    noise = imgdiff.randn((2, 2, 3, 3), generator=g, dtype=torch.float64)
    g = [torch.Generator().manual_seed(k) for k in (5, 6)]
    batch = DDPM(s).sample(model, noise, num_steps=30, generator=g, progress=False)
    alone = DDPM(s).sample(
        model, noise[1:], num_steps=30, generator=[torch.Generator().manual_seed(6)], progress=False
    )
    torch.testing.assert_close(alone, batch[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_reuse_across_batch_sizes_and_step_counts(name: str) -> None:
    """One sampler object used with batch sizes 1, 3, 8 and step counts 10, 25, 50 equals fresh objects."""
    s = NoiseSchedule.scaled_linear()
    shared = SAMPLERS[name](s)
    model = TanhModel((2, 3, 3))
    for batch, steps in ((1, 10), (3, 25), (8, 50), (1, 25)):
        x = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(batch))
        a = shared.sample(
            model,
            x,
            num_steps=steps,
            generator=torch.Generator().manual_seed(steps),
            progress=False,
        )
        b = SAMPLERS[name](s).sample(
            model,
            x,
            num_steps=steps,
            generator=torch.Generator().manual_seed(steps),
            progress=False,
        )
        assert torch.equal(a, b)


def test_samplers_are_frozen() -> None:
    """Options cannot change after construction; there is no hidden mutable state to reset."""
    sampler = DDIM(NoiseSchedule.linear())
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.eta = 1.0  # type: ignore[misc]
    assert dataclasses.replace(sampler, eta=0.5).eta == 0.5


def _conditioned_model(x: torch.Tensor, t: torch.Tensor, *, c: torch.Tensor) -> torch.Tensor:
    """A cheap conditional eps model, ``tanh(x / 2 + c)``, for any shape."""
    return torch.tanh(0.5 * x + c)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 3, 3), (4, 4, 128, 128)],  # the second is MIN_BYTES: outputs come from the pool
    ids=["small", "pooled"],
)
def test_inputs_are_not_modified(backend: str, shape: tuple[int, ...]) -> None:
    """Every entry point leaves every tensor the caller passed untouched: the sample, the model
    kwargs, step noise, pairs, masks, known images and diffusers-style model outputs, on each
    backend and at the size where outputs come from the buffer pool."""
    device = device_for(backend)
    if device == "cpu" and backend == "triton" and shape[-1] > 3:
        pytest.skip("the Triton interpreter is slow at pool sizes; its kernels are tested alone")
    assert math.prod(shape) * 4 >= imgdiff.buffers.MIN_BYTES or shape[-1] == 3
    s = NoiseSchedule.linear(100)
    g = torch.Generator().manual_seed(0)
    steps = 3

    def draw(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=g).to(device)

    x, c, y, out = draw(*shape), 0.1 * draw(*shape), draw(*shape), draw(*shape)
    step_noise = draw(steps, *shape)
    mask = torch.rand(shape[0], 1, *shape[2:], generator=g).to(device) > 0.5
    inputs = {"x": x, "c": c, "y": y, "step_noise": step_noise, "out": out, "mask": mask}
    kept = {name: value.clone() for name, value in inputs.items()}
    kw = {"num_steps": steps, "model_kwargs": {"c": c}, "progress": False}
    model = _conditioned_model

    DDPM(s, backend=backend).sample(model, x, step_noise=step_noise, **kw)
    DDIM(s, eta=1.0, backend=backend).sample(model, x, step_noise=step_noise, **kw)
    DDIM(s, backend=backend, thresholding=DynamicThreshold()).sample(model, x, **kw)
    DDIM(s, backend=backend).invert(model, x, **kw)
    for dtype in (torch.float64, None):  # None: float32 state, the inputs' own dtype
        edict = imgdiff.EDICT(s, backend=backend, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", imgdiff.PrecisionWarning)
            edict.sample(model, x, **kw)
            edict.sample(model, (x, y), **kw)
            edict.invert(model, x, **kw)
            edict.invert(model, (x, y), **kw)
    for region in (
        KnownRegion(y, mask, backend=backend),
        KnownRegion(y, mask, mode="noised", schedule=s, backend=backend),
    ):
        first = int(DDIM(s).timesteps(steps)[0])
        DDIM(s, backend=backend).sample(model, region.start(x, first), callback=region, **kw)
    t, prev_t = (
        torch.full((shape[0],), 50, device=device),
        torch.full((shape[0],), 30, device=device),
    )
    DDPM(s, backend=backend).step_at(out, x, t, prev_t, noise=step_noise[0])
    DDIM(s, eta=0.5, backend=backend).step_at(out, x, t, prev_t, noise=step_noise[0])
    for name, value in inputs.items():
        assert torch.equal(value, kept[name]), name


def test_callback_sees_each_step_and_can_replace_the_state() -> None:
    """The callback gets index, timestep, state and a lazily computed x0_hat; a returned tensor replaces the state."""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    sampler = DDIM(s)
    infos: list[imgdiff.StepInfo[torch.Tensor]] = []
    final = sampler.sample(model, x, num_steps=10, callback=infos.append, progress=False)
    assert [i.index for i in infos] == list(range(10))
    assert [i.timestep for i in infos] == list(sampler.timesteps(10))
    assert all(i.num_steps == 10 for i in infos)
    assert torch.equal(infos[-1].state, final)
    # x0_hat equals the model's prediction converted at that step's input.
    prev = x
    for info in infos[:3]:
        eps = model(prev, torch.full((1,), info.timestep))
        ab = s.alphas_cumprod[info.timestep]
        torch.testing.assert_close(info.x0_hat, (prev - (1 - ab).sqrt() * eps) / ab.sqrt())
        prev = info.state

    def zero_at_five(info: imgdiff.StepInfo[torch.Tensor]) -> torch.Tensor | None:
        return torch.zeros_like(info.state) if info.index == 5 else None

    replaced = sampler.sample(model, x, num_steps=10, callback=zero_at_five, progress=False)
    restart = sampler.sample(
        model, torch.zeros_like(x), timesteps=list(sampler.timesteps(10))[6:], progress=False
    )
    torch.testing.assert_close(replaced, restart, rtol=0, atol=0)


class _RecordingNet(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1, dtype=dtype))
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return torch.tanh(x) * self.scale


def test_sampler_dtype_is_independent_of_the_model_dtype() -> None:
    """The model runs in its parameters' dtype; the state stays in the sampler's dtype."""
    s = NoiseSchedule.linear()
    net = _RecordingNet(torch.float32)
    x = torch.randn(2, 2, 3, 3)
    out = DDIM(s, dtype=torch.float64).sample(net, x, num_steps=4, progress=False)
    assert out.dtype == torch.float64
    assert set(net.seen) == {torch.float32}
    net64 = _RecordingNet(torch.float64)
    out32 = DDIM(s).sample(net64, x, num_steps=4, progress=False)
    assert out32.dtype == torch.float32
    assert set(net64.seen) == {torch.float64}
    fn_seen: list[torch.dtype] = []

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fn_seen.append(x.dtype)
        return torch.zeros_like(x)

    DDIM(s, dtype=torch.float64).sample(
        fn, x, num_steps=3, model_dtype=torch.bfloat16, progress=False
    )
    assert set(fn_seen) == {torch.bfloat16}
    # Half-precision inputs are computed in float32 by default.
    assert DDIM(s).sample(fn, x.half(), num_steps=2, progress=False).dtype == torch.float32


_GLOBAL_NET = _RecordingNet(torch.float64)


def test_model_dtype_is_found_through_a_function_naming_a_global_network() -> None:
    """``lambda x, t: unet(x, t)`` at a notebook's top level names ``unet`` as a global, not a
    closure: the model's dtype is still found (it was None: the network got the state dtype)."""
    s = NoiseSchedule.linear()
    _GLOBAL_NET.seen.clear()
    wrapped = lambda x, t: _GLOBAL_NET(x, t)  # noqa: E731 - the notebook idiom under test
    assert imgdiff.models.infer_model_dtype(wrapped) == torch.float64
    DDIM(s).sample(wrapped, torch.randn(2, 2, 3, 3), num_steps=2, progress=False)
    assert set(_GLOBAL_NET.seen) == {torch.float64}


def test_injected_noise_equals_generated_noise() -> None:
    """step_noise as a tensor or a function reproduces a generator's per-step draws."""
    s = NoiseSchedule.linear()
    model = TanhModel((2, 3, 3))
    x = torch.randn(2, 2, 3, 3)
    sampler = DDPM(s)
    n = 12
    a = sampler.sample(
        model, x, num_steps=n, generator=torch.Generator().manual_seed(3), progress=False
    )
    g = torch.Generator().manual_seed(3)
    z = torch.stack(
        [torch.randn(2, 2, 3, 3, generator=g) for _ in range(n - 1)] + [torch.zeros(2, 2, 3, 3)]
    )
    b = sampler.sample(model, x, num_steps=n, step_noise=z, progress=False)
    c = sampler.sample(model, x, num_steps=n, step_noise=lambda i: z[i], progress=False)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_model_kwargs_reach_the_model() -> None:
    """Conditioning passed as model_kwargs arrives at every call."""
    s = NoiseSchedule.linear()
    got: list[float] = []

    def model(x: torch.Tensor, t: torch.Tensor, *, cond: float) -> torch.Tensor:
        got.append(cond)
        return torch.zeros_like(x)

    DDIM(s).sample(
        model, torch.randn(1, 1, 2, 2), num_steps=3, model_kwargs={"cond": 2.5}, progress=False
    )
    assert got == [2.5, 2.5, 2.5]


class _SyncCounter(TorchDispatchMode):
    """Counts ops that read tensor values on the host (what .item(), bool(t) and nonzero do)."""

    SYNCING: ClassVar[set[object]] = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.equal.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


# Every option that changes the loop's code path: thresholding, rederived eps, learned variance.
LOOP_CONFIGS = {
    **SAMPLERS,
    "ddim_clip_rederive": lambda s: DDIM(s, thresholding=Clip(1.0), rederive_eps=True),
    "ddim_dynamic": lambda s: DDIM(s, eta=1.0, thresholding=DynamicThreshold(0.9, 1.5)),
    "ddpm_clip": lambda s: DDPM(s, thresholding=Clip(1.0)),
    "ddpm_learned_range": lambda s: DDPM(s, variance="learned_range"),
}
NOISE_SOURCES = ("generator", "generator_list", "step_noise")


class SyncFreeModel:
    """A model that never reads device values: ``0.5 tanh(x) + 1e-3 t`` (plus variance channels)."""

    def __init__(self, learned_variance: bool) -> None:
        self.learned_variance = learned_variance

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(x) * 0.5 + t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * 1e-3
        return torch.cat([out, torch.zeros_like(out)], dim=1) if self.learned_variance else out


def _noise_kwargs(
    source: str, sampler: imgdiff.Sampler, n: int, x: torch.Tensor
) -> dict[str, object]:
    if source == "generator":
        return {"generator": torch.Generator(device=x.device).manual_seed(0)}
    if source == "generator_list":
        return {
            "generator": [
                torch.Generator(device=x.device).manual_seed(k) for k in range(x.shape[0])
            ]
        }
    return {"step_noise": torch.zeros(n, *x.shape, device=x.device)}


@pytest.mark.parametrize("source", NOISE_SOURCES)
@pytest.mark.parametrize("name", sorted(LOOP_CONFIGS))
def test_no_host_reads_inside_the_loop(name: str, source: str) -> None:
    """No step reads a tensor value on the host: the count does not grow with the number of steps."""
    s = NoiseSchedule.linear()
    sampler = LOOP_CONFIGS[name](s)
    model = SyncFreeModel(isinstance(sampler, DDPM) and sampler.output_channels_factor == 2)
    x = torch.randn(2, 2, 3, 3)
    counts = []
    for n in (5, 40):
        with _SyncCounter() as counter:
            sampler.sample(
                model, x, num_steps=n, progress=False, **_noise_kwargs(source, sampler, n, x)
            )  # type: ignore[arg-type]
        counts.append(counter.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("backend", backends_here())
def test_no_host_reads_inside_edict_or_known_region_loops(backend: str) -> None:
    """EDICT inversion and generation, and DDPM with a noised KnownRegion paste, read no tensor
    value on the host per step, on every backend (the CUDA test below checks the same with
    torch's sync debug mode)."""
    s = NoiseSchedule.linear()
    model = SyncFreeModel(False)
    device = device_for(backend)
    x = torch.randn(2, 2, 3, 3).to(device)
    mask = torch.zeros(1, 1, 3, 3, device=device)
    mask[..., 1:, 1:] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imgdiff.PrecisionWarning)
        edict = imgdiff.EDICT(s, dtype=torch.float32, backend=backend)  # type: ignore[arg-type]
    counts = []
    for n in (5, 30):
        g = torch.Generator(device=device).manual_seed(0)
        region = KnownRegion(x, mask, mode="noised", schedule=s, generator=g, backend=backend)  # type: ignore[arg-type]
        start = region.start(x, int(DDPM(s).timesteps(n)[0]))
        with _SyncCounter() as counter:
            pair = edict.invert(model, x, num_steps=n, progress=False)
            edict.sample(model, pair, num_steps=n, progress=False)
            DDPM(s, backend=backend).sample(  # type: ignore[arg-type]
                model, start, num_steps=n, generator=g, callback=region, progress=False
            )
        counts.append(counter.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("name", sorted(LOOP_CONFIGS))
def test_loop_runs_on_a_device_that_forbids_host_reads(name: str) -> None:
    """On the meta device any .item() or host-table indexing raises: the whole loop still runs."""
    s = NoiseSchedule.linear()
    sampler = LOOP_CONFIGS[name](s)
    model = SyncFreeModel(isinstance(sampler, DDPM) and sampler.output_channels_factor == 2)
    x = torch.empty(2, 3, 8, 8, device="meta")
    out = sampler.sample(model, x, num_steps=10, progress=False)
    assert out.device.type == "meta"
    assert out.shape == x.shape
    if isinstance(sampler, DDIM) and sampler.eta == 0 and sampler.thresholding is None:
        assert sampler.invert(model, x, num_steps=10, progress=False).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("source", NOISE_SOURCES)
@pytest.mark.parametrize("name", sorted(LOOP_CONFIGS))
def test_no_cuda_sync_in_the_loop(
    name: str, source: str, backend: str
) -> None:  # pragma: no cover - GPU only
    """With torch's sync debug mode set to error, a whole CUDA sampling call never synchronises,
    on the torch path and on the Triton kernels.

    Noise comes from CUDA generators or a CUDA step_noise tensor (a CPU generator for a CUDA
    sample copies each step's noise, which is a synchronisation by design).
    """
    s = NoiseSchedule.linear()
    sampler = dataclasses.replace(LOOP_CONFIGS[name](s), backend=backend)
    model = SyncFreeModel(isinstance(sampler, DDPM) and sampler.output_channels_factor == 2)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    kwargs = _noise_kwargs(source, sampler, 20, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(model, x, num_steps=20, progress=False, **kwargs)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_cuda_sync_in_edict_or_known_region_loops(
    backend: str,
) -> None:  # pragma: no cover - GPU only
    """EDICT (float32 state, so the kernels take it) and DDPM with a noised KnownRegion paste run
    whole CUDA loops without a synchronisation."""
    s = NoiseSchedule.linear()
    model = SyncFreeModel(False)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    mask = torch.zeros(1, 1, 16, 16, device="cuda")
    mask[..., 4:12, 4:12] = 1
    g = torch.Generator(device="cuda").manual_seed(0)
    region = imgdiff.conditioning.KnownRegion(
        x, mask, mode="noised", schedule=s, generator=g, backend=backend
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imgdiff.PrecisionWarning)  # float32: the kernels' dtype
        edict = imgdiff.EDICT(s, dtype=torch.float32, backend=backend)  # type: ignore[arg-type]
    first = int(DDPM(s).timesteps(20)[0])
    start = region.start(torch.randn_like(x), first)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pair = edict.invert(model, x, num_steps=20, progress=False)
        out = edict.sample(model, pair, num_steps=20, progress=False)
        pasted = DDPM(s, backend=backend).sample(  # type: ignore[arg-type]
            model, start, num_steps=20, generator=g, callback=region, progress=False
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == pasted.device.type == "cuda"


def test_import_is_light() -> None:
    """import imgdiff loads no optional heavy package."""
    code = (
        "import sys, imgdiff; heavy = {'diffusers', 'open_clip', 'lpips', 'torchmetrics', 'peft', "
        "'transformers', 'torchvision'}; print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    steps=st.integers(1, 60),
    final=st.sampled_from(["one", "first"]),
    strength=st.sampled_from([1.0, 0.6]),
)
def test_inversion_round_trip_property(
    shape: tuple[int, ...], spacing: str, steps: int, final: str, strength: float
) -> None:
    """Any shape, spacing, step count, final level and strength: exact round trip in float64."""
    s = NoiseSchedule.linear()
    assume(int(steps * strength) >= 1)
    model = TimeOnlyModel(shape[1:])
    x0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = DDIM(s, spacing=spacing, final_alpha_bar=final)  # type: ignore[arg-type]
    x_T = sampler.invert(model, x0, num_steps=steps, strength=strength, progress=False)
    rec = sampler.sample(model, x_T, num_steps=steps, strength=strength, progress=False)
    assert x_T.shape == x0.shape
    assert x_T.dtype == torch.float64
    assert float((rec - x0).abs().max()) < 1e-9


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    variance=st.sampled_from(["fixed_small", "fixed_large"]),
    prediction=st.sampled_from(["epsilon", "sample", "v"]),
    steps=st.integers(1, 40),
)
def test_ddpm_property(dtype: torch.dtype, variance: str, prediction: str, steps: int) -> None:
    """DDPM of any configuration returns a finite sample of the input's shape in the state dtype."""
    s = NoiseSchedule.cosine()
    model = GaussianDenoiser(s, prediction=prediction)  # type: ignore[arg-type]
    x = torch.randn(2, 1, 3, 3, dtype=dtype)
    out = DDPM(s, variance=variance, prediction=prediction).sample(
        model, x, num_steps=steps, progress=False
    )  # type: ignore[arg-type]
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_blurred_empirical_denoiser_with_one_item_is_the_gaussian_denoiser() -> None:
    """EmpiricalDenoiser(data=[m], std=s) is the exact denoiser of N(m, s^2): GaussianDenoiser's."""
    s = NoiseSchedule.linear()
    for prediction in ("epsilon", "sample", "v"):
        emp = imgdiff.EmpiricalDenoiser(
            s, torch.full((1, 2, 3, 3), 0.5, dtype=torch.float64), prediction, std=0.3
        )  # type: ignore[arg-type]
        gau = GaussianDenoiser(s, mean=0.5, std=0.3, prediction=prediction)  # type: ignore[arg-type]
        x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0, 10, 500, 999])
        torch.testing.assert_close(emp(x, t), gau(x, t), rtol=1e-10, atol=1e-10)


def test_blurred_empirical_denoiser_is_tweedie() -> None:
    """For K = 3 blurred items, x0_hat = (x_t + (1 - ab) grad log p(x_t)) / sqrt(ab) (Tweedie),
    with log p(x_t) = logsumexp_k -|x_t - sqrt(ab) d_k|^2 / (2 v) and v = ab std^2 + 1 - ab."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    std = 0.4
    model = imgdiff.EmpiricalDenoiser(s, data, "sample", std=std)
    x = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([5, 100, 400, 900])
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = ab * std**2 + 1 - ab
    d2 = ((x.unsqueeze(1) - ab.sqrt().unsqueeze(1) * data.unsqueeze(0)) ** 2).sum(dim=(2, 3, 4))
    log_p = torch.logsumexp(-d2 / (2 * v.reshape(-1, 1)), dim=1).sum()
    (score,) = torch.autograd.grad(log_p, x)
    tweedie = (x + (1 - ab) * score) / ab.sqrt()
    torch.testing.assert_close(model(x.detach(), t), tweedie.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_overridden_x0_hat_is_used_on_every_step(prediction: str, backend: str) -> None:
    """A subclass's ``x0_hat`` (a denoised_fn) shapes every step; the fused shortcut, which never
    forms x0_hat, is taken only where x0_hat is the base class's."""
    from .conftest import backends_here, device_for

    if backend not in backends_here():
        pytest.skip(f"backend {backend} does not run here")
    calls: list[int] = []

    class Denoised(DDIM):
        def x0_hat(self, x, out, coeffs):  # type: ignore[no-untyped-def]
            calls.append(1)
            return super().x0_hat(x, out, coeffs).clamp(-0.1, 0.1)

    s = NoiseSchedule.linear()
    model = GaussianDenoiser(s, prediction=prediction)  # type: ignore[arg-type]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device_for(backend))
    kw = {"num_steps": 10, "progress": False}
    y = Denoised(s, prediction=prediction, backend=backend).sample(model, x, **kw)  # type: ignore[arg-type]
    assert len(calls) == 10
    want = DDIM(s, prediction=prediction, thresholding=Clip(0.1)).sample(model, x, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_step_at_asks_needs_noise_with_one_step_of_floats() -> None:
    """``needs_noise`` written with plain comparisons works in ``step_at`` with a timestep per
    sample, as in the loop (it was handed (B, 1, 1, 1) tensors)."""
    seen: list[object] = []

    class Plain(DDIM):
        def needs_noise(self, coeffs):  # type: ignore[no-untyped-def]
            seen.append(coeffs.sigma)
            return bool(coeffs.sigma != 0.0)

    s = NoiseSchedule.linear()
    sampler = Plain(s, eta=1.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a = sampler.step_at(out, x, torch.tensor([500, 300]), torch.tensor([400, 200]), generator=g)
    assert seen
    assert all(isinstance(v, float) for v in seen)
    g = torch.Generator().manual_seed(0)
    b = DDIM(s, eta=1.0).step_at(
        out, x, torch.tensor([500, 300]), torch.tensor([400, 200]), generator=g
    )
    torch.testing.assert_close(a.state, b.state, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ddim", "edict"])
def test_inversion_callbacks_see_the_level_they_reached(kind: str) -> None:
    """``StepInfo.next_timestep`` is the level the step moved to, in inversion too: the level an
    inversion reaches is its step's timestep (EDICT reported the level it came from)."""
    s = NoiseSchedule.linear()
    seen: list[tuple[int, int, int]] = []
    sampler = DDIM(s) if kind == "ddim" else imgdiff.EDICT(s)
    x0 = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1
    sampler.invert(  # type: ignore[attr-defined]
        GaussianDenoiser(s),
        x0,
        num_steps=4,
        callback=lambda info: seen.append((info.index, info.timestep, info.next_timestep)),
        progress=False,
    )
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(nxt == t for _, t, nxt in seen)
    assert [t for _, t, _ in seen] == sorted(t for _, t, _ in seen)
