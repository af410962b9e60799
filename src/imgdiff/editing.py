"""Editing recipes built from samplers and conditioning adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_float, describe
from imgdiff.conditioning.cfg import ClassifierFreeGuidance
from imgdiff.errors import InputTypeError
from imgdiff.models import Model
from imgdiff.samplers.edict import EDICT
from imgdiff.samplers.step import Callback

__all__ = ["edict_edit"]


def edict_edit(
    sampler: EDICT,
    model: Model,
    x0: Tensor,
    *,
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    null: Mapping[str, Tensor],
    guidance_scale: float = 3.0,
    guidance_rescale: float = 0.0,
    num_steps: int = 50,
    strength: float = 0.8,
    model_dtype: torch.dtype | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> Tensor:
    """EDICT image editing as in the paper (Sec. 4): invert with the source condition, generate
    with the target one, both through the same classifier-free guidance at the same scale.

    Args:
        sampler: the :class:`~imgdiff.EDICT` sampler (paper: scaled-linear schedule,
            ``steps_offset=1``, ``final_alpha_bar="first"``, ``mix=0.93``).
        model: the conditional network, ``model(x, t, **cond)``.
        x0: ``(B, ...)`` the image or latent to edit.
        source / target: keyword conditions describing ``x0`` and the edit (e.g.
            ``{"context": embed("a dog")}`` / ``{"context": embed("a cat")}``).
        null: the unconditional keyword conditions (e.g. the empty prompt's embedding).
        guidance_scale: ``w`` of :class:`~imgdiff.ClassifierFreeGuidance` in both passes (paper: 3).
        guidance_rescale: Lin et al.'s ``phi`` (0 = off), also in both passes.
        num_steps / strength: the plan of both passes (paper: 50 steps, strength 0.8).
        model_dtype: the network's input dtype when it cannot be read from its parameters.
        callback: called after every step of both passes (:class:`~imgdiff.StepInfo`).

    Returns the edited ``(B, ...)`` in the sampler's state dtype. With ``target == source`` it
    returns ``x0`` to float64 rounding (exact inversion).
    """
    if not isinstance(sampler, EDICT):
        raise InputTypeError(f"sampler: expected an imgdiff.EDICT, got {describe(sampler)}")
    scale = check_float("guidance_scale", guidance_scale)
    rescale = check_float("guidance_rescale", guidance_rescale, min=0.0, max=1.0)
    guided = ClassifierFreeGuidance(model, scale, null, rescale=rescale)
    for name, cond in (("source", source), ("target", target)):
        if not isinstance(cond, Mapping):
            raise InputTypeError(
                f"{name}: expected a mapping of keyword conditions, got {describe(cond)}"
            )
        guided.check_conditions(name, cond)
    pair = sampler.invert(
        guided,
        x0,
        num_steps=num_steps,
        strength=strength,
        model_kwargs=source,
        model_dtype=model_dtype,
        callback=callback,
        progress=progress,
    )
    return sampler.sample(
        guided,
        pair,
        num_steps=num_steps,
        strength=strength,
        model_kwargs=target,
        model_dtype=model_dtype,
        callback=callback,
        progress=progress,
    )
