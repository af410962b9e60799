"""Plain-torch references of the fused sampler updates (the CPU path and the oracle of the kernels).

Each function computes in float32 at least (float64 stays float64), writes a fresh tensor of
``x``'s dtype, shape and memory format, and never modifies its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imgdiff._ops import per_sample

__all__ = [
    "ddpm_learned_step",
    "edict_mix",
    "edict_substep_mix",
    "edict_unmix",
    "inpaint_blend",
    "lincomb3",
    "threshold_apply",
]


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
    """``(1 - m) x + m (known_scale known + noise_scale noise)``, computed in float32 at least.

    Palette's clean paste (``known_scale = 1``, no noise) and RePaint's noised paste
    (``known_scale = sqrt(ab_s)``, ``noise_scale = sqrt(1 - ab_s)``); ``mask`` (1 = known) has
    ``x``'s shape or ``(B, 1, ...)``. Arithmetic, like the kernels: a NaN or inf on the side the
    mask leaves out still reaches the result (``0 * inf``); ``KnownRegion`` zeroes its hole.
    """
    w = _wide(x)  # at most three passes: scale, add, lerp (x's layout: lerp's first operand)
    pasted = known.to(w.dtype)
    if known_scale != 1.0:
        pasted = pasted * known_scale
    if noise is not None and noise_scale != 0.0:
        pasted = torch.add(pasted, noise.to(w.dtype), alpha=noise_scale)
    return torch.lerp(w, pasted, mask.to(w.dtype)).to(x.dtype)


def edict_mix(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """EDICT's mixing pair (Wallace et al. 2023, Eq. 13): ``x' = p x + (1 - p) y``, then
    ``y' = p y + (1 - p) x'``."""
    xw, yw = _wide(x), _wide(y)
    x_new = p * xw + (1 - p) * yw
    y_new = p * yw + (1 - p) * x_new
    return x_new.to(x.dtype), y_new.to(y.dtype)


def edict_unmix(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`edict_mix` (algorithms spec 4.3): ``y = (y' - (1 - p) x') / p``, then
    ``x = (x' - (1 - p) y) / p``; returns ``(x, y)``."""
    xw, yw = _wide(x), _wide(y)
    y_prev = (yw - (1 - p) * xw) / p
    x_prev = (xw - (1 - p) * y_prev) / p
    return x_prev.to(x.dtype), y_prev.to(y.dtype)


def edict_substep_mix(
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    a: float,
    b: float,
    p: float,
    *,
    update_x: bool,
    c: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The second affine sub-step of an EDICT generation step, then the mixing pair (Wallace et
    al. 2023, Eq. 10-13): the sequence being updated (``x`` when ``update_x``, else ``y``) becomes
    ``a z + b eps + c w`` (``w`` the other sequence), then ``x' = p x + (1 - p) y``,
    ``y' = p y + (1 - p) x'``; the updated value is not rounded to the storage dtype before
    mixing."""
    xw, yw, ew = _wide(x), _wide(y), _wide(eps)
    if update_x:
        xw = a * xw + b * ew + c * yw
    else:
        yw = a * yw + b * ew + c * xw
    x_new = p * xw + (1 - p) * yw
    y_new = p * yw + (1 - p) * x_new
    return x_new.to(x.dtype), y_new.to(y.dtype)


def ddpm_learned_step(
    x: Tensor,
    out: Tensor,
    x_coef: float,
    out_coef: float,
    noise: Tensor | None,
    log_beta: float,
    log_beta_tilde: float,
    noise_mask: float,
    *,
    learned_range: bool = True,
) -> Tensor:
    """A DDPM step with a learned variance (improved DDPM, Nichol & Dhariwal 2021, Eq. 15).

    ``out`` ``(B, 2C, ...)``: mean part ``out[:, :C]``, variance part ``v = out[:, C:]``.
    ``mean = x_coef x + out_coef out[:, :C]``; ``log Sigma = frac log beta + (1 - frac) log
    beta_tilde`` with ``frac = (v + 1) / 2`` (``learned_range``) or ``log Sigma = v``;
    returns ``mean + noise_mask exp(log Sigma / 2) noise``.
    """
    C = x.shape[1]
    mean = _wide(x) * x_coef + _wide(out[:, :C]) * out_coef
    if noise is None or noise_mask == 0.0:
        return mean.to(x.dtype)
    v = _wide(out[:, C:])
    if learned_range:
        frac = (v + 1.0) * 0.5
        log_var = frac * log_beta + (1.0 - frac) * log_beta_tilde
    else:
        log_var = v
    return (mean + noise_mask * torch.exp(0.5 * log_var) * _wide(noise)).to(x.dtype)


def threshold_apply(x0: Tensor, s: Tensor) -> Tensor:
    """``clamp(x0, -s_b, s_b) / s_b`` per sample: the elementwise half of Imagen's dynamic
    thresholding (Saharia et al. 2022, Sec. 2.3); ``s`` ``(B,)`` are the per-sample thresholds."""
    w = _wide(x0)
    t = per_sample(s, w)
    return (torch.clamp(w, -t, t) / t).to(x0.dtype)
