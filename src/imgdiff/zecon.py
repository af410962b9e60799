"""ZeCon-style zero-shot image editing: invert the source part way, then loss-guided sampling.

Yang et al. 2023, "Zero-Shot Contrastive Loss for Text-Guided Diffusion Image Style Transfer"
(spec 7.7). The source image is DDIM-inverted (or diffused with fresh noise) to the level of
the first kept step, then sampled back with :class:`~imgdiff.LossGuidance`: patch/global CLIP
losses pull the result toward the target text, the zero-shot contrastive (PatchNCE) loss and
optional MSE/VGG/LPIPS losses keep the source's content, and the range loss keeps ``x0_hat``
in ``[-1, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from imgdiff._checks import (
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_tensor,
    describe,
)
from imgdiff.clip.encoder import CLIPEncoder
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.loss_guidance import GateOn, GuidanceInputs, LossGuidance, LossTerm, TermCallback
from imgdiff.losses.augment import CLIPAugment
from imgdiff.losses.clip import CLIPDirectionalLoss, CLIPGlobalLoss
from imgdiff.losses.contrastive import ZeroShotContrastiveLoss
from imgdiff.losses.perceptual import mse_loss, range_loss
from imgdiff.models import Model, without_variance
from imgdiff.noising import add_noise
from imgdiff.samplers.ddim import DDIM
from imgdiff.samplers.denoising import DenoisingSampler
from imgdiff.samplers.step import Callback

__all__ = ["Inversion", "ZeConConfig", "zecon_edit"]

Inversion = Literal["ddim", "diffuse"]
_INVERSIONS: tuple[Inversion, ...] = ("ddim", "diffuse")
_GATES: tuple[GateOn, ...] = ("timestep", "respaced_index")
PairLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ZeConConfig:
    """Loss weights and schedule of a ZeCon edit (spec 7.7).

    The weights multiply: ``clip_global`` / ``clip_global_patch`` (spherical distance to the
    target text over augmented whole images / patches), ``clip_dir`` / ``clip_dir_patch``
    (ZeCon's directional loss, source image and texts), ``zecon`` (zero-shot contrastive content
    loss), ``mse``, ``vgg``, ``lpips`` (content losses against the source) and ``range`` (on
    ``x0_hat``). ``num_steps`` is the respaced step count and ``skip`` the steps left out at the
    noisy end (the edit runs ``num_steps - skip`` steps). MSE applies below training timestep
    ``mse_max_timestep``, VGG below ``vgg_max_timestep`` (``gate_on`` as in
    :class:`~imgdiff.LossGuidance`). Presets: :meth:`readme` (the paper's recipe),
    :meth:`code_defaults` (the argparse defaults of the authors' code).
    """

    clip_global: float = 0.0
    clip_global_patch: float = 0.0
    clip_dir: float = 0.0
    clip_dir_patch: float = 1000.0
    zecon: float = 0.0
    mse: float = 0.0
    vgg: float = 0.0
    lpips: float = 0.0
    range: float = 50.0
    n_patch: int = 32
    patch_min: float = 0.01
    patch_max: float = 0.05
    num_steps: int = 100
    skip: int = 25
    mse_max_timestep: int | None = 700
    vgg_max_timestep: int | None = 800
    gate_on: GateOn = "timestep"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"n_patch", "num_steps", "skip"}:
                check_int(f.name, value, min=1 if f.name != "skip" else 0)
            elif f.name.endswith("max_timestep"):
                if value is not None:
                    check_int(f.name, value, min=0)
            elif f.name == "gate_on":
                check_choice("gate_on", value, _GATES)
            else:
                check_float(f.name, value, min=0.0)
        if self.skip >= self.num_steps:
            raise InputValueError(
                f"skip: expected fewer than num_steps ({self.num_steps}) steps skipped, got {self.skip}"
            )
        if not 0.0 < self.patch_min <= self.patch_max <= 1.0:
            raise InputValueError(
                f"patch_min, patch_max: expected 0 < patch_min <= patch_max <= 1, got "
                f"{self.patch_min}, {self.patch_max}"
            )

    @classmethod
    def readme(cls) -> ZeConConfig:
        """The recipe of ZeCon's README: 50 steps, skip 25, patch CLIP 10000 + dir 20000,
        contrastive 500, MSE 5000, VGG 100, range 50, patches up to 0.3 of the area."""
        return cls(
            clip_global_patch=10000.0,
            clip_dir_patch=20000.0,
            zecon=500.0,
            mse=5000.0,
            vgg=100.0,
            patch_max=0.3,
            num_steps=50,
        )

    @classmethod
    def code_defaults(cls) -> ZeConConfig:
        """The argparse defaults of ZeCon's code: 100 steps, skip 25, patch dir CLIP 1000, range 50."""
        return cls()

    @property
    def strength(self) -> float:
        """The fraction of the plan that runs, ``(num_steps - skip) / num_steps`` (informative:
        :func:`zecon_edit` keeps exactly the last ``num_steps - skip`` timesteps)."""
        return (self.num_steps - self.skip) / self.num_steps


def zecon_edit(
    sampler: DenoisingSampler[Any],
    model: Model,
    source: Tensor,
    *,
    clip: CLIPEncoder,
    source_text: str,
    target_text: str,
    config: ZeConConfig | None = None,
    contrastive: PairLoss | None = None,
    vgg: PairLoss | None = None,
    lpips: PairLoss | None = None,
    inversion: Inversion = "ddim",
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    on_terms: TermCallback | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Tensor:
    """Edit ``source`` toward ``target_text`` with ZeCon's loss guidance.

    Args:
        sampler: the reverse sampler; ZeCon uses :class:`~imgdiff.DDPM` (with the model's learned
            variance, ``variance="learned_range"``) or :class:`~imgdiff.DDIM` with ``eta = 0``
            (give DDIM a mean-only model: :func:`~imgdiff.without_variance`). Its ``guidance``
            is replaced by the ZeCon guidance; its spacing picks the timesteps (ZeCon's
            respacing is close to ``spacing="linspace"``).
        model: the unconditional diffusion network ``model(x, t, **model_kwargs)``.
        source: ``(B, 3, H, W)`` images in ``[-1, 1]``.
        clip: the CLIP encoder of the CLIP losses (ZeCon: ViT-B/16).
        source_text / target_text: what the source shows and the style wanted (``"photo"`` ->
            ``"watercolor painting"``); the directional losses use both.
        config: weights and schedule (default :meth:`ZeConConfig.readme`, which needs
            ``contrastive`` and ``vgg``).
        contrastive / vgg / lpips: the content losses ``loss(x_in, y_in) -> scalar`` for the
            weights ``zecon``, ``vgg``, ``lpips`` (e.g.
            :class:`~imgdiff.losses.ZeroShotContrastiveLoss` on the model's encoder,
            :class:`~imgdiff.losses.VGGFeatureLoss`, :class:`~imgdiff.losses.LPIPSLoss`);
            required where the weight is not 0.
        inversion: ``"ddim"`` (deterministic DDIM inversion, as ZeCon's ``ddim_ddpm``, though
            :meth:`~imgdiff.DDIM.invert` evaluates the model at the target timestep, diffusers'
            convention, where ZeCon's code uses the current one) or ``"diffuse"``
            (``q_sample`` with noise from ``generator``).
        generator: the randomness of the edit (augmentations, the source's ``y_t``, sampling);
            on the CPU.
        on_terms: called each step with the weighted value of every active loss term.
        callback: per-step callback of the reverse sampler (:class:`~imgdiff.StepInfo`).

    Returns the edited ``(B, 3, H, W)`` in the sampler's state dtype.
    """
    if not isinstance(sampler, DenoisingSampler):
        raise InputTypeError(
            f"sampler: expected an imgdiff DenoisingSampler (DDPM, DDIM), got {describe(sampler)}"
        )
    check_tensor("source", source, ndim=4, floating=True, nonempty=True)
    if source.shape[1] != 3:
        raise InputValueError(f"source: expected (B, 3, H, W) images, got {tuple(source.shape)}")
    cfg = ZeConConfig.readme() if config is None else config
    if not isinstance(cfg, ZeConConfig):
        raise InputTypeError(f"config: expected a ZeConConfig, got {describe(cfg)}")
    check_choice("inversion", inversion, _INVERSIONS)
    generator = check_generator(generator)
    for name, weight, loss in (
        ("contrastive", cfg.zecon, contrastive),
        ("vgg", cfg.vgg, vgg),
        ("lpips", cfg.lpips, lpips),
    ):
        if loss is not None and not callable(loss):
            raise InputTypeError(
                f"{name}: expected None or a callable loss(x, y), got {describe(loss)}"
            )
        if weight != 0.0 and loss is None:
            raise InputValueError(
                f"{name}: the config weighs this loss by {weight}; pass the loss (see zecon_edit's "
                f"docstring) or set its weight to 0"
            )

    terms = _terms(cfg, clip, source_text, target_text, contrastive, vgg, lpips, generator)
    guidance = LossGuidance(
        terms, source=source, gate_on=cfg.gate_on, generator=generator, on_terms=on_terms
    )
    guided = replace(sampler, guidance=guidance)
    # the plan's last num_steps - skip timesteps, as an explicit list (exact for every pair)
    kept = list(sampler.timesteps(cfg.num_steps))[cfg.skip :]
    plan_kwargs: dict[str, Any] = {"timesteps": kept}
    if inversion == "ddim":
        inverter = DDIM(
            sampler.schedule,
            prediction=sampler.prediction,
            spacing=sampler.spacing,
            steps_offset=sampler.steps_offset,
            final_alpha_bar=sampler.final_alpha_bar,
            dtype=sampler.dtype,
            backend=sampler.backend,
        )
        eps_model = without_variance(model) if sampler.output_channels_factor == 2 else model
        start = inverter.invert(
            eps_model, source, model_kwargs=model_kwargs, progress=progress, **plan_kwargs
        )
    else:
        t0 = int(kept[0])
        noise = torch.randn(source.shape, generator=generator, dtype=source.dtype)
        start = add_noise(sampler.schedule, source, noise.to(source.device), t0)
    return guided.sample(
        model,
        start,
        generator=generator,
        model_kwargs=model_kwargs,
        callback=callback,
        progress=progress,
        **plan_kwargs,
    )


def _terms(
    cfg: ZeConConfig,
    clip: CLIPEncoder,
    source_text: str,
    target_text: str,
    contrastive: PairLoss | None,
    vgg: PairLoss | None,
    lpips: PairLoss | None,
    generator: torch.Generator | None,
) -> list[LossTerm]:
    """ZeCon's loss terms for the non-zero weights of ``cfg``."""

    def augmenter(patch: bool) -> CLIPAugment:
        # pools straight to CLIP's input size (224 for the ViT-B models, as in ZeCon)
        return CLIPAugment(
            n_patch=cfg.n_patch,
            patch=patch,
            patch_min=cfg.patch_min,
            patch_max=cfg.patch_max,
            output_size=clip.image_size,
        )

    terms: list[LossTerm] = []

    def add(name: str, weight: float, loss: Callable[[GuidanceInputs], Tensor], **kw: Any) -> None:
        if weight != 0.0:
            terms.append(LossTerm(name, loss, weight, **kw))

    if cfg.clip_global:
        glob = CLIPGlobalLoss(clip, target_text, augment=augmenter(False))
        add("clip_global", cfg.clip_global, lambda v: glob(v.x, generator=generator))
    if cfg.clip_global_patch:
        glob_p = CLIPGlobalLoss(clip, target_text, augment=augmenter(True))
        add("clip_global_patch", cfg.clip_global_patch, lambda v: glob_p(v.x, generator=generator))
    if cfg.clip_dir:
        dir_ = CLIPDirectionalLoss(
            clip, source_text, target_text, variant="zecon", augment=augmenter(False)
        )
        add("clip_dir", cfg.clip_dir, lambda v: dir_(v.x, _source(v), generator=generator))
    if cfg.clip_dir_patch:
        dir_p = CLIPDirectionalLoss(
            clip, source_text, target_text, variant="zecon", augment=augmenter(True)
        )
        add(
            "clip_dir_patch",
            cfg.clip_dir_patch,
            lambda v: dir_p(v.x, _source(v), generator=generator),
        )
    if isinstance(contrastive, ZeroShotContrastiveLoss):  # its patch positions are random too
        zecon_loss = contrastive
        add("zecon", cfg.zecon, lambda v: zecon_loss(v.x, _source(v), generator=generator))
    elif contrastive is not None:
        add("zecon", cfg.zecon, lambda v: contrastive(v.x, _source(v)))
    add("mse", cfg.mse, lambda v: mse_loss(v.x, _source(v)), max_timestep=cfg.mse_max_timestep)
    if vgg is not None:
        add("vgg", cfg.vgg, lambda v: vgg(v.x, _source(v)), max_timestep=cfg.vgg_max_timestep)
    if lpips is not None:
        add("lpips", cfg.lpips, lambda v: lpips(v.x, _source(v)))
    add("range", cfg.range, lambda v: range_loss(v.x), input="x0_hat")
    if not terms:
        raise InputValueError("config: every loss weight is 0; nothing would guide the edit")
    return terms


def _source(inputs: GuidanceInputs) -> Tensor:
    if inputs.source is None:  # pragma: no cover - zecon_edit always passes the source
        raise InputValueError("source: this loss compares with the source image; none was given")
    return inputs.source
