"""Per-step sampler overhead (model excluded): imgdiff's DDIM and DDPM steps vs diffusers' schedulers.

Both libraries run in this one process on the same tensors; timings are interleaved in rounds so
machine noise hits both alike, and medians are reported with the ratio imgdiff / diffusers.

* ``step``: one update from a given model output. imgdiff: ``sampler.update`` with the step's
  precomputed coefficients; diffusers: ``scheduler.step(model_output, t, sample)`` with an int
  ``t``. DDPM: diffusers draws its noise inside ``step``; its ``randn`` time (measured
  separately) is subtracted, and imgdiff gets pre-drawn noise, so noise generation is excluded
  on both sides.
* ``loop``: a whole 50-step loop with a model that returns a preallocated tensor, divided by 50:
  the sampler's share of a real loop (imgdiff's ``sample`` vs the usual diffusers loop).

Run: ``python benchmarks/step_overhead.py [--quick] [--write benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import imgdiff

SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (1, 3, 256, 256)]


def _device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, rounds: int, inner: int
) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternating rounds."""
    for fn in fns.values():  # warm-up
        for _ in range(20):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_steps(shape: tuple[int, ...], rounds: int, inner: int) -> dict[str, float]:
    from diffusers import DDIMScheduler, DDPMScheduler

    schedule = imgdiff.NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    k = 10  # a step in the middle of a 50-step run

    ddim = imgdiff.DDIM(schedule)
    ddim_c = ddim.coefficients(ddim.plan(50)).unbind()[k]
    d_ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_ddim.set_timesteps(50)
    t_ddim = int(d_ddim.timesteps[k])

    ddpm = imgdiff.DDPM(schedule)
    ddpm_c = ddpm.coefficients(ddpm.plan(50)).unbind()[k]
    d_ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    d_ddpm.set_timesteps(50)
    t_ddpm = int(d_ddpm.timesteps[k])

    return interleaved_medians(
        {
            "imgdiff DDIM": lambda: ddim.update(x, out, ddim_c, None),
            "diffusers DDIM": lambda: d_ddim.step(out, t_ddim, x),
            "imgdiff DDPM": lambda: ddpm.update(x, out, ddpm_c, z),
            "diffusers DDPM": lambda: d_ddpm.step(out, t_ddpm, x, generator=g),
            "randn": lambda: torch.randn(shape, generator=g),
        },
        rounds=rounds,
        inner=inner,
    )


def bench_loops(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    from diffusers import DDIMScheduler

    schedule = imgdiff.NoiseSchedule.linear()
    x = torch.randn(shape)
    fixed = torch.randn(shape)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return fixed

    sampler = imgdiff.DDIM(schedule)
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)

    def diffusers_loop() -> torch.Tensor:
        sched.set_timesteps(50)
        s = x
        for t in sched.timesteps:
            s = sched.step(model(s, t), t, s).prev_sample
        return s

    def imgdiff_loop() -> torch.Tensor:
        return sampler.sample(model, x, num_steps=50, progress=False)

    res = interleaved_medians(
        {"imgdiff DDIM loop": imgdiff_loop, "diffusers DDIM loop": diffusers_loop},
        rounds=rounds,
        inner=1,
    )
    return {k: v / 50 for k, v in res.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--write", type=Path, help="replace this script's table in this markdown file"
    )
    args = parser.parse_args()
    rounds, inner = (5, 20) if args.quick else (31, 50)

    device = (
        f"CPU: {_device_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    lines = [
        "## Per-step sampler overhead (model excluded)",
        "",
        f"Device: {device}. float32, median of {rounds} interleaved rounds. "
        "Ratio = imgdiff / diffusers (lower is better). Goal: DDIM step <= 0.2x.",
        "",
        "| shape | imgdiff DDIM | diffusers DDIM | ratio | imgdiff DDPM | diffusers DDPM (- randn) | ratio | "
        "imgdiff loop/step | diffusers loop/step | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        m = bench_steps(shape, rounds, inner)
        lp = bench_loops(shape, max(5, rounds // 3))
        d_ddpm = m["diffusers DDPM"] - m["randn"]
        us = 1e6
        row = (
            f"| {tuple(shape)} | {m['imgdiff DDIM'] * us:.1f} us | {m['diffusers DDIM'] * us:.1f} us | "
            f"**{m['imgdiff DDIM'] / m['diffusers DDIM']:.2f}x** | {m['imgdiff DDPM'] * us:.1f} us | "
            f"{d_ddpm * us:.1f} us | **{m['imgdiff DDPM'] / d_ddpm:.2f}x** | "
            f"{lp['imgdiff DDIM loop'] * us:.1f} us | {lp['diffusers DDIM loop'] * us:.1f} us | "
            f"**{lp['imgdiff DDIM loop'] / lp['diffusers DDIM loop']:.2f}x** |"
        )
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.write:
        write_table(args.write, lines[0], text)


def write_table(path: Path, heading: str, text: str) -> None:
    """Replace this script's heading and table in ``path`` (the notes after it stay); append it
    before the GPU section if the file has none yet."""
    current = path.read_text() if path.exists() else ""
    start = current.find(heading)
    if start >= 0:
        table = current.find("\n|", start)
        end = current.find("\n\n", table + 1) if table >= 0 else -1
        end = len(current) if end < 0 else end + 1
        updated = current[:start] + text + current[end:]
    else:
        at = current.find("\n## GPU")
        updated = current[:at] + "\n" + text + current[at:] if at >= 0 else current + "\n" + text
    path.write_text(updated)


if __name__ == "__main__":
    main()
