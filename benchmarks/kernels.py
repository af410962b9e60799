"""Issue 6's kernel suite: imgdiff's sampler steps (reference and fused) vs diffusers, in one process.

Every variant runs in this one process on the same tensors; timings are interleaved in rounds
(each round times every variant once) so machine noise hits all alike, and medians are reported
with the ratio imgdiff / diffusers (lower is better). CUDA timings use CUDA events around a
batch of calls (a stream of steps: launch overhead counts where the GPU would wait for it); CPU
timings use ``time.perf_counter``.

1. **Per-step update cost, model excluded**, shapes (1,4,64,64), (8,4,64,64), (16,4,128,128),
   float32 and bfloat16. imgdiff runs twice: ``torch`` (the reference path: the lean torch
   arithmetic of ``imgdiff._ops``, or ``kernels.reference`` for the blend) and ``fused`` (the
   Triton kernels on CUDA; on a CPU the compiled C kernels of ``imgdiff.kernels.cpu``,
   ``backend="cpu"``, which ``backend="auto"`` picks there).

   * DDIM: imgdiff ``DDIM.update(x, out, coeffs, None)`` with the step's precomputed Python-float
     coefficients (one ``lincomb3`` launch when fused) vs ``DDIMScheduler.step(out, t, x)`` with
     an int ``t`` (diffusers' fastest path), step 10 of 50.
   * DDPM (fixed small variance): ``DDPM.update(x, out, coeffs, z)`` with pre-drawn noise vs
     ``DDPMScheduler.step(out, t, x, generator=g)`` minus the ``randn`` it draws inside (timed
     in the same rounds), so noise generation is excluded on both sides.
   * EDICT: imgdiff ``EDICT.step`` (two ``a z + b eps`` sub-steps and the mixing pair) with a
     model stub that returns a precomputed output (imgdiff's figure therefore includes two trips
     through its model wrapper) vs the arithmetic of diffusers' community EDICT pipeline written
     out here in plain torch (diffusers ships no EDICT scheduler; see ``CommunityEDICTStep``).
   * Inpainting blend (RePaint-style noised paste): ``kernels.inpaint_blend(latents, init,
     known_mask, known_scale=sqrt(ab), noise=noise, noise_scale=sqrt(1 - ab))`` vs what
     ``StableDiffusionInpaintPipeline`` does each step: ``scheduler.add_noise(init, noise,
     torch.tensor([t_next]))`` then ``(1 - mask) * init_proper + mask * latents``. diffusers'
     mask is 1 on the region to repaint, imgdiff's is 1 on the known region: ``known_mask = 1 -
     mask``; both are ``(B, 1, H, W)`` in the latents' dtype. The fused call writes into the
     noise's memory (``into_noise=True``, as ``KnownRegion.paste`` does with its fresh draw);
     the noise is drawn outside the timing on both sides.

   Goal (issue 6): every step <= 0.15x diffusers on a CPU and <= 0.1x on a GPU, at (1,4,64,64)
   and (8,4,64,64); the check uses the fused path where there is one (the C kernels on a CPU,
   which ``backend="auto"`` picks; Triton on CUDA, which "auto" picks once the first GPU run
   is checked, see benchmarks/README.md), else torch.
2. **Bandwidth** (CUDA only): bytes each fused kernel must move (each input read once, each
   output written once) / its time, against the device's copy bandwidth
   (``y.copy_(x)`` on a 256 MiB tensor, 2 x 256 MiB moved). Goal >= 80 %, on operands far
   larger than L2 (16,4,512,512); the suite's (16,4,128,128) is shown for reference. Kernels
   and copy are timed as replays of a CUDA graph of 20 calls: device time, not the host's rate
   of issuing validated calls (~10-20 us each, as long as a kernel on 8 MB).
3. **Whole loop**: 50 DDIM steps (eta 0) with a small random ``UNet2DModel`` (32/64 channels)
   on a (4,4,32,32) latent: ``imgdiff.DDIM(schedule).sample(model, x)`` vs the usual diffusers
   loop (``set_timesteps(50)``, ``unet`` then ``scheduler.step``), the same network; the UNet's
   own 50 calls are timed too, so each loop's overhead per step is shown. On CUDA also the same
   loop recorded once with ``DDIM.capture_graph`` and replayed (one launch per run); goal: at
   least 1.5x faster than the diffusers loop.
4. **Host syncs** (CUDA only), counted with ``torch.cuda.set_sync_debug_mode("warn")``: per
   50-step loop (imgdiff, diffusers, the UNet alone) and per step of section 1.

On Linux the script first makes glibc keep freed memory in its heap (``keep_freed_memory``;
``--no-malloc-tune`` leaves malloc alone): otherwise fresh tensors of 128 KiB and more are
mapped and page-faulted in again, which on a VM that reclaims memory costs milliseconds at
random and drowns the arithmetic being compared.

Run: ``python benchmarks/kernels.py [--quick] [--write benchmarks/RESULTS.md]``. ``--write``
replaces (or adds) this script's section for the device kind (CPU or GPU) and leaves the others.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.util
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from step_overhead import _device_name as cpu_name  # the scripts share this folder

import imgdiff
from imgdiff import kernels
from imgdiff.models import BoundModel
from imgdiff.samplers.step import StepContext

Shape = tuple[int, ...]

SHAPES: list[Shape] = [(1, 4, 64, 64), (8, 4, 64, 64), (16, 4, 128, 128)]
QUICK_SHAPES: list[Shape] = [(1, 4, 64, 64), (8, 4, 64, 64)]
GOAL_SHAPES: list[Shape] = [(1, 4, 64, 64), (8, 4, 64, 64)]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEP_GOAL = {"cpu": 0.15, "cuda": 0.10}  # imgdiff / diffusers per step, by device (issue 6)
BANDWIDTH_GOAL = 0.80  # fraction of the device's copy bandwidth (issue 6, GPU)
GRAPH_GOAL = 1.5  # CUDA-graph loop vs the diffusers eager loop, speed-up (issue 6, GPU)
BANDWIDTH_SHAPES: list[Shape] = [(16, 4, 512, 512), (16, 4, 128, 128)]
LOOP_SHAPE: Shape = (4, 4, 32, 32)
NUM_STEPS = 50
STEP_INDEX = 10  # a step in the middle of a 50-step run
EDICT_MIX = 0.93
NO_GPU = "needs CUDA (not measured: no GPU)"
STEPS = ("DDIM", "DDPM", "EDICT", "inpaint blend")


# ---------------------------------------------------------------------------- timing


class Timer:
    """Seconds per call of a function, by CUDA events on a GPU and ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], inner: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    timer: Timer,
    *,
    rounds: int,
    target_s: float,
    warmup: int = 10,
    max_inner: int = 200,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, measured in alternating rounds.

    Each function gets its own number of calls per sample (about ``target_s`` seconds' worth,
    estimated after the warm-up, which also compiles any Triton kernel).
    """
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if max_inner == 1:
            inner[name] = 1
            continue
        estimate = timer.per_call(fn, 3)
        inner[name] = max(1, min(max_inner, math.ceil(target_s / max(estimate, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timer.per_call(fn, inner[name]))
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]], timer: Timer, **kwargs: Any
) -> dict[str, float]:
    """Median seconds per call of each function (see :func:`interleaved_samples`)."""
    samples = interleaved_samples(fns, timer, **kwargs)
    return {k: statistics.median(v) for k, v in samples.items()}


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (0 or a negative count is a usage error, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks in the heap instead of unmapping them (Linux CPU runs).

    By default glibc serves blocks >= 128 KiB with ``mmap`` and returns them on ``free``, so every
    fresh output tensor of 512 KiB and more page-faults in again; on a VM that reclaims memory
    (this project's 2-core machine) that cost milliseconds per op, at random, and swamped the
    arithmetic at (8,4,64,64) and above. Long-running processes keep their heap warm; so does this.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        libc.mallopt(option, value)
        for option, value in (
            (m_mmap_threshold, 32 * 2**20),  # glibc's maximum on 64-bit
            (m_trim_threshold, 2**30),
            (m_top_pad, 64 * 2**20),
        )
    )


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1e-1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"**{r:.2f}x**"


# ---------------------------------------------------------------------------- diffusers' EDICT


class CommunityEDICTStep:
    """One denoising step of diffusers' community EDICT pipeline, model excluded.

    diffusers has no EDICT scheduler in the package: EDICT lives in the community pipeline
    ``examples/community/edict_pipeline.py`` (``EDICTPipeline``), which runs it with scheduler-
    style tensor arithmetic on a ``DDIMScheduler``'s tables. This replicates, per step ``i`` at
    timestep ``t`` (a 0-d tensor from ``scheduler.timesteps``, as the pipeline iterates them):

    * for each of the two sub-steps (leapfrog: the order flips on odd ``i``),
      ``denoise_step``: ``prev_t = t - T / num_inference_steps``; ``alpha_prod`` read from
      ``scheduler.alphas_cumprod[int(t)]`` (``final_alpha_cumprod`` below 0), ``beta_prod = 1 -
      alpha_prod``; ``a_t = (alpha_prod_prev / alpha_prod) ** 0.5``; ``b_t = -a_t * beta_prod **
      0.5 + beta_prod_prev ** 0.5``; ``base' = (a_t * base + b_t * model_output).to(base.dtype)``
      where ``model_output`` is the UNet at the other sequence (here a precomputed tensor);
    * ``denoise_mixing_layer``: ``x = p x + (1 - p) y``, then ``y = p y + (1 - p) x``.
    """

    def __init__(self, scheduler: object, mix: float = EDICT_MIX, leapfrog: bool = True) -> None:
        self.scheduler = scheduler
        self.mix = mix
        self.leapfrog = leapfrog

    def _alpha_and_beta(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scheduler
        t = int(t)  # the pipeline's own comment: alphas_cumprod is always on the CPU
        alpha_prod = s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod  # type: ignore[attr-defined]
        return alpha_prod, 1 - alpha_prod

    def denoise_step(
        self, base: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        s = self.scheduler
        prev_timestep = timestep - s.config.num_train_timesteps / s.num_inference_steps  # type: ignore[attr-defined]
        alpha_prod_t, beta_prod_t = self._alpha_and_beta(timestep)
        alpha_prod_t_prev, beta_prod_t_prev = self._alpha_and_beta(prev_timestep)
        a_t = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        b_t = -a_t * (beta_prod_t**0.5) + beta_prod_t_prev**0.5
        return (a_t * base + b_t * model_output).to(base.dtype)

    def __call__(
        self, latents: list[torch.Tensor], i: int, t: torch.Tensor, eps: torch.Tensor
    ) -> list[torch.Tensor]:
        latents = list(latents)
        for k0 in range(2):
            k, j = k0, k0 ^ 1
            if self.leapfrog and i % 2 == 1:
                k, j = j, k
            noise_pred = eps  # the UNet at latents[j] (model excluded)
            latents[k] = self.denoise_step(latents[k], noise_pred, t)
        p = self.mix
        x = p * latents[0] + (1 - p) * latents[1]
        y = p * latents[1] + (1 - p) * x
        return [x, y]


# ---------------------------------------------------------------------------- section 1


@dataclass
class StepRow:
    step: str
    shape: Shape
    dtype: str
    torch_s: float
    fused_s: float | None
    diffusers_s: float

    def ratio(self, fused: bool) -> float | None:
        value = self.fused_s if fused else self.torch_s
        return None if value is None else value / self.diffusers_s


def step_functions(
    shape: Shape, dtype: torch.dtype, device: torch.device, backends: list[str]
) -> dict[str, Callable[[], object]]:
    """The timed functions of section 1 for one shape and dtype: ``"<step>|<side>"`` keys."""
    from diffusers import DDIMScheduler, DDPMScheduler

    schedule = imgdiff.NoiseSchedule.linear()
    k = STEP_INDEX
    g = torch.Generator(device=device).manual_seed(0)

    def rand(s: Shape = shape) -> torch.Tensor:
        return torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype)

    x, y, out, z = rand(), rand(), rand(), rand()
    fns: dict[str, Callable[[], object]] = {}

    # DDIM ---------------------------------------------------------------------------------
    d_ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_ddim.set_timesteps(NUM_STEPS, device=device)
    t_ddim = int(d_ddim.timesteps[k])
    fns["DDIM|diffusers"] = lambda: d_ddim.step(out, t_ddim, x)
    for b in backends:
        ddim = imgdiff.DDIM(schedule, backend=b)  # type: ignore[arg-type]
        c = ddim.coefficients(ddim.plan(NUM_STEPS)).unbind()[k]
        fns[f"DDIM|{b}"] = lambda s=ddim, c=c: s.update(x, out, c, None)

    # DDPM ---------------------------------------------------------------------------------
    d_ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_ddpm.set_timesteps(NUM_STEPS, device=device)
    t_ddpm = int(d_ddpm.timesteps[k])
    fns["DDPM|diffusers"] = lambda: d_ddpm.step(out, t_ddpm, x, generator=g)
    fns["DDPM|randn"] = lambda: torch.randn(shape, generator=g, device=device, dtype=dtype)
    for b in backends:
        ddpm = imgdiff.DDPM(schedule, backend=b)  # type: ignore[arg-type]
        c = ddpm.coefficients(ddpm.plan(NUM_STEPS)).unbind()[k]
        fns[f"DDPM|{b}"] = lambda s=ddpm, c=c: s.update(x, out, c, z)

    # EDICT --------------------------------------------------------------------------------
    d_edict_sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_edict_sched.set_timesteps(NUM_STEPS, device=device)
    community = CommunityEDICTStep(d_edict_sched)
    t_edict = d_edict_sched.timesteps[k]  # a 0-d tensor on the device, as the pipeline loops
    fns["EDICT|diffusers"] = lambda: community([x, y], k, t_edict, out)
    eps_model = BoundModel(lambda z_, t_: out, model_dtype=dtype, state_dtype=dtype)
    for b in backends:
        edict = imgdiff.EDICT(schedule, dtype=None, mix=EDICT_MIX, backend=b)  # type: ignore[arg-type]
        plan = edict.plan(NUM_STEPS)
        c = edict.coefficients(plan).unbind()[k]
        ts, nxt = int(plan.timesteps[k]), int(plan.next_timesteps[k])
        ctx = StepContext(
            k,
            NUM_STEPS,
            ts,
            nxt,
            torch.full((shape[0],), ts, device=device),
            torch.full((shape[0],), nxt, device=device),
        )
        fns[f"EDICT|{b}"] = lambda s=edict, c=c, ctx=ctx: s.step(eps_model, (x, y), c, ctx, None)

    # inpainting blend ---------------------------------------------------------------------
    d_inp = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_inp.set_timesteps(NUM_STEPS, device=device)
    noise_timestep = d_inp.timesteps[k + 1]  # the pipeline noises init latents to the next level
    init = rand()
    hole = (torch.rand((shape[0], 1, *shape[2:]), generator=g, device=device) > 0.5).to(dtype)

    def diffusers_blend() -> torch.Tensor:
        # StableDiffusionInpaintPipeline, 4-channel UNet branch (mask: 1 = repaint)
        init_latents_proper = d_inp.add_noise(init, z, torch.tensor([noise_timestep]))
        return (1 - hole) * init_latents_proper + hole * x

    fns["inpaint blend|diffusers"] = diffusers_blend
    known_mask = 1 - hole  # imgdiff: 1 = known
    ab = float(schedule.alphas_cumprod[int(noise_timestep)])  # imgdiff reads a host table
    ks, ns = math.sqrt(ab), math.sqrt(1.0 - ab)
    # the calls KnownRegion.paste makes: the reference, or the fused kernel without re-validation
    fns["inpaint blend|torch"] = lambda: kernels.reference.inpaint_blend(
        x, init, known_mask, known_scale=ks, noise=z, noise_scale=ns
    )
    for b in backends[1:]:
        # paste's noise is a fresh draw of its own, which the fused blend overwrites
        # (into_noise): here a copy of z, so the other calls' noise stays as drawn
        own = z.clone()
        fns[f"inpaint blend|{b}"] = lambda b=b, own=own: kernels.fused_inpaint_blend(
            b,  # type: ignore[arg-type]
            x,
            init,
            known_mask,
            ks,
            own,
            ns,
            into_noise=True,
        )
    return fns


def _tensors(result: object) -> list[torch.Tensor]:
    """The sample(s) a step function returns, as float32 tensors."""
    if isinstance(result, torch.Tensor):
        found: object = result
    elif hasattr(result, "prev_sample"):
        found = result.prev_sample
    else:
        found = getattr(result, "state", result)
    items = list(found) if isinstance(found, (list, tuple)) else [found]
    return [v.float() for v in items if isinstance(v, torch.Tensor)]


def max_differences(fns: dict[str, Callable[[], object]], backends: list[str]) -> dict[str, float]:
    """max |imgdiff - diffusers| / max |diffusers| per deterministic step (DDPM's noise differs)."""
    diffs = {}
    for step in ("DDIM", "EDICT", "inpaint blend"):
        ref = _tensors(fns[f"{step}|diffusers"]())
        scale = max(float(r.abs().max()) for r in ref)
        diffs[step] = max(
            float((a - r).abs().max()) / scale
            for b in backends
            for a, r in zip(_tensors(fns[f"{step}|{b}"]()), ref, strict=True)
        )
    return diffs


def bench_steps(
    shape: Shape,
    dtype_name: str,
    device: torch.device,
    backends: list[str],
    timer: Timer,
    rounds: int,
    target_s: float,
) -> tuple[list[StepRow], dict[str, float]]:
    fns = step_functions(shape, DTYPES[dtype_name], device, backends)
    with torch.no_grad():  # as in a sampling loop, and as diffusers' pipelines call their steps
        diffs = max_differences(fns, backends)
        m = interleaved_medians(fns, timer, rounds=rounds, target_s=target_s)
    rows = []
    for step in STEPS:
        diffusers_s = m[f"{step}|diffusers"]
        if step == "DDPM":
            diffusers_s -= m["DDPM|randn"]
        rows.append(
            StepRow(
                step,
                shape,
                dtype_name,
                m[f"{step}|torch"],
                m.get(f"{step}|{backends[-1]}") if len(backends) > 1 else None,
                diffusers_s,
            )
        )
    return rows, diffs


# ---------------------------------------------------------------------------- section 2


@dataclass
class BandwidthRow:
    kernel: str
    shape: Shape
    dtype: str
    bytes_moved: int
    seconds: float
    copy_bw: float
    graphed: bool  # timed as CUDA-graph replays (device time alone), else eager calls

    @property
    def bandwidth(self) -> float:
        return self.bytes_moved / self.seconds

    @property
    def fraction(self) -> float:
        return self.bandwidth / self.copy_bw


GRAPH_CALLS = 20  # calls recorded per CUDA graph in the bandwidth section


def graph_of(fn: Callable[[], object], calls: int) -> Callable[[], object] | None:
    """``calls`` calls of ``fn`` recorded in one CUDA graph, as its ``replay``: a replay launches
    them with no Python or argument checking in between, so timing it measures the kernels, not
    how fast the host issues them (the validated public functions cost ~10-20 us of host time a
    call, as long as a kernel on 8 MB at 3 TB/s). ``None`` where recording fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles Triton kernels)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as exc:
        print(f"  (not recorded, timed eagerly: {exc})", flush=True)
        return None
    return graph.replay


def copy_bandwidth(device: torch.device, timer: Timer, rounds: int) -> float:
    """Bytes per second of ``torch.empty_like(x).copy_(x)`` on a 256 MiB tensor (read + write),
    timed like the kernels (CUDA-graph replays where recording works)."""
    x = torch.randn(64 * 2**20, device=device)  # 256 MiB of float32
    y = torch.empty_like(x)
    copy = graph_of(lambda: y.copy_(x), GRAPH_CALLS)
    calls = GRAPH_CALLS if copy is not None else 1
    t = interleaved_medians(
        {"copy": copy or (lambda: torch.empty_like(x).copy_(x))},
        timer,
        rounds=rounds,
        target_s=0.02,
    )["copy"]
    return 2 * x.numel() * x.element_size() / (t / calls)


def bench_bandwidth(
    device: torch.device, timer: Timer, rounds: int, shapes: list[Shape]
) -> tuple[float, list[BandwidthRow]]:
    copy_bw = copy_bandwidth(device, timer, rounds)
    rows = []
    for shape in shapes:
        for dtype_name, dtype in DTYPES.items():
            g = torch.Generator(device=device).manual_seed(0)

            def rand(s: Shape, dtype: torch.dtype = dtype, g: torch.Generator = g) -> torch.Tensor:
                return torch.randn(s, generator=g, device=device, dtype=dtype)

            x, y, z = rand(shape), rand(shape), rand(shape)
            out2 = rand((shape[0], 2 * shape[1], *shape[2:]))
            mask = (rand((shape[0], 1, *shape[2:])) > 0).to(dtype)
            n, s = x.numel(), x.element_size()
            mask_bytes = mask.numel() * s
            cases: dict[str, tuple[int, Callable[[], object]]] = {
                "lincomb3 (a x + b y)": (
                    3 * n * s,
                    lambda x=x, y=y: kernels.lincomb3(x, 1.01, y, -0.3, backend="triton"),
                ),
                "lincomb3 (+ c noise)": (
                    4 * n * s,
                    lambda x=x, y=y, z=z: kernels.lincomb3(
                        x, 1.01, y, -0.3, z, 0.1, backend="triton"
                    ),
                ),
                "lincomb3 (+ c noise, seed)": (
                    3 * n * s,
                    lambda x=x, y=y: kernels.lincomb3(
                        x, 1.01, y, -0.3, c=0.1, seed=1, backend="triton"
                    ),
                ),
                "inpaint_blend (noise, (B,1,H,W) mask)": (
                    4 * n * s + mask_bytes,
                    lambda x=x, y=y, z=z, mask=mask: kernels.inpaint_blend(
                        x, y, mask, known_scale=0.8, noise=z, noise_scale=0.6, backend="triton"
                    ),
                ),
                "edict_mix": (
                    4 * n * s,
                    lambda x=x, y=y: kernels.edict_mix(x, y, EDICT_MIX, backend="triton"),
                ),
                "edict_substep_mix": (
                    5 * n * s,
                    lambda x=x, y=y, z=z: kernels.edict_substep_mix(
                        x, y, z, 0.98, -0.1, EDICT_MIX, update="y", backend="triton"
                    ),
                ),
                "ddpm_learned_step (noise)": (
                    5 * n * s,
                    lambda x=x, out2=out2, z=z: kernels.ddpm_learned_step(
                        x,
                        out2,
                        1.01,
                        -0.3,
                        z,
                        log_beta=-4.0,
                        log_beta_tilde=-5.0,
                        backend="triton",
                    ),
                ),
            }
            replays = {k: graph_of(fn, GRAPH_CALLS) for k, (_, fn) in cases.items()}
            m = interleaved_medians(
                {k: replays[k] or fn for k, (_, fn) in cases.items()},
                timer,
                rounds=rounds,
                target_s=0.01,
            )
            rows.extend(
                BandwidthRow(
                    k,
                    shape,
                    dtype_name,
                    nbytes,
                    m[k] / (GRAPH_CALLS if replays[k] is not None else 1),
                    copy_bw,
                    replays[k] is not None,
                )
                for k, (nbytes, _) in cases.items()
            )
            del x, y, z, out2, mask, cases, replays
            torch.cuda.empty_cache()
    return copy_bw, rows


# ---------------------------------------------------------------------------- sections 3 and 4


def tiny_unet(device: torch.device) -> torch.nn.Module:
    """The same small random UNet as ``benchmarks/edict.py`` (2 levels, 32/64 channels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=LOOP_SHAPE[-1],
        in_channels=LOOP_SHAPE[1],
        out_channels=LOOP_SHAPE[1],
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return unet.to(device).eval()


def loop_functions(
    device: torch.device, backend: str
) -> tuple[dict[str, Callable[[], torch.Tensor]], float]:
    """The 50-step loops (imgdiff's on ``backend``, diffusers, the UNet alone) and their outputs'
    relative difference."""
    from diffusers import DDIMScheduler

    unet = tiny_unet(device)
    schedule = imgdiff.NoiseSchedule.linear()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(LOOP_SHAPE, generator=g, device=device)

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(z, t).sample  # type: ignore[no-any-return]

    sampler = imgdiff.DDIM(schedule, backend=backend)  # type: ignore[arg-type]
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)

    def imgdiff_loop() -> torch.Tensor:
        return sampler.sample(model, x, num_steps=NUM_STEPS, progress=False)

    @torch.no_grad()
    def diffusers_loop() -> torch.Tensor:
        sched.set_timesteps(NUM_STEPS, device=device)
        latents = x
        for t in sched.timesteps:
            noise_pred = unet(latents, t).sample
            latents = sched.step(noise_pred, t, latents).prev_sample
        return latents

    sched.set_timesteps(NUM_STEPS, device=device)
    fixed_ts = list(sched.timesteps)

    @torch.no_grad()
    def unet_only() -> torch.Tensor:
        out = x
        for t in fixed_ts:
            out = unet(x, t).sample
        return out

    reference = diffusers_loop()
    diff = float((imgdiff_loop() - reference).abs().max() / reference.abs().max())
    fns = {"imgdiff": imgdiff_loop, "diffusers": diffusers_loop, "unet": unet_only}
    if device.type == "cuda":
        graphed = sampler.capture_graph(model, x, num_steps=NUM_STEPS)
        fns["graph"] = lambda: graphed(x)
        graph_diff = float((graphed(x) - imgdiff_loop()).abs().max())
        print(f"CUDA graph replay vs eager imgdiff loop: max abs difference {graph_diff:.1e}")
    return fns, diff


def count_syncs(fn: Callable[[], object]) -> int:
    """Host-device synchronisations in one call of ``fn`` (CUDA sync debug mode, "warn")."""
    fn()  # warm: first-call set-up (allocations, kernel compiles) is not counted
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ---------------------------------------------------------------------------- report


def device_description(device: torch.device) -> str:
    import diffusers

    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(device)
        return (
            f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), "
            f"{versions}, triton {triton.__version__}"
        )
    isa = "AVX512-BF16" if kernels.cpu.bf16_isa() else "portable"
    return (
        f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, {versions}, "
        f"C kernels' bfloat16 stores: {isa}"
    )


def section_heading(cuda: bool) -> str:
    return f"## Kernel suite: sampler steps, bandwidth, loop, syncs ({'GPU' if cuda else 'CPU'})"


def write_section(
    path: Path, heading: str, body: list[str], *, legacy: str | None, before: list[str]
) -> None:
    """Replace the section starting at ``heading`` (or ``legacy``) in ``path``; else insert it
    before the first of the ``before`` headings present, else append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")

    def find(h: str) -> int | None:
        return next((i for i, ln in enumerate(lines) if ln.strip() == h), None)

    start = find(heading)
    if start is None and legacy is not None:
        start = find(legacy)
    new = [heading, "", *body]
    if start is None:
        anchor = next((i for i in map(find, before) if i is not None), None)
        if anchor is None:
            lines += ["", *new]
        else:
            lines = lines[:anchor] + new + [""] + lines[anchor:]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        lines = lines[:start] + new + ([""] if tail else []) + tail
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller shapes")
    parser.add_argument("--write", type=Path, help="write this suite's section into this file")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--rounds", type=positive_int, help="rounds per measurement (default 21; quick 5)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--no-malloc-tune",
        action="store_true",
        help="leave glibc's malloc as it is (by default freed memory is kept in the heap)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = not args.no_malloc_tune and platform.system() == "Linux" and keep_freed_memory()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    step_goal = STEP_GOAL["cuda" if cuda else "cpu"]
    timer = Timer(device)
    rounds = args.rounds or (5 if args.quick else 21)
    target_s = 0.002 if args.quick else 0.01
    shapes = QUICK_SHAPES if args.quick else SHAPES
    has_triton = importlib.util.find_spec("triton") is not None
    if cuda:
        backends = ["torch", "triton"] if has_triton else ["torch"]
        fused_na = "n/a (no triton)"
    else:
        backends = ["torch", "cpu"] if kernels.cpu.available() else ["torch"]
        fused_na = f"n/a ({kernels.cpu.build_error()})"
    desc = device_description(device) + (
        ", glibc malloc keeping freed memory (see `keep_freed_memory`)" if tuned else ""
    )
    print(desc, flush=True)

    out: list[str] = [
        f"Device: {desc}. Median of {rounds} interleaved rounds; ratio = imgdiff / diffusers "
        "(lower is better). Measured "
        f"{datetime.date.today().isoformat()} with `python benchmarks/kernels.py"
        f"{' --quick' if args.quick else ''} --write ...`.",
        "",
        "### 1. Per-step update (model excluded)",
        "",
        "imgdiff `torch`: the samplers' torch path (`DDIM.update` / `DDPM.update` with the step's "
        "precomputed float coefficients, `EDICT.step` with a model stub returning a precomputed "
        "output, `kernels.reference.inpaint_blend`); `fused`: "
        "the same calls with "
        + (
            "`backend='triton'` (the Triton kernels)"
            if cuda
            else "`backend='cpu'` (the compiled C kernels of `imgdiff.kernels.cpu`: one pass, "
            f"OpenMP over up to {torch.get_num_threads()} threads with 16384 elements or more "
            "each, so (1, 4, 64, 64) runs on one, called through the "
            f"{kernels.cpu.binding()} binding)"
        )
        + ". diffusers: `DDIMScheduler.step` / "
        "`DDPMScheduler.step` (int t; DDPM minus its in-step `randn`), the community EDICT "
        "pipeline's step arithmetic, `add_noise` + mask blend as `StableDiffusionInpaintPipeline`. "
        f"Goal: <= {step_goal}x at {GOAL_SHAPES[0]} and {GOAL_SHAPES[1]} "
        f"({'fused' if len(backends) > 1 else 'torch'} path"
        + (
            "; `backend='auto'` picks it once this run is checked, see benchmarks/README.md)."
            if cuda and len(backends) > 1
            else ", the one `backend='auto'` picks here)."
        ),
        "",
        "| step | shape | dtype | imgdiff torch | imgdiff fused | diffusers | torch / diffusers | "
        "fused / diffusers | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    all_rows: list[StepRow] = []
    worst_diff: dict[str, dict[str, float]] = {d: {} for d in DTYPES}
    for shape in shapes:
        for dtype_name in DTYPES:
            rows, diffs = bench_steps(shape, dtype_name, device, backends, timer, rounds, target_s)
            all_rows.extend(rows)
            for step, d in diffs.items():
                worst_diff[dtype_name][step] = max(d, worst_diff[dtype_name].get(step, 0.0))
            for r in rows:
                auto = r.ratio(fused=r.fused_s is not None)
                goal = "-"
                if shape in GOAL_SHAPES and auto is not None:
                    goal = "met" if auto <= step_goal else "missed"
                fused_time = fmt_time(r.fused_s) if r.fused_s is not None else fused_na
                fused_ratio = fmt_ratio(r.ratio(True)) if r.fused_s is not None else fused_na
                line = (
                    f"| {r.step} | {shape} | {dtype_name} | {fmt_time(r.torch_s)} | {fused_time} | "
                    f"{fmt_time(r.diffusers_s)} | {fmt_ratio(r.ratio(False))} | {fused_ratio} | "
                    f"{goal} |"
                )
                print(line, flush=True)
                out.append(line)
    checks = "; ".join(
        f"{name}: " + ", ".join(f"{step} {d:.1e}" for step, d in diffs.items())
        for name, diffs in worst_diff.items()
    )
    out += [
        "",
        "Same inputs, same results: max |imgdiff - diffusers| / max |diffusers| over the shapes "
        f"({checks}; DDPM not compared: diffusers draws its own noise).",
    ]
    out += ["", "Goal summary (per step, worst ratio over the goal shapes and both dtypes):", ""]
    for step in STEPS:
        ratios = [
            r.ratio(fused=r.fused_s is not None)
            for r in all_rows
            if r.step == step and r.shape in GOAL_SHAPES
        ]
        worst = max(v for v in ratios if v is not None)
        verdict = "met" if worst <= step_goal else "missed"
        out.append(f"* {step}: worst {worst:.2f}x, goal <= {step_goal}x {verdict}")

    out += ["", "### 2. Fused kernels: bytes moved / time vs copy bandwidth", ""]
    if cuda and has_triton:
        bw_shapes = BANDWIDTH_SHAPES[:1] if args.quick else BANDWIDTH_SHAPES
        copy_bw, bw_rows = bench_bandwidth(device, timer, rounds, bw_shapes)
        out += [
            f"Copy bandwidth (`y.copy_(x)`, 256 MiB, read + write): "
            f"{copy_bw / 1e9:.0f} GB/s. Goal: >= {BANDWIDTH_GOAL:.0%} of it at "
            f"{BANDWIDTH_SHAPES[0]} (operands far beyond L2); {BANDWIDTH_SHAPES[1]} "
            "(the suite's largest step shape) is shown for reference (partly L2-resident). "
            f"Each kernel (and the copy) is timed as replays of a CUDA graph of {GRAPH_CALLS} "
            "calls, so the figures are device time, not the host's issue rate; `timing` says "
            "where recording failed and calls were timed eagerly.",
            "",
            "| kernel | shape | dtype | bytes | time | GB/s | of copy | timing | goal |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b in bw_rows:
            goal = "-"
            if b.shape == BANDWIDTH_SHAPES[0]:
                goal = "met" if b.fraction >= BANDWIDTH_GOAL else "missed"
            line = (
                f"| {b.kernel} | {b.shape} | {b.dtype} | {b.bytes_moved / 2**20:.1f} MiB | "
                f"{fmt_time(b.seconds)} | {b.bandwidth / 1e9:.0f} | {b.fraction:.0%} | "
                f"{'graph' if b.graphed else 'eager'} | {goal} |"
            )
            print(line, flush=True)
            out.append(line)
    else:
        out.append(f"Copy bandwidth and every kernel's bandwidth: {NO_GPU}.")
        print(f"bandwidth: {NO_GPU}", flush=True)

    loop_rounds = max(3, rounds // 4)
    # the fused path on CUDA too, where "auto" picks it only after this run is checked
    loop_backend = backends[-1] if cuda else "auto"
    fns, max_diff = loop_functions(device, loop_backend)
    samples = interleaved_samples(
        fns, timer, rounds=loop_rounds, target_s=0.0, warmup=1, max_inner=1
    )
    loop = {k: statistics.median(v) for k, v in samples.items()}

    def overhead(name: str) -> str:
        """Median over rounds of (loop - UNet alone) / steps, +- half the range (paired)."""
        per_step = [
            (a - u) / NUM_STEPS for a, u in zip(samples[name], samples["unet"], strict=True)
        ]
        spread = (max(per_step) - min(per_step)) / 2
        median = statistics.median(per_step)
        if abs(median) <= spread:
            return f"within noise (+- {fmt_time(spread)})"
        return f"{fmt_time(median)} +- {fmt_time(spread)}"

    graph_cell = NO_GPU
    if "graph" in loop:
        speedup = loop["diffusers"] / loop["graph"]
        verdict = "met" if speedup >= GRAPH_GOAL else "missed"
        graph_cell = (
            f"{fmt_time(loop['graph'])}: {speedup:.2f}x faster than diffusers (goal "
            f">= {GRAPH_GOAL}x: {verdict})"
        )
    out += [
        "",
        f"### 3. Whole loop: {NUM_STEPS} DDIM steps, small UNet",
        "",
        f"Random `UNet2DModel` (float32, 2 levels, 32/64 channels) on a {LOOP_SHAPE} latent, the "
        f"same network for both; imgdiff's `DDIM(backend={loop_backend!r})`; median of "
        f"{loop_rounds} interleaved runs. Overhead per step = (loop - the UNet's {NUM_STEPS} calls "
        f"alone, same round) / {NUM_STEPS}, median +- half the range over the rounds"
        + (
            ""
            if cuda
            else " (on a CPU the UNet dominates and this difference is within the run-to-run "
            "noise; `benchmarks/step_overhead.py` measures the loop overhead with a free model)"
        )
        + f". Outputs agree: max |imgdiff - diffusers| / max |diffusers| = {max_diff:.1e}.",
        "",
        "| imgdiff eager | diffusers loop | ratio | UNet alone | imgdiff overhead/step | "
        "diffusers overhead/step | imgdiff CUDA graph |",
        "|---|---|---|---|---|---|---|",
        f"| {fmt_time(loop['imgdiff'])} | {fmt_time(loop['diffusers'])} | "
        f"{fmt_ratio(loop['imgdiff'] / loop['diffusers'])} | {fmt_time(loop['unet'])} | "
        f"{overhead('imgdiff')} | {overhead('diffusers')} | {graph_cell} |",
    ]
    print(out[-1], flush=True)

    out += ["", "### 4. Host syncs", ""]
    if cuda:
        out += [
            "Counted with `torch.cuda.set_sync_debug_mode('warn')` (one warning per synchronising "
            "call), after a warm-up call.",
            "",
            "| what | imgdiff | diffusers |",
            "|---|---|---|",
            f"| {NUM_STEPS}-step loop (UNet alone: {count_syncs(fns['unet'])}) | "
            f"{count_syncs(fns['imgdiff'])} | {count_syncs(fns['diffusers'])} |",
            f"| {NUM_STEPS}-step loop replayed as a CUDA graph | {count_syncs(fns['graph'])} | - |",
        ]
        step_fns = step_functions(GOAL_SHAPES[0], torch.float32, device, backends)
        side = backends[-1]
        for step in STEPS:
            out.append(
                f"| one {step} step ({GOAL_SHAPES[0]}, float32; imgdiff {side}) | "
                f"{count_syncs(step_fns[f'{step}|{side}'])} | "
                f"{count_syncs(step_fns[f'{step}|diffusers'])} |"
            )
    else:
        out.append(f"Host syncs per loop and per step: {NO_GPU}.")

    text = "\n".join(out) + "\n"
    print()
    print(section_heading(cuda))
    print()
    print(text)
    if args.write:
        write_section(
            args.write,
            section_heading(cuda),
            out,
            legacy="## GPU" if cuda else None,
            before=[] if cuda else [section_heading(True), "## GPU"],
        )
        print(f"wrote {section_heading(cuda)!r} to {args.write}")


if __name__ == "__main__":
    main()
