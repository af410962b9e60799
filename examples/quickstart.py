"""Quickstart: schedule + model + sampler, with no training and no download.

The model is :class:`imgdiff.EmpiricalDenoiser`, the exact denoiser of a small data set of
procedurally drawn images. A correct sampler driven by it must return images of that data set,
so what you see in the grid is a check of the sampler, not of a network. The script:

1. samples 8 images with DDIM (50 steps) and DDPM (250 steps), one generator per sample;
2. reports how close each sample is to its nearest training image;
3. DDIM-inverts two training images and reconstructs them;
4. writes ``samples.png`` (data | DDIM | DDPM rows) to ``--out``.

Run: ``python examples/quickstart.py [--out outputs/quickstart]`` (some seconds on a CPU).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import imgdiff
from imgdiff.data import toy_shapes
from imgdiff.images import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description="imgdiff quickstart")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    progress = not args.no_progress

    data, _ = toy_shapes(16)
    schedule = imgdiff.NoiseSchedule.cosine()
    model = imgdiff.EmpiricalDenoiser(schedule, data)  # exact denoiser of `data`
    generators = [torch.Generator().manual_seed(s) for s in range(8)]
    noise = imgdiff.randn((8, 3, 32, 32), generator=generators)

    ddim = imgdiff.DDIM(schedule)
    x_ddim = ddim.sample(model, noise, num_steps=50, progress=progress)
    ddpm = imgdiff.DDPM(schedule)
    x_ddpm = ddpm.sample(model, noise, num_steps=250, generator=generators, progress=progress)

    for name, x in (("DDIM 50 steps", x_ddim), ("DDPM 250 steps", x_ddpm)):
        dist = torch.cdist(x.flatten(1), data.flatten(1)).min(dim=1).values / math.sqrt(
            x[0].numel()
        )
        print(
            f"{name}: RMS distance to the nearest training image: "
            f"max {float(dist.max()):.4f}, mean {float(dist.mean()):.4f} (pixel range 2)"
        )

    x0 = data[:2].double()
    latent = ddim.invert(model, x0, num_steps=100, progress=progress)
    rec = ddim.sample(model, latent, num_steps=100, progress=progress)
    print(
        f"DDIM invert -> reconstruct, 100 steps, float64: max abs error {float((rec - x0).abs().max()):.2e}"
    )

    path = save_image_grid(torch.cat([data[:8], x_ddim, x_ddpm]), args.out / "samples.png", nrow=8)
    print(f"wrote {path} (rows: training data | DDIM samples | DDPM samples)")


if __name__ == "__main__":
    main()
