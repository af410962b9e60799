"""Processing of the predicted clean sample ``x0_hat``: static clipping and dynamic thresholding.

Both make a sampling step non-invertible, so inversion and EDICT refuse them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from imgdiff import kernels
from imgdiff._checks import check_choice, check_float
from imgdiff.kernels import BACKENDS, Backend, reference, use_triton

__all__ = ["Clip", "DynamicThreshold", "Thresholding"]


@dataclass(frozen=True)
class Thresholding(ABC):
    """Base class: a deterministic map applied to ``x0_hat`` each step. Subclass it for your own."""

    @abstractmethod
    def __call__(self, x0: Tensor) -> Tensor:
        """The processed ``x0_hat``: same shape ``(B, ...)`` and dtype; must not modify ``x0``."""


@dataclass(frozen=True)
class Clip(Thresholding):
    """Static clipping ``x0_hat <- clamp(x0_hat, -limit, limit)`` (diffusers ``clip_sample``)."""

    limit: float = 1.0

    def __post_init__(self) -> None:
        check_float("limit", self.limit, min=0.0, min_open=True)

    def __call__(self, x0: Tensor) -> Tensor:
        """``clamp(x0, -limit, limit)``, shape ``(B, ...)``."""
        return x0.clamp(-self.limit, self.limit)


@dataclass(frozen=True)
class DynamicThreshold(Thresholding):
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), per sample.

    ``s = quantile(|x0_hat|, ratio)`` over all non-batch elements, ``s <- clamp(s, 1, max_value)``,
    ``x0_hat <- clamp(x0_hat, -s, s) / s``. With the default ``max_value = 1`` it equals
    :class:`Clip` (as in diffusers); pixel-space models that want Imagen's behaviour need
    ``max_value > 1`` (e.g. 1.5). The quantile is computed in float32 (or float64) by a torch
    sort, with ``torch.quantile``'s values and no host read; the clamp and scale run as one
    Triton kernel where ``backend`` resolves to it (see :mod:`imgdiff.kernels`; ``"cpu"`` has no
    kernel for it and uses torch).
    """

    ratio: float = 0.995
    max_value: float = 1.0
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        check_float("ratio", self.ratio, min=0.0, max=1.0)
        check_float("max_value", self.max_value, min=1.0)
        check_choice("backend", self.backend, BACKENDS)

    def __call__(self, x0: Tensor) -> Tensor:
        """Per-sample dynamic thresholding of ``x0`` ``(B, ...)``."""
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = _row_quantile(work.abs(), self.ratio).clamp(1.0, self.max_value)
        if use_triton(self.backend, x0):  # the clamp and scale in one pass (Triton)
            return kernels.threshold_apply(x0, s, backend="triton")
        return reference.threshold_apply(x0, s)


def _row_quantile(v: Tensor, q: float) -> Tensor:
    """``torch.quantile(v, q, dim=1)`` (linear interpolation) of a float32/float64 ``(B, n)``
    tensor, ``-> (B,)``, with no host read: one sort, two column reads and a lerp.

    The same values as ``torch.quantile`` (the rank ``q (n - 1)`` is formed as torch 2.15 forms
    it; earlier versions form the interpolation weight in float32, so a float32 result may
    differ from theirs in its last bits), and a row with a NaN (sorted last) gives NaN. torch
    2.11 and earlier check ``q`` on the host in every ``quantile`` call: a device sync in each
    sampling step, which also breaks CUDA-graph capture.
    """
    n = v.shape[1]
    # torch rounds q to v's dtype, then forms the rank and its weight in float64
    rank = float(np.float32(q) if v.dtype == torch.float32 else q) * (n - 1)
    below = math.floor(rank)
    ordered = v.sort(dim=1).values
    value = torch.lerp(ordered[:, below], ordered[:, min(below + 1, n - 1)], rank - below)
    return torch.where(ordered[:, -1].isnan(), ordered[:, -1], value)
