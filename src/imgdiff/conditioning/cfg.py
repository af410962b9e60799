"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper.

``ClassifierFreeGuidance(model, scale, null)`` is itself a model in imgdiff's contract: called as
``guided(x, t, **cond)`` it runs the network once on the doubled batch ``[x, x]`` with the null
condition for the first half and ``cond`` for the second, and returns
``out_u + scale (out_c - out_u)``. The combination is linear in the model output, so it is the
same guidance for epsilon, x0 and v models. Because it is a deterministic function of
``(x, t, cond)``, EDICT inverts through it exactly when both passes use the same wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_float, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model

__all__ = ["ClassifierFreeGuidance", "rescale_guidance"]


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, Sec. 3.4: ``phi guided std(cond)/std(guided) + (1 - phi) guided``.

    Standard deviations over all non-batch dimensions; shapes ``(B, ...)``.
    """
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided * ratio + (1.0 - phi) * guided


@dataclass(frozen=True, eq=False)
class ClassifierFreeGuidance:
    """Wrap a conditional model into a guided one: ``out_u + scale (out_c - out_u)``.

    Args:
        model: ``model(x, t, **cond)``, trained with condition dropout.
        scale: guidance weight ``w`` (1 = the conditional model, 0 = the unconditional one).
        null: the unconditional keyword arguments, e.g. ``{"context": empty_text_embedding}``.
            Each tensor has batch size 1 (broadcast to the batch) or ``B``. Keyword arguments
            of the call that ``null`` does not name are shared by both halves.
        rescale: Lin et al.'s guidance rescale ``phi`` in ``[0, 1]`` (0 = off).

    Shapes: ``x`` ``(B, ...)``, ``t`` ``(B,)``; the output has the model output's shape.
    """

    model: Model
    scale: float
    null: Mapping[str, Tensor] = field(default_factory=dict)
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise InputTypeError(f"model: expected a callable, got {describe(self.model)}")
        check_float("scale", self.scale)
        check_float("rescale", self.rescale, min=0.0, max=1.0)
        if not isinstance(self.null, Mapping):
            raise InputTypeError(
                f"null: expected a mapping of keyword tensors, got {describe(self.null)}"
            )
        for key, value in self.null.items():
            if not isinstance(value, Tensor) or value.ndim == 0:
                raise InputTypeError(
                    f"null[{key!r}]: expected a tensor with a batch dimension, got {describe(value)}"
                )

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """One batched forward of ``[null, cond]``; returns the guided output ``(B, ...)``."""
        B = x.shape[0]
        missing = set(self.null) - set(cond)
        if missing:
            raise InputValueError(
                f"cond: expected a conditional value for every null key {sorted(self.null)}, "
                f"missing {sorted(missing)}"
            )
        doubled: dict[str, Any] = {}
        for key, value in cond.items():
            if key in self.null:
                doubled[key] = torch.cat([self._null(key, value, B), value], dim=0)
            elif isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == B:
                doubled[key] = torch.cat([value, value], dim=0)
            else:
                doubled[key] = value
        out = self.model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **doubled)
        if not isinstance(out, Tensor) or out.shape[0] != 2 * B:
            raise InputValueError(
                f"model output: expected a tensor with batch {2 * B} (the doubled batch), got {describe(out)}"
            )
        out_u, out_c = out.chunk(2, dim=0)
        guided = out_u + self.scale * (out_c - out_u)
        return rescale_guidance(guided, out_c, self.rescale) if self.rescale > 0 else guided

    def _null(self, key: str, value: object, batch: int) -> Tensor:
        null = self.null[key]
        if not isinstance(value, Tensor):
            raise InputTypeError(
                f"cond[{key!r}]: expected a tensor like null[{key!r}], got {describe(value)}"
            )
        if null.shape[1:] != value.shape[1:] or value.shape[0] != batch:
            expected = (batch, *null.shape[1:])
            raise InputValueError(
                f"cond[{key!r}]: expected shape {expected} to match null[{key!r}] "
                f"{tuple(null.shape)} and the batch, got {tuple(value.shape)}"
            )
        if null.shape[0] == 1:
            return null.to(device=value.device, dtype=value.dtype).expand(batch, *null.shape[1:])
        if null.shape[0] != batch:
            raise InputValueError(
                f"null[{key!r}]: expected batch 1 or {batch}, got shape {tuple(null.shape)}"
            )
        return null.to(device=value.device, dtype=value.dtype)
