"""The demo: train a small Palette model on the toy shapes on a CPU, then solve its four tasks.

``python -m imgdiff demo [--out DIR] [--quick]``:

1. builds the procedural data set (:func:`imgdiff.data.toy_shapes`, no download);
2. trains one multi-task conditional U-Net (Palette: source image concatenated with the noisy
   target, continuous noise level gamma, masked loss for inpainting and uncropping) with a
   progress bar;
3. for each task (inpainting, colorization, uncropping, JPEG restoration) samples held-out images
   with DDPM and DDIM, keeping the known region clean for inpainting and uncropping;
4. writes ``<task>.png`` (rows: source | DDPM | DDIM | ground truth) and ``metrics.json`` with
   PSNR and SSIM against the ground truth per task and sampler, and ``model.safetensors``.

The full run takes a few minutes on a 2-core CPU; ``--quick`` takes seconds (a smoke test whose
pictures are not meant to solve anything).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import (
    SEED_RANGE,
    check_choice,
    check_float,
    check_int,
    describe,
    set_checked,
)
from imgdiff.conditioning import ConcatConditioning, KnownRegion, NoiseLevelConditioning
from imgdiff.data import toy_shapes
from imgdiff.degradations import TASKS, Task, make_pairs, sample_tasks, with_luma
from imgdiff.errors import ImgdiffError, InputTypeError, InputValueError
from imgdiff.images import save_image_grid
from imgdiff.metrics import psnr, ssim
from imgdiff.nets import UNet, UNetConfig
from imgdiff.prediction import PREDICTION_TYPES, PredictionType
from imgdiff.randomness import randn
from imgdiff.samplers import DDIM, DDPM
from imgdiff.samplers.base import Sampler
from imgdiff.schedules import NoiseSchedule
from imgdiff.training import CheckpointError, Trainer, TrainingBatch, TrainingConfig

__all__ = ["DemoConfig", "main", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of a demo run.

    ``warmup_steps`` (the linear learning-rate warm-up) does not depend on ``train_steps``: a run
    resumed with more steps continues the same learning-rate schedule, so it equals a run that
    was given the larger ``train_steps`` from the start (a longer ``--steps`` trains further).
    """

    image_size: int = 32
    dataset_size: int = 4096
    train_steps: int = 1000
    batch_size: int = 24
    lr: float = 1e-3
    warmup_steps: int = 100
    base_channels: int = 32
    eval_images: int = 8
    ddpm_steps: int = 200
    ddim_steps: int = 50
    prediction: PredictionType = "sample"
    seed: int = 0

    def __post_init__(self) -> None:
        size = check_int("image_size", self.image_size, min=8)
        if size % _SIZE_MULTIPLE:
            raise InputValueError(
                f"image_size: expected a multiple of {_SIZE_MULTIPLE} (the U-Net halves it "
                f"{len(_CHANNEL_MULTS) - 1} times), got {size}"
            )
        # the checked values are stored: numpy scalars become ints and floats (metrics.json)
        checked: dict[str, object] = {"image_size": size}
        for name in (
            "dataset_size",
            "train_steps",
            "batch_size",
            "base_channels",
            "eval_images",
            "ddpm_steps",
            "ddim_steps",
        ):
            checked[name] = check_int(name, getattr(self, name), min=1)
        checked["lr"] = check_float("lr", self.lr, min=0.0, min_open=True)
        checked["warmup_steps"] = check_int("warmup_steps", self.warmup_steps, min=0)
        check_choice("prediction", self.prediction, PREDICTION_TYPES)
        # held-out images use seed + 1000, the tasks seed + 0..3
        checked["seed"] = check_int("seed", self.seed, min=SEED_RANGE[0], max=SEED_RANGE[1] - 1000)
        set_checked(self, **checked)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A seconds-long smoke run."""
        return cls(
            image_size=16,
            dataset_size=256,
            train_steps=40,
            warmup_steps=4,
            batch_size=8,
            base_channels=16,
            eval_images=4,
            ddpm_steps=10,
            ddim_steps=5,
        )


_CHANNEL_MULTS = (1, 2, 2)  # build_model's levels
_SIZE_MULTIPLE = 2 ** (len(_CHANNEL_MULTS) - 1)  # each level after the first halves the image


def _masks_for_training(pair_mask: Tensor, tasks: Sequence[Task]) -> Tensor:
    """Palette trains inpainting/uncropping with a clean known region; other tasks generate everything."""
    keep = torch.tensor([t in ("inpainting", "uncropping") for t in tasks]).reshape(-1, 1, 1, 1)
    return torch.where(keep, pair_mask, torch.ones_like(pair_mask))


def build_model(cfg: DemoConfig) -> UNet:
    """The demo's U-Net: 6 input channels (source + noisy target), gamma conditioning."""
    return UNet(
        UNetConfig(
            in_channels=6,
            out_channels=3,
            base_channels=cfg.base_channels,
            channel_mults=_CHANNEL_MULTS,
            attention_levels=(2,),
            noise_conditioning="gamma",
        )
    )


def train_model(
    cfg: DemoConfig, out: Path, progress: bool, *, resume: bool = False
) -> tuple[UNet, NoiseSchedule, list[float]]:
    """Train the multi-task model; returns the EMA network, the schedule and the losses.

    With ``resume``, an existing ``out/model.safetensors`` from the same configuration is
    continued (a longer ``train_steps`` trains further: the warm-up, ``cfg.warmup_steps``, does not
    depend on ``train_steps``, so the resumed run equals one given the longer ``train_steps`` from
    the start); otherwise training starts afresh.
    """
    torch.manual_seed(cfg.seed)
    schedule = NoiseSchedule.linear()
    data, _ = toy_shapes(cfg.dataset_size, cfg.image_size, seed=cfg.seed)

    def make_batch(step: int, g: torch.Generator) -> TrainingBatch:
        images = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=g)]
        tasks = sample_tasks(cfg.batch_size, generator=g)
        pair = make_pairs(images, tasks, g)
        return TrainingBatch(
            pair.target, {"source": pair.source}, _masks_for_training(pair.mask, tasks)
        )

    net = build_model(cfg)
    config = TrainingConfig(
        steps=cfg.train_steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        noise_level="gamma",
        ema_decay=0.995,
        seed=cfg.seed,
        prediction=cfg.prediction,
    )
    trainer = Trainer(
        net,
        schedule,
        make_batch,
        config,
        model=ConcatConditioning(net, source_channels=3),
        checkpoint=out / "model.safetensors",
        resume=resume,
    )
    trainer.train(progress=progress)
    ema = trainer.ema.module
    assert isinstance(ema, UNet)
    return ema.eval(), schedule, trainer.losses


def sample_task(
    net: UNet,
    schedule: NoiseSchedule,
    sampler: Sampler[Any, Any],
    task: Task,
    target: Tensor,
    num_steps: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """``(source, sample)`` for held-out ``target`` images of one task."""
    g = torch.Generator().manual_seed(seed)
    pair = make_pairs(target, task, g, jpeg_quality=10)
    model = NoiseLevelConditioning(ConcatConditioning(net, source_channels=3), schedule)
    noise = randn(target.shape, generator=g)
    callback = None
    start = noise
    if task in ("inpainting", "uncropping"):
        known = KnownRegion(target, pair.mask)
        callback, start = known, known.start(noise)
    x = sampler.sample(
        model,
        start,
        num_steps=num_steps,
        model_kwargs={"source": pair.source},
        generator=g if isinstance(sampler, DDPM) else None,
        callback=callback,
        progress=progress,
    )
    if task == "colorization":  # keep the measured luminance, take the chroma from the sample
        x = with_luma(x, pair.source)
    return pair.source, x.clamp(-1, 1)


def run_demo(
    cfg: DemoConfig, out: str | Path, *, progress: bool = True, resume: bool = False
) -> dict[str, Any]:
    """Train, sample every task with DDPM and DDIM, write grids and ``metrics.json``; returns the metrics."""
    if not isinstance(cfg, DemoConfig):
        raise InputTypeError(f"cfg: expected an imgdiff DemoConfig, got {describe(cfg)}")
    if not isinstance(out, (str, Path)):
        raise InputTypeError(f"out: expected a folder path (str or Path), got {describe(out)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputValueError(f"out: expected a folder, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net, schedule, losses = train_model(cfg, out, progress, resume=resume)
    train_seconds = time.perf_counter() - t0
    held_out, _ = toy_shapes(cfg.eval_images, cfg.image_size, seed=cfg.seed + 1000)
    samplers: dict[str, tuple[Sampler[Any, Any], int]] = {
        "ddpm": (DDPM(schedule, prediction=cfg.prediction), cfg.ddpm_steps),
        "ddim": (DDIM(schedule, prediction=cfg.prediction), cfg.ddim_steps),
    }
    metrics: dict[str, Any] = {}
    with torch.no_grad():
        for i, task in enumerate(TASKS):
            rows: list[Tensor] = []
            metrics[task] = {}
            for name, (sampler, steps) in samplers.items():
                source, x = sample_task(
                    net, schedule, sampler, task, held_out, steps, cfg.seed + i, progress
                )
                metrics[task][name] = {
                    "psnr": float(psnr(x, held_out).mean()),
                    "ssim": float(ssim(x, held_out).mean()),
                }
                if not rows:
                    rows.append(source)
                rows.append(x)
            rows.append(held_out)
            save_image_grid(torch.cat(rows), out / f"{task}.png", nrow=cfg.eval_images)
    summary = {
        "metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "config": asdict(cfg),
        "rows": "source | DDPM | DDIM | ground truth",
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m imgdiff demo [--out DIR] [--quick] [--steps N] [--warmup-steps N]
    [--resume]``."""
    parser = argparse.ArgumentParser(prog="python -m imgdiff", description="imgdiff command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a small Palette model on toy shapes and solve its four tasks"
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/demo"),
        help="output folder (default: outputs/demo)",
    )
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: 1000; quick: 40)",
    )
    demo.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps of the linear learning-rate warm-up (default: 100; quick: 4); it does not "
        "follow --steps, so a resumed run continues the same schedule",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/model.safetensors of an earlier run with the same options "
        "(--steps may differ: a larger one trains further)",
    )
    args = parser.parse_args(argv)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    changes = {"train_steps": args.steps, "warmup_steps": args.warmup_steps}
    flags = {"train_steps": "--steps", "warmup_steps": "--warmup-steps"}
    try:
        cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    except ImgdiffError as exc:  # name the flag, not the config field
        field, _, rest = str(exc).partition(": ")
        demo.error(f"{flags.get(field, field)}: {rest}")
    if args.out.exists() and not args.out.is_dir():
        demo.error(f"--out: expected a folder, got the file {args.out}")
    if cfg.train_steps <= cfg.warmup_steps:
        print(
            f"note: training ends inside the {cfg.warmup_steps}-step learning-rate warm-up "
            f"(--steps {cfg.train_steps}); pass a smaller --warmup-steps for a short run",
            file=sys.stderr,
        )
    try:
        summary = run_demo(cfg, args.out, progress=not args.no_progress, resume=args.resume)
    except CheckpointError as exc:
        if not args.resume:
            raise
        first = str(exc).splitlines()[0]
        demo.error(
            f"--resume: {args.out}/model.safetensors cannot be continued with these options: "
            f"{first} (run without --resume to start afresh, or pick another --out)"
        )
    print(
        f"trained {cfg.train_steps} steps in {summary['train_seconds']} s; total {summary['total_seconds']} s"
    )
    for task, per in summary["metrics"].items():
        line = ", ".join(
            f"{s}: PSNR {m['psnr']:.2f} dB SSIM {m['ssim']:.3f}" for s, m in per.items()
        )
        print(f"{task:13s} {line}")
    print(f"wrote {args.out}/<task>.png (rows: {summary['rows']}) and {args.out}/metrics.json")
