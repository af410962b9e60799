"""Buffer reuse in sampling loops (CPU): 50-step loops with and without ``imgdiff.buffers``' pool.

Every imgdiff sampler loop runs inside ``imgdiff.buffers.reuse_buffers()``: the updates' outputs
(the C kernels', the torch path's combinations, drawn noise) cycle through a few buffers instead
of a fresh allocation per step. This script runs whole 50-step loops (DDIM, DDPM, EDICT, and
DDIM with a ``KnownRegion`` paste) with a model that returns a precomputed tensor, so the loop is
all sampler, once with the pool applied to every output (``pooled``) and once with it off
(``fresh``: every output a new tensor, as before the pool), on the C kernels (``cpu``) and the torch path (``torch``). It reports
the time per step, the page faults per step (``getrusage`` minor faults) and the ratio
pooled / fresh, interleaved in rounds, in one process:

1. first with glibc's malloc as it comes (a fresh block of 128 KiB and more is a new ``mmap``,
   unmapped again when freed, unless glibc's adaptive threshold has grown past it);
2. then after ``mallopt`` makes glibc keep freed memory in its heap (what
   ``benchmarks/kernels.py`` does by default), where only cache effects remain.

Run: ``python benchmarks/buffers.py [--quick] [--threads N] [--write benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernels import keep_freed_memory, positive_int, write_section  # the scripts share this folder
from step_overhead import _device_name as cpu_name

import imgdiff
from imgdiff import buffers, kernels

# 512 KiB (under MIN_BYTES: the library does not pool it), 4 MiB, 12 MiB in float32
SHAPES = [(8, 4, 64, 64), (16, 4, 128, 128), (12, 4, 256, 256)]
QUICK_SHAPES = [(8, 4, 64, 64), (16, 4, 128, 128)]
NUM_STEPS = 50
HEADING = "## Buffer reuse in 50-step loops (CPU)"
_OFF = 2**62  # buffers.MIN_BYTES when the pool must never apply ("fresh")
_ALL = 0  # buffers.MIN_BYTES when it applies to every output ("pooled", to show the threshold)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def loops(shape: tuple[int, ...], backend: str) -> dict[str, Callable[[], object]]:
    """One whole loop per sampler, with a model returning a precomputed output."""
    schedule = imgdiff.NoiseSchedule.scaled_linear(1000)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g)
    out = 0.1 * torch.randn(shape, generator=g)
    known = torch.rand(shape, generator=g) * 2 - 1
    mask = torch.zeros(shape[0], 1, *shape[2:])
    mask[..., shape[2] // 4 : 3 * shape[2] // 4, :] = 1.0
    region = imgdiff.conditioning.KnownRegion(known, mask)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out

    b: Any = backend
    ddim = imgdiff.DDIM(schedule, backend=b)
    ddpm = imgdiff.DDPM(schedule, backend=b)
    edict = imgdiff.EDICT(schedule, dtype=torch.float32, backend=b)
    return {
        "DDIM": lambda: ddim.sample(model, noise, num_steps=NUM_STEPS, progress=False),
        "DDPM": lambda: ddpm.sample(model, noise, num_steps=NUM_STEPS, progress=False),
        "EDICT": lambda: edict.sample(model, noise, num_steps=NUM_STEPS, progress=False),
        "DDIM + KnownRegion": lambda: ddim.sample(
            model, noise, num_steps=NUM_STEPS, callback=region, progress=False
        ),
    }


def measure(fn: Callable[[], object], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (seconds, minor page faults) per step for ``fresh`` and ``pooled``, interleaved."""
    samples: dict[str, list[tuple[float, float]]] = {"fresh": [], "pooled": []}
    default = buffers.MIN_BYTES
    try:
        for _ in range(2):  # warm-up both ways
            for mode in samples:
                buffers.MIN_BYTES = _OFF if mode == "fresh" else _ALL
                fn()
        for _ in range(rounds):
            for mode, values in samples.items():
                buffers.MIN_BYTES = _OFF if mode == "fresh" else _ALL
                f0, t0 = minor_faults(), time.perf_counter()
                fn()
                seconds, faults = time.perf_counter() - t0, minor_faults() - f0
                values.append((seconds / NUM_STEPS, faults / NUM_STEPS))
    finally:
        buffers.MIN_BYTES = default
    return {
        mode: (statistics.median(s for s, _ in v), statistics.median(f for _, f in v))
        for mode, v in samples.items()
    }


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, two shapes")
    parser.add_argument(
        "--rounds", type=positive_int, help="rounds per measurement (default 7; quick 3)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", type=Path, help="write this section into this file")
    args = parser.parse_args()
    warnings.simplefilter("ignore", imgdiff.PrecisionWarning)  # EDICT with a float32 state
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    backends = ["cpu", "torch"] if kernels.cpu.available() else ["torch"]
    linux = platform.system() == "Linux"
    device = (
        f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(device, flush=True)

    results: dict[str, dict[tuple[str, str, tuple[int, ...]], Any]] = {}
    phases = ["glibc defaults", "malloc keeping freed memory"] if linux else ["as is"]
    for phase in phases:
        if phase == "malloc keeping freed memory" and not keep_freed_memory():
            break
        for shape in shapes:
            for backend in backends:
                for name, fn in loops(shape, backend).items():
                    r = measure(fn, rounds)
                    results.setdefault(phase, {})[(name, backend, shape)] = r
                    (tf, pf), (tp, pp) = r["fresh"], r["pooled"]
                    print(
                        f"[{phase}] {name:19s} {backend:5s} {shape!s:18s} fresh {fmt_us(tf):>9s} "
                        f"{pf:7.1f} faults | pooled {fmt_us(tp):>9s} {pp:7.1f} faults | "
                        f"{tp / tf:.2f}x",
                        flush=True,
                    )

    if args.write is None:
        return
    default_phase, tuned_phase = phases[0], phases[-1]
    body = [
        f"Device: {device}. float32; median of {rounds} interleaved rounds of whole "
        f"{NUM_STEPS}-step loops with a model returning a precomputed output (so the loop is all "
        "sampler); time and minor page faults per step. `pooled`: every output from "
        "`imgdiff.buffers`' pool; `fresh`: the pool off (every output a new tensor). "
        f"Measured {datetime.date.today().isoformat()} with `python benchmarks/buffers.py"
        f"{' --quick' if args.quick else ''} --write ...`.",
        "",
        f"| loop | backend | shape | fresh ({default_phase}) | page faults | pooled | "
        f"page faults | pooled / fresh | pooled / fresh ({tuned_phase}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, backend, shape), r in results[default_phase].items():
        (tf, pf), (tp, pp) = r["fresh"], r["pooled"]
        tuned = results.get(tuned_phase, {}).get((name, backend, shape))
        tuned_ratio = (
            "n/a" if tuned is None else f"**{tuned['pooled'][0] / tuned['fresh'][0]:.2f}x**"
        )
        body.append(
            f"| {name} | {backend} | {shape} | {fmt_us(tf)} | {pf:.0f} | {fmt_us(tp)} | "
            f"{pp:.0f} | **{tp / tf:.2f}x** | {tuned_ratio} |"
        )
    body += [
        "",
        "The library pools tensors of `imgdiff.buffers.MIN_BYTES` (1 MiB) and more: smaller ones "
        "(the (8, 4, 64, 64) rows) mostly stay in glibc's heap between steps, where pooling them "
        "costs a few percent. Whether a fresh loop page-faults depends on the process's "
        "allocation history (glibc's adaptive mmap threshold), so rows move between runs; the "
        "pooled column does not. The page faults left with the pool are its own buffers' first "
        "touch, once per loop (a few buffers of the latent's size), spread over the 50 steps.",
    ]
    write_section(args.write, HEADING, body, legacy=None, before=["## EDICT: exact inversion"])
    print(f"wrote {HEADING!r} to {args.write}")


if __name__ == "__main__":
    main()
