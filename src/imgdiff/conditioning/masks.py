"""Mask conditioning by replacement: keep the known region of an image while sampling the hole.

Two variants (spec 2.6 and 8.5):

* ``"clean"`` (Palette): after every step the known pixels are reset to the clean image. This is
  what a Palette network saw in training (its noisy input kept the known region clean).
* ``"noised"`` (RePaint / Stable Diffusion's non-inpainting models): after a step to level ``s``
  the known pixels are replaced by the clean image noised to ``s``,
  ``sqrt(ab_s) x_known + sqrt(1 - ab_s) eps``; after the last step, by the clean image.

:class:`KnownRegion` is a sampler callback (``sampler.sample(..., callback=known)``) that returns
the replaced state; ``known.start(noise)`` gives a starting sample with the known region set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff import kernels
from imgdiff._checks import check_choice, check_tensor, describe
from imgdiff.buffers import out_like
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.kernels import BACKENDS, Backend, fused_backend
from imgdiff.randomness import Generators, check_generators, draw_normal
from imgdiff.samplers.step import StepInfo
from imgdiff.schedules import NoiseSchedule

__all__ = ["PASTE_MODES", "KnownRegion", "PasteMode", "check_mask"]

PasteMode = Literal["clean", "noised"]
PASTE_MODES: tuple[PasteMode, ...] = get_args(PasteMode)


def check_mask(name: str, mask: object, like: Tensor, *, values: bool = True) -> Tensor:
    """Check a hole mask for images ``like`` ``(B, C, H, W)``: shape ``(B or 1, 1, H, W)``, values 0/1.

    Returns the mask in ``like``'s dtype. Checking the values of a non-bool mask reads it on the
    host; ``values=False`` checks only its shape and dtype (for a loop that checked once).
    """
    m = check_tensor(name, mask, ndim=4)
    B, _, H, W = like.shape
    if m.shape[1] != 1 or tuple(m.shape[2:]) != (H, W) or m.shape[0] not in (1, B):
        raise InputValueError(
            f"{name}: expected shape ({B}, 1, {H}, {W}) (1 = missing), got {tuple(m.shape)}"
        )
    if m.dtype == torch.bool:
        return m.to(like.dtype)
    if m.dtype.is_complex:
        raise InputTypeError(f"{name}: expected a bool or real 0/1 mask, got dtype {m.dtype}")
    if values and not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].reshape(-1)[0]
        raise InputValueError(
            f"{name}: expected a binary mask of 0 and 1 (1 = missing), got the value {float(bad)}"
        )
    return m.to(like.dtype)


@dataclass(frozen=True, eq=False)
class KnownRegion:
    """Keep ``known`` ``(B, C, H, W)`` outside ``mask`` ``(B or 1, 1, H, W)`` (1 = missing) while sampling.

    Args:
        known: the image whose known pixels are kept (the hole's content is ignored).
        mask: binary hole mask, 1 = to generate.
        mode: ``"clean"`` (Palette) or ``"noised"`` (RePaint-style; needs ``schedule``).
        schedule: the sampler's schedule (``"noised"`` only).
        generator: for the noise of ``"noised"`` pastes (one, or one per sample).
        backend: the paste's implementation (:mod:`imgdiff.kernels`): one fused kernel where it
            resolves to ``"triton"`` or ``"cpu"``, ``torch.where`` otherwise.

    Used as ``sampler.sample(model, known_region.start(noise), callback=known_region)``: after
    each step the known pixels are replaced exactly (``(1 - m) x == (1 - m) known`` bitwise for
    ``"clean"``). The noise of ``"noised"`` pastes is drawn per step, so it synchronises nothing but
    costs one draw per step. ``known`` and ``mask`` are copied to the sample's device and dtype on
    first use and reused (do not modify ``known`` in place while sampling).
    """

    known: Tensor
    mask: Tensor
    mode: PasteMode = "clean"
    schedule: NoiseSchedule | None = None
    generator: Generators = None
    backend: Backend = "auto"
    _placed: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # the schedule's alpha_bar as Python floats ("noised" only): a paste reads no tensor
    _alpha_bar: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_tensor("known", self.known, ndim=4, floating=True)
        object.__setattr__(self, "mask", check_mask("mask", self.mask, self.known).bool())
        check_choice("mode", self.mode, PASTE_MODES)
        if self.mode == "noised" and not isinstance(self.schedule, NoiseSchedule):
            raise InputTypeError(
                f"schedule: expected the sampler's NoiseSchedule for mode='noised', got {describe(self.schedule)}"
            )
        check_generators(self.generator, self.known.shape[0])
        check_choice("backend", self.backend, BACKENDS)
        if self.schedule is not None and self.mode == "noised":
            object.__setattr__(self, "_alpha_bar", tuple(self.schedule.alphas_cumprod.tolist()))

    def _on(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``known``, the hole mask (bool) and the known-pixel mask ``(B, 1, H, W)`` in ``like``'s
        dtype (the fused kernel's), on ``like``'s device; made once per placement."""
        key = (like.device, like.dtype)
        placed = self._placed.get(key)
        if placed is None:
            hole = self.mask.to(like.device)
            keep = (~hole).to(like.dtype).expand(like.shape[0], 1, *hole.shape[2:]).contiguous()
            # the hole's content is ignored: zeroed once, so a NaN or inf there cannot reach the
            # fused kernels' arithmetic blend (0 * NaN), only torch.where's select
            known = self.known.to(device=like.device, dtype=like.dtype).masked_fill(hole, 0.0)
            placed = (known, hole, keep)
            self._placed[key] = placed
        return placed

    def _level(self, timestep: int, like: Tensor) -> tuple[float, Tensor | None, float]:
        """``(known_scale, noise, noise_scale)`` of the paste at ``timestep`` (``-1``: clean)."""
        if self.mode == "clean" or timestep < 0:
            return 1.0, None, 0.0
        ab = self._alpha_bar[timestep]
        noise = draw_normal(like.shape, self.generator, like.device, like.dtype)
        return math.sqrt(ab), noise, math.sqrt(1.0 - ab)

    def paste(self, x: Tensor, timestep: int) -> Tensor:
        """``x`` with the known region replaced by ``known`` at the level of ``timestep`` (-1: clean)."""
        return self._paste("x", x, timestep)

    def _paste(self, name: str, x: Tensor, timestep: int) -> Tensor:
        check_tensor(name, x, floating=True)
        if x.shape != self.known.shape:
            raise InputValueError(
                f"{name}: expected shape {tuple(self.known.shape)} like known, got {tuple(x.shape)}"
            )
        if self.mode == "noised":  # a Python int (the loop's): checking it reads no device
            assert self.schedule is not None
            T = self.schedule.num_train_timesteps
            if (
                isinstance(timestep, bool)
                or not isinstance(timestep, int)
                or not -1 <= timestep < T
            ):
                raise InputValueError(
                    f"timestep: expected an int in [-1, {T - 1}] (-1: clean), got {timestep!r}"
                )
        known, hole, keep = self._on(x)
        scale, noise, noise_scale = self._level(timestep, x)
        impl = fused_backend(self.backend, x, known)
        if impl is not None:  # the noise is a fresh draw of ours: the blend overwrites it
            return kernels.fused_inpaint_blend(
                impl, x, known, keep, scale, noise, noise_scale, into_noise=True
            )
        pasted = known if noise is None else known * scale + noise * noise_scale
        return torch.where(hole, x, pasted, out=out_like(x, pasted))

    def start(self, noise: Tensor, timestep: int | None = None) -> Tensor:
        """A starting sample: ``noise`` in the hole, the known region at the first level.

        For ``"clean"`` the known region is clean; for ``"noised"`` give the first timestep.
        """
        check_tensor("noise", noise, ndim=4, floating=True)
        if self.mode == "noised" and timestep is None:
            raise InputValueError(
                "timestep: expected the plan's first timestep for mode='noised', got None"
            )
        return self._paste("noise", noise, -1 if timestep is None else timestep)

    def __call__(self, info: StepInfo[Tensor]) -> Tensor:
        """The sampler callback: the state after the step, with the known region replaced."""
        return self.paste(info.state, info.next_timestep)
