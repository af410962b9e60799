"""Processing of the predicted clean sample ``x0_hat``: static clipping and dynamic thresholding.

Both make a sampling step non-invertible, so inversion and EDICT refuse them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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
    ``max_value > 1`` (e.g. 1.5). The quantile is computed in float32 (or float64) by torch; the
    clamp and scale run as one Triton kernel where ``backend`` resolves to it (see
    :mod:`imgdiff.kernels`; ``"cpu"`` has no kernel for it and uses torch).
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
        s = torch.quantile(work.abs(), self.ratio, dim=1).clamp(1.0, self.max_value)
        if use_triton(self.backend, x0):  # the clamp and scale in one pass (Triton)
            return kernels.threshold_apply(x0, s, backend="triton")
        return reference.threshold_apply(x0, s)
