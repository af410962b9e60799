"""Plain-torch references of the fused sampler updates (the CPU path and the oracle of the kernels).

Each function computes in float32 at least (float64 stays float64), writes a fresh tensor of
``x``'s dtype, shape and memory format, and never modifies its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["edict_mix", "inpaint_blend", "lincomb3"]


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def lincomb3(
    x: Tensor, a: float, y: Tensor, b: float, noise: Tensor | None = None, c: float = 0.0
) -> Tensor:
    """``a x + b y + c noise`` ``(same shape)``: the DDIM step (``x_coef``, ``out_coef``,
    ``sigma``), DDPM with a fixed variance, and the x0/eps/v conversions (spec 2.2, 3.1)."""
    acc = _wide(x) * a + _wide(y) * b
    if noise is not None and c != 0.0:
        acc = acc + _wide(noise) * c
    return acc.to(x.dtype)


def inpaint_blend(
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    *,
    known_scale: float = 1.0,
    noise: Tensor | None = None,
    noise_scale: float = 0.0,
) -> Tensor:
    """``(1 - m) x + m (known_scale known + noise_scale noise)``.

    Palette's clean paste (``known_scale = 1``, no noise) and RePaint's noised paste
    (``known_scale = sqrt(ab_s)``, ``noise_scale = sqrt(1 - ab_s)``); ``mask`` (1 = known) has
    ``x``'s shape or ``(B, 1, ...)``.
    """
    m = _wide(mask)
    pasted = _wide(known) * known_scale
    if noise is not None and noise_scale != 0.0:
        pasted = pasted + _wide(noise) * noise_scale
    return (_wide(x) * (1 - m) + pasted * m).to(x.dtype)


def edict_mix(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """EDICT's mixing pair (Wallace et al. 2023, Eq. 13): ``x' = p x + (1 - p) y``, then
    ``y' = p y + (1 - p) x'``."""
    xw, yw = _wide(x), _wide(y)
    x_new = p * xw + (1 - p) * yw
    y_new = p * yw + (1 - p) * x_new
    return x_new.to(x.dtype), y_new.to(y.dtype)
