"""A small training loop for denoising models: noise, loss, Adam, EMA, checkpoints and resume.

It trains ``model(x_t, noise_level, **conditions)`` to predict eps, x0 or v (DDPM Algorithm 1),
with Palette's options: a mask whose known region stays clean in the network input and is left
out of the loss, and continuous noise levels (gamma) instead of timesteps. Optional: min-SNR loss
weights (Hang et al. 2023), condition dropout for classifier-free guidance (Ho & Salimans 2022)
and improved DDPM's hybrid loss for networks with a learned variance (Nichol & Dhariwal 2021).
Everything random comes from one generator whose state is checkpointed together with the global
CPU (and CUDA) generators, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from imgdiff._checks import (
    check_bool,
    check_choice,
    check_float,
    check_input_dtype,
    check_int,
    check_seed,
    check_tensor,
    describe,
    set_checked,
)
from imgdiff.conditioning.dropout import drop_conditions
from imgdiff.conditioning.masks import check_mask
from imgdiff.conditioning.noise_level import network_noise_conditioning
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.losses.denoising import (
    LOSS_NORMS,
    MASK_NORMALIZATIONS,
    LossNorm,
    MaskNormalization,
    denoising_loss,
    masked_denoising_loss,
    min_snr_weight_from_alpha_bar,
    vlb_term,
)
from imgdiff.models import Model, infer_model_dtype
from imgdiff.prediction import PREDICTION_TYPES, PredictionType
from imgdiff.schedules import NoiseSchedule, check_schedule
from imgdiff.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imgdiff.training.ema import ema_model
from imgdiff.training.noise import sample_gamma, sample_timesteps

__all__ = ["Trainer", "TrainingBatch", "TrainingConfig"]

NoiseLevel = Literal["timestep", "gamma"]
_NOISE_LEVELS: tuple[NoiseLevel, ...] = get_args(NoiseLevel)

_CHANGEABLE_ON_RESUME = frozenset({"steps", "log_every", "checkpoint_every"})
"""Options a resumed run may change; any other difference from the checkpoint's is refused."""
_MISSING = object()


@dataclass(frozen=True, eq=False)
class TrainingBatch:
    """One batch: clean targets ``x0`` ``(B, C, H, W)``, the model's keyword conditions, an optional
    mask ``(B, 1, H, W)``, or ``(1, 1, H, W)`` shared by the batch (1 = to generate; the rest is
    kept clean in ``x_t`` and not in the loss)."""

    x0: Tensor
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x0, Tensor):
            raise InputTypeError(f"x0: expected a tensor (B, C, H, W), got {describe(self.x0)}")
        if not isinstance(self.model_kwargs, Mapping):
            raise InputTypeError(
                f"model_kwargs: expected a mapping of condition name to value, got "
                f"{describe(self.model_kwargs)}"
            )
        if self.mask is not None and not isinstance(self.mask, Tensor):
            raise InputTypeError(
                f"mask: expected None or a tensor (B, 1, H, W), got {describe(self.mask)}"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """Options of :class:`Trainer`.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this number).
        lr: Adam learning rate (linear warm-up over ``warmup_steps``).
        warmup_steps: steps of the linear learning-rate warm-up from ``lr / warmup_steps`` to
            ``lr`` (0: none); a resumed run must keep it.
        prediction: what the model is trained to output.
        norm: ``"l2"`` (Palette's default) or ``"l1"``.
        mask_normalization: see :data:`imgdiff.losses.MaskNormalization`.
        noise_level: ``"timestep"`` (the model gets ``t``) or ``"gamma"`` (Palette: the model gets
            ``gamma ~ U(ab_t, ab_{t-1})``, :func:`~imgdiff.training.sample_gamma`).
        ema_decay: EMA decay of the weights.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        checkpoint_every: also checkpoint every this many steps (0: only at the end).
        seed: seed of the generator behind batches, noise and noise levels (an int in
            ``[-2**63, 2**64 - 1]``, what ``torch.Generator.manual_seed`` takes).
        log_every: steps between progress-bar loss updates (each reads the loss on the host).
        min_snr_gamma: weight each sample's loss by Min-SNR-gamma (Hang et al. 2023; 5 in the
            paper), from its ``alpha_bar_t`` or gamma (``None``: unweighted).
        p_uncond: probability of replacing a sample's conditions by ``null_conditions`` (CFG
            training, Ho & Salimans 2022; typically 0.1), drawn from the training generator.
        vlb_weight: ``lambda`` of improved DDPM's hybrid loss, used when the network outputs a
            learned variance (``2 C`` channels; ``"timestep"`` levels, no mask).
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
    min_snr_gamma: float | None = None
    p_uncond: float = 0.0
    vlb_weight: float = 0.001

    def __post_init__(self) -> None:
        # the checked values are stored: a numpy scalar becomes the int or float it stands for
        # (the config goes into checkpoints as JSON, and the seed into torch.Generator)
        set_checked(
            self,
            steps=check_int("steps", self.steps, min=1),
            lr=check_float("lr", self.lr, min=0.0, min_open=True),
            warmup_steps=check_int("warmup_steps", self.warmup_steps, min=0),
            prediction=check_choice("prediction", self.prediction, PREDICTION_TYPES),
            norm=check_choice("norm", self.norm, LOSS_NORMS),
            mask_normalization=check_choice(
                "mask_normalization", self.mask_normalization, MASK_NORMALIZATIONS
            ),
            noise_level=check_choice("noise_level", self.noise_level, _NOISE_LEVELS),
            ema_decay=check_float("ema_decay", self.ema_decay, min=0.0, max=1.0, max_open=True),
            checkpoint_every=check_int("checkpoint_every", self.checkpoint_every, min=0),
            seed=check_seed("seed", self.seed),
            log_every=check_int("log_every", self.log_every, min=1),
            p_uncond=check_float("p_uncond", self.p_uncond, min=0.0, max=1.0),
            vlb_weight=check_float("vlb_weight", self.vlb_weight, min=0.0),
        )
        if self.grad_clip is not None:
            set_checked(
                self, grad_clip=check_float("grad_clip", self.grad_clip, min=0.0, min_open=True)
            )
        if self.min_snr_gamma is not None:
            set_checked(
                self,
                min_snr_gamma=check_float(
                    "min_snr_gamma", self.min_snr_gamma, min=0.0, min_open=True
                ),
            )


class Trainer:
    """Trains ``net`` through ``model`` (default ``net`` itself; pass an adapter such as
    :class:`~imgdiff.conditioning.ConcatConditioning` wrapping ``net``).

    ``make_batch(step, generator) -> TrainingBatch`` supplies data; draw all its randomness from
    ``generator`` for reproducible, resumable runs. With ``checkpoint`` set, the trainer writes it
    (atomically) every ``checkpoint_every`` steps and at the end; with ``resume`` (default) an
    existing file is loaded first and training continues from it, after checking that it was
    written with the same options (only ``steps``, ``log_every`` and ``checkpoint_every`` may
    change). ``resume=False`` starts afresh and overwrites it. After :meth:`train`,
    ``trainer.ema.module`` holds the averaged network (in eval mode).

    Args:
        net: the trained module (its parameters go to Adam and the EMA).
        schedule: the training noise schedule.
        make_batch: the data, see above.
        config: :class:`TrainingConfig`.
        model: what is called as ``model(x_t, level, **batch.model_kwargs)`` (default ``net``).
        checkpoint: file to write (and resume from).
        resume: load ``checkpoint`` when it exists.
        null_conditions: the null value of each condition dropped with ``config.p_uncond``
            (batch 1 or B; e.g. ``{"class_labels": torch.tensor([K])}``), see
            :func:`imgdiff.conditioning.drop_conditions`.
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
        resume: bool = True,
        null_conditions: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise InputTypeError(f"net: expected a torch.nn.Module, got {describe(net)}")
        if not isinstance(config, TrainingConfig):
            raise InputTypeError(
                f"config: expected an imgdiff TrainingConfig, got {describe(config)}"
            )
        if not callable(make_batch):
            raise InputTypeError(f"make_batch: expected a callable, got {describe(make_batch)}")
        if null_conditions is not None and not isinstance(null_conditions, Mapping):
            raise InputTypeError(
                f"null_conditions: expected a mapping of condition name to null tensor, got "
                f"{describe(null_conditions)}"
            )
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise InputTypeError(
                f"checkpoint: expected None or a file path (str or Path), got {describe(checkpoint)}"
            )
        check_bool("resume", resume)
        mode = network_noise_conditioning(model if model is not None else net)
        if mode is not None and mode != config.noise_level:
            raise InputValueError(
                f"config.noise_level: expected {mode!r}, what the network is conditioned on "
                f"(its config.noise_conditioning), got {config.noise_level!r}"
            )
        if config.p_uncond > 0 and not null_conditions:
            raise InputValueError(
                f"null_conditions: expected the null value of every dropped condition for "
                f"p_uncond={config.p_uncond}, got {describe(null_conditions)}"
            )
        self.net = net
        self.model: Model = model if model is not None else net
        self.schedule = check_schedule("schedule", schedule)
        self.make_batch = make_batch
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.null_conditions = dict(null_conditions) if null_conditions else None
        self.optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        self.ema = ema_model(net, config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.losses: list[float] = []  # mean loss of every step so far (flushed from _pending)
        self._pending: list[Tensor] = []
        self._mask_values_checked = False
        if resume and self.checkpoint is not None and self.checkpoint.is_file():
            self.load(self.checkpoint)

    # ------------------------------------------------------------------ one step

    def loss(self, batch: TrainingBatch) -> Tensor:
        """The per-sample loss ``(B,)`` of one batch (noise, levels and dropout from the generator).

        The model output is ``(B, C, H, W)``, or ``(B, 2 C, H, W)`` with a learned variance (then
        the hybrid loss: the simple loss on the first ``C`` channels plus
        ``vlb_weight * T * L_t``).
        """
        cfg = self.config
        if not isinstance(batch, TrainingBatch):
            raise InputTypeError(f"batch: expected a TrainingBatch, got {describe(batch)}")
        x0 = check_tensor("batch.x0", batch.x0, ndim=4, floating=True)
        weights = infer_model_dtype(self.net)
        if weights is not None:
            check_input_dtype("batch.x0", x0, weights)
        B, C = x0.shape[:2]
        g = self.generator
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        t: Tensor | None = None
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
        mask = self._checked_mask(batch.mask, x0)
        if mask is not None:
            x_t = torch.where(mask, x_t, x0)  # Palette: the known region is clean in the input
        out = self.model(x_t, net_level, **self._conditions(batch, B))
        if (
            not isinstance(out, Tensor)
            or out.ndim != 4
            or out.shape[0] != B
            or out.shape[1] not in (C, 2 * C)
            or out.shape[2:] != x0.shape[2:]
        ):
            raise InputValueError(
                f"model output: expected shape ({B}, {C} or {2 * C}, {x0.shape[2]}, "
                f"{x0.shape[3]}), got {describe(out)}"
            )
        target = (
            noise
            if cfg.prediction == "epsilon"
            else x0
            if cfg.prediction == "sample"
            else a * noise - s * x0
        )
        mean_out = out[:, :C]
        if mask is None:
            loss = denoising_loss(mean_out, target, norm=cfg.norm)
        else:
            loss = masked_denoising_loss(
                mean_out, target, mask, norm=cfg.norm, normalization=cfg.mask_normalization
            )
        if cfg.min_snr_gamma is not None:
            w = min_snr_weight_from_alpha_bar(level, cfg.prediction, cfg.min_snr_gamma)
            loss = loss * w.to(device=loss.device, dtype=loss.dtype)
        if out.shape[1] == 2 * C:
            if t is None or mask is not None:
                raise InputValueError(
                    "model output: a learned variance (2 C channels) is trained with the hybrid "
                    "loss, which needs noise_level='timestep' and no mask; got "
                    f"noise_level={cfg.noise_level!r} and "
                    f"{'a mask' if mask is not None else 'no mask'}"
                )
            # t stays on the CPU: vlb_term reads its values there, with no device sync
            vlb = vlb_term(self.schedule, out, x0, x_t, t, prediction=cfg.prediction)
            loss = loss + (cfg.vlb_weight * len(self.schedule)) * vlb.to(loss.dtype)
        return loss

    def _checked_mask(self, mask: Tensor | None, x0: Tensor) -> Tensor | None:
        """The batch mask as bool ``(B, 1, H, W)``: one shared ``(1, 1, H, W)`` mask is expanded
        to the batch (a view; the caller's tensor is left alone). Its 0/1 values are read (a
        host sync) on the first mask only."""
        if mask is None:
            return None
        checked = check_mask("batch.mask", mask, x0, values=not self._mask_values_checked)
        self._mask_values_checked = True
        return checked.bool().expand(x0.shape[0], -1, -1, -1)

    def _conditions(self, batch: TrainingBatch, B: int) -> dict[str, Any]:
        """``batch.model_kwargs`` with conditions dropped to the null ones at rate ``p_uncond``."""
        kwargs = dict(batch.model_kwargs)
        if self.config.p_uncond == 0 or self.null_conditions is None:
            return kwargs
        missing = sorted(set(self.null_conditions) - set(kwargs))
        if missing:
            raise InputValueError(
                f"batch.model_kwargs: expected the conditions {sorted(self.null_conditions)} "
                f"that null_conditions drops, missing {missing}"
            )
        cond = {k: kwargs[k] for k in self.null_conditions}
        dropped, _ = drop_conditions(
            cond, self.null_conditions, self.config.p_uncond, batch=B, generator=self.generator
        )
        kwargs.update(dropped)
        return kwargs

    def train(self, *, progress: bool = True) -> list[float]:
        """Run until ``config.steps``; returns the mean loss of every step of this call.

        :attr:`losses` keeps every step's loss since the first run (restored on resume). The
        progress bar reads the loss on the host every ``log_every`` steps; nothing else reads
        device values on the host inside the loop (noise and noise levels are drawn on the CPU
        generator, for reproducible resumes, and copied to the device each step).
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
        self.ema.eval()
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
        """Write model, EMA, optimiser, generator (CPU, CUDA) states and the losses (atomic)."""
        self._flush()
        tensors: dict[str, Tensor] = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = cuda_state
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        meta = {
            "step": self.step,
            "config": asdict(self.config),
            "param_groups": optim["param_groups"],
        }
        return save_checkpoint(path, tensors, meta)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save` (the next :meth:`train` continues from it).

        Raises :class:`~imgdiff.training.CheckpointError` when the file is not a trainer
        checkpoint, does not fit this network, or was written with other options than
        ``steps``, ``log_every`` and ``checkpoint_every``.
        """
        tensors, meta = load_checkpoint(path)
        where = str(path)
        self._check_saved_config(meta.get("config"), where)
        try:
            net_state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
            ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            self.net.load_state_dict(net_state)
            self.ema.load_state_dict(ema_state)
            state: dict[int, dict[str, Tensor]] = {}
            for name, value in tensors.items():
                if name.startswith("optim."):
                    _, index, key = name.split(".", 2)
                    state.setdefault(int(index), {})[key] = value
            groups = _with_tuples_of(self.optimizer.param_groups, meta["param_groups"])
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            self.generator.set_state(tensors["rng.generator"])
            torch.set_rng_state(tensors["rng.torch"])
            step = int(meta["step"])
            losses = tensors["losses"].tolist()
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"path: {where!r} is not a Trainer checkpoint for this network "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"rng.cuda.{i}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
        self.step = step
        self.losses = [float(v) for v in losses]
        self._pending = []

    def _check_saved_config(self, saved: object, where: str) -> None:
        if not isinstance(saved, dict):
            raise CheckpointError(
                f"path: {where!r} has no training config; not a Trainer checkpoint"
            )
        now = asdict(self.config)
        diffs = [
            f"{k}: saved {saved[k]!r}, now {v!r}" if k in saved else f"{k}: not saved, now {v!r}"
            for k, v in now.items()
            if k not in _CHANGEABLE_ON_RESUME and saved.get(k, _MISSING) != v
        ]
        if diffs:
            raise CheckpointError(
                f"config: the checkpoint at {where!r} was written with other options "
                f"({'; '.join(diffs)}); resume with the same TrainingConfig (only steps, "
                "log_every and checkpoint_every may change) or pass resume=False to start afresh"
            )


def _with_tuples_of(current: list[dict[str, Any]], saved: object) -> object:
    """``saved`` param groups (read back from JSON, where tuples became lists) with each option
    that is a tuple in the optimiser's ``current`` groups (Adam's ``betas``) a tuple again."""
    if not isinstance(saved, list):
        return saved
    restored: list[object] = []
    for index, group in enumerate(saved):
        like = current[index] if index < len(current) else {}
        if isinstance(group, dict):
            group = {
                key: tuple(value)
                if isinstance(value, list) and isinstance(like.get(key), tuple)
                else value
                for key, value in group.items()
            }
        restored.append(group)
    return restored
