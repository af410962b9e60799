"""A small training loop for denoising models: noise, loss, Adam, EMA, checkpoints and resume.

It trains ``model(x_t, noise_level, **conditions)`` to predict eps, x0 or v (DDPM Algorithm 1),
with Palette's options: a mask whose known region stays clean in the network input and is left
out of the loss, and continuous noise levels (gamma) instead of timesteps. Everything random
comes from one generator whose state is checkpointed, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from imgdiff._checks import check_choice, check_float, check_int, check_tensor, describe
from imgdiff.conditioning.masks import check_mask
from imgdiff.errors import InputTypeError
from imgdiff.losses.denoising import (
    LOSS_NORMS,
    MASK_NORMALIZATIONS,
    LossNorm,
    MaskNormalization,
    denoising_loss,
    masked_denoising_loss,
)
from imgdiff.models import Model
from imgdiff.prediction import PREDICTION_TYPES, PredictionType
from imgdiff.schedules import NoiseSchedule, check_schedule
from imgdiff.training.checkpoint import load_checkpoint, save_checkpoint
from imgdiff.training.ema import ema_model
from imgdiff.training.noise import sample_gamma, sample_timesteps

__all__ = ["Trainer", "TrainingBatch", "TrainingConfig"]

NoiseLevel = Literal["timestep", "gamma"]
_NOISE_LEVELS: tuple[NoiseLevel, ...] = get_args(NoiseLevel)


@dataclass(frozen=True, eq=False)
class TrainingBatch:
    """One batch: clean targets ``x0`` ``(B, C, H, W)``, the model's keyword conditions, an optional
    mask ``(B, 1, H, W)`` (1 = to generate; the rest is kept clean in ``x_t`` and not in the loss)."""

    x0: Tensor
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Options of :class:`Trainer`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this number).
        lr: Adam learning rate (linear warm-up over ``warmup_steps``).
        prediction: what the model is trained to output.
        norm: ``"l2"`` (Palette's default) or ``"l1"``.
        mask_normalization: see :data:`imgdiff.losses.MaskNormalization`.
        noise_level: ``"timestep"`` (the model gets ``t``) or ``"gamma"`` (Palette: the model gets
            ``gamma ~ U(ab_t, ab_{t-1})``, :func:`~imgdiff.training.sample_gamma`).
        ema_decay: EMA decay of the weights.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        checkpoint_every: also checkpoint every this many steps (0: only at the end).
        seed: seed of the generator behind batches, noise and noise levels.
        log_every: steps between progress-bar loss updates (each reads the loss on the host).
    """

    steps: int
    lr: float = 2e-4
    warmup_steps: int = 0
    prediction: PredictionType = "epsilon"
    norm: LossNorm = "l2"
    mask_normalization: MaskNormalization = "hole"
    noise_level: NoiseLevel = "timestep"
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    checkpoint_every: int = 0
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        check_int("steps", self.steps, min=1)
        check_float("lr", self.lr, min=0.0, min_open=True)
        check_int("warmup_steps", self.warmup_steps, min=0)
        check_choice("prediction", self.prediction, PREDICTION_TYPES)
        check_choice("norm", self.norm, LOSS_NORMS)
        check_choice("mask_normalization", self.mask_normalization, MASK_NORMALIZATIONS)
        check_choice("noise_level", self.noise_level, _NOISE_LEVELS)
        check_float("ema_decay", self.ema_decay, min=0.0, max=1.0, max_open=True)
        if self.grad_clip is not None:
            check_float("grad_clip", self.grad_clip, min=0.0, min_open=True)
        check_int("checkpoint_every", self.checkpoint_every, min=0)
        check_int("seed", self.seed)
        check_int("log_every", self.log_every, min=1)


class Trainer:
    """Trains ``net`` through ``model`` (default ``net`` itself; pass an adapter such as
    :class:`~imgdiff.conditioning.ConcatConditioning` wrapping ``net``).

    ``make_batch(step, generator) -> TrainingBatch`` supplies data; draw all its randomness from
    ``generator`` for reproducible, resumable runs. With ``checkpoint`` set, training resumes from
    that file when it exists and writes it (atomically) every ``checkpoint_every`` steps and at the
    end. After :meth:`train`, ``trainer.ema.module`` holds the averaged network.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        make_batch: Callable[[int, torch.Generator], TrainingBatch],
        config: TrainingConfig,
        *,
        model: Model | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise InputTypeError(f"net: expected a torch.nn.Module, got {describe(net)}")
        if not isinstance(config, TrainingConfig):
            raise InputTypeError(
                f"config: expected an imgdiff TrainingConfig, got {describe(config)}"
            )
        if not callable(make_batch):
            raise InputTypeError(f"make_batch: expected a callable, got {describe(make_batch)}")
        self.net = net
        self.model: Model = model if model is not None else net
        self.schedule = check_schedule("schedule", schedule)
        self.make_batch = make_batch
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        self.ema = ema_model(net, config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.losses: list[float] = []  # mean loss of every step so far (flushed from _pending)
        self._pending: list[Tensor] = []
        if self.checkpoint is not None and self.checkpoint.is_file():
            self.load(self.checkpoint)

    # ------------------------------------------------------------------ one step

    def loss(self, batch: TrainingBatch) -> Tensor:
        """The per-sample loss ``(B,)`` of one batch (noise and levels drawn from the generator)."""
        cfg = self.config
        x0 = check_tensor("batch.x0", batch.x0, ndim=4, floating=True)
        B = x0.shape[0]
        g = self.generator
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        if cfg.noise_level == "gamma":
            _, level = sample_gamma(self.schedule, B, generator=g)
            net_level: Tensor = level.to(device=x0.device, dtype=torch.float32)
        else:
            t = sample_timesteps(self.schedule, B, generator=g)
            level = self.schedule.alphas_cumprod[t]
            net_level = t.to(x0.device)
        a = level.sqrt().to(device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1)
        s = (1.0 - level).sqrt().to(device=x0.device, dtype=x0.dtype).reshape(-1, 1, 1, 1)
        x_t = a * x0 + s * noise
        mask = None
        if batch.mask is not None:
            mask = check_mask("batch.mask", batch.mask, x0).bool()
            x_t = torch.where(mask, x_t, x0)  # Palette: the known region is clean in the input
        out = self.model(x_t, net_level, **batch.model_kwargs)
        target = (
            noise
            if cfg.prediction == "epsilon"
            else x0
            if cfg.prediction == "sample"
            else a * noise - s * x0
        )
        if mask is None:
            return denoising_loss(out, target, norm=cfg.norm)
        return masked_denoising_loss(
            out, target, mask, norm=cfg.norm, normalization=cfg.mask_normalization
        )

    def train(self, *, progress: bool = True) -> list[float]:
        """Run until ``config.steps``; returns the mean loss of every step of this call.

        :attr:`losses` keeps every step's loss since the first run (restored on resume).
        """
        cfg = self.config
        self.net.train()
        start = len(self.losses) + len(self._pending)
        bar = tqdm(range(self.step, cfg.steps), desc="training", disable=not progress, leave=False)
        for step in bar:
            lr_scale = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_scale
            batch = self.make_batch(step, self.generator)
            loss = self.loss(batch).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.ema.update_parameters(self.net)
            self._pending.append(loss.detach())  # read on the host only when flushed
            self.step = step + 1
            if progress and (self.step % cfg.log_every == 0):
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if (
                self.checkpoint is not None
                and cfg.checkpoint_every
                and self.step % cfg.checkpoint_every == 0
            ):
                self.save(self.checkpoint)
        self.net.eval()
        self._flush()
        if self.checkpoint is not None:
            self.save(self.checkpoint)
        return self.losses[start:]

    def _flush(self) -> None:
        """Move the per-step losses kept on the device into :attr:`losses` (one host read)."""
        if self._pending:
            self.losses.extend(torch.stack(self._pending).tolist())
            self._pending.clear()

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> Path:
        """Write model, EMA, optimiser and generator states (safetensors, atomic)."""
        self._flush()
        tensors: dict[str, Tensor] = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "step": self.step,
            "config": asdict(self.config),
            "param_groups": optim["param_groups"],
            "losses": self.losses,
        }
        return save_checkpoint(path, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save` (the next :meth:`train` continues from it)."""
        tensors, meta = load_checkpoint(path)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        self.losses = [float(v) for v in meta.get("losses", [])]
        self._pending = []
