"""Triton kernels of the sampler updates: one launch, one read of each input, one write.

Imported only when a fused kernel is asked for (``import imgdiff`` never loads Triton). The
kernels walk the tensors' memory linearly, so every full-size operand must share ``x``'s layout
(both contiguous, or both channels-last); others are made contiguous first. Arithmetic is
float32 whatever the storage dtype (float32, bfloat16, float16); coefficients are float32
scalars. On a CPU they run only under Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the parity tests run them without a GPU.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from imgdiff.kernels._layout import aligned, aligned_to, mask_operand, substep_mix_outputs

__all__ = [
    "ddpm_learned_step",
    "edict_substep_mix",
    "inpaint_blend",
    "lincomb3",
    "mix_pair",
    "threshold_apply",
]

BLOCK = 1024


@triton.jit
def _lincomb3_kernel(
    x_ptr,
    y_ptr,
    n_ptr,
    out_ptr,
    numel,
    a,
    b,
    c,
    seed,
    HAS_NOISE: tl.constexpr,
    RANDOM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    acc = a * tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    acc += b * tl.load(y_ptr + offs, mask=inside).to(tl.float32)
    if HAS_NOISE:
        acc += c * tl.load(n_ptr + offs, mask=inside).to(tl.float32)
    if RANDOM:
        acc += c * tl.randn(seed, offs)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _inpaint_kernel(
    x_ptr,
    k_ptr,
    m_ptr,
    n_ptr,
    out_ptr,
    numel,
    channels,
    plane,
    known_scale,
    noise_scale,
    seed,
    MASK_MODE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    RANDOM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    if MASK_MODE == 0:  # the mask has x's shape and layout (the MASK_* modes of _layout)
        m_offs = offs
    elif MASK_MODE == 1:  # (B, 1, *spatial) against contiguous (B, C, *spatial)
        m_offs = (offs // (channels * plane)) * plane + offs % plane
    else:  # (B, 1, *spatial) against channels-last (B, *spatial, C) memory
        m_offs = offs // channels
    m = tl.load(m_ptr + m_offs, mask=inside).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    pasted = known_scale * tl.load(k_ptr + offs, mask=inside).to(tl.float32)
    if HAS_NOISE:
        pasted += noise_scale * tl.load(n_ptr + offs, mask=inside).to(tl.float32)
    if RANDOM:
        pasted += noise_scale * tl.randn(seed, offs)
    out = x * (1.0 - m) + pasted * m
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix(u, v, alpha, beta):
    # u' = alpha u + beta v, v' = alpha v + beta u': the mixing pair (alpha = p) or its inverse
    u_new = alpha * u + beta * v
    return u_new, alpha * v + beta * u_new


@triton.jit
def _edict_mix_kernel(u_ptr, v_ptr, uo_ptr, vo_ptr, numel, alpha, beta, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    u = tl.load(u_ptr + offs, mask=inside).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inside).to(tl.float32)
    u_new, v_new = _mix(u, v, alpha, beta)
    tl.store(uo_ptr + offs, u_new.to(uo_ptr.dtype.element_ty), mask=inside)
    tl.store(vo_ptr + offs, v_new.to(vo_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _edict_substep_mix_kernel(
    x_ptr,
    y_ptr,
    e_ptr,
    xo_ptr,
    yo_ptr,
    numel,
    a,
    b,
    c,
    p,
    UPDATE_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=inside).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=inside).to(tl.float32)
    if UPDATE_X:
        x = a * x + b * e + c * y
    else:
        y = a * y + b * e + c * x
    x_new, y_new = _mix(x, y, p, 1.0 - p)
    tl.store(xo_ptr + offs, x_new.to(xo_ptr.dtype.element_ty), mask=inside)
    tl.store(yo_ptr + offs, y_new.to(yo_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _ddpm_learned_kernel(
    x_ptr,
    out_ptr,
    n_ptr,
    y_ptr,
    numel,
    per_sample,
    x_coef,
    out_coef,
    log_beta,
    log_beta_tilde,
    noise_mask,
    HAS_NOISE: tl.constexpr,
    LEARNED_RANGE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    # x is (B, C*S) contiguous, out is (B, 2*C*S): mean at b*2CS + r, variance CS further on
    mean_offs = (offs // per_sample) * (2 * per_sample) + offs % per_sample
    acc = x_coef * tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    acc += out_coef * tl.load(out_ptr + mean_offs, mask=inside).to(tl.float32)
    if HAS_NOISE:
        v = tl.load(out_ptr + mean_offs + per_sample, mask=inside).to(tl.float32)
        if LEARNED_RANGE:
            frac = (v + 1.0) * 0.5
            log_var = frac * log_beta + (1.0 - frac) * log_beta_tilde
        else:
            log_var = v
        noise = tl.load(n_ptr + offs, mask=inside).to(tl.float32)
        acc += noise_mask * tl.exp(0.5 * log_var) * noise
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _threshold_kernel(x_ptr, s_ptr, y_ptr, numel, per_sample, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    t = tl.load(s_ptr + offs // per_sample, mask=inside, other=1.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    y = tl.minimum(tl.maximum(x, -t), t) / t
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


_NO_GUARD = contextlib.nullcontext()


def _on(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: for a tensor on another GPU (``cuda:1`` while
    ``cuda:0`` is current) that device is made current for the launch."""
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.get_device())
    return _NO_GUARD


# FMA contraction is asked for explicitly: Triton's default until 3.9, changing in 3.10, warns
# when it is left unset. One rounding per multiply-add, within the parity tolerance.
_OPTIONS: dict[str, object] = {"enable_fp_fusion": True}


def _launch(kernel: Any, x: Tensor, *args: object, **meta: object) -> None:
    """``kernel(x, *args)`` over ``x.numel()`` elements in blocks of ``BLOCK``, on ``x``'s device.

    Launch options: :data:`_OPTIONS`.
    """
    with _on(x):
        kernel[_grid(x.numel())](x, *args, BLOCK=BLOCK, **_OPTIONS, **meta)


def lincomb3(
    x: Tensor,
    a: float,
    y: Tensor,
    b: float,
    noise: Tensor | None = None,
    c: float = 0.0,
    seed: int | None = None,
    *,
    in_place: bool = False,
) -> Tensor:
    """Fused ``a x + b y + c noise``; with ``seed`` the noise is drawn in the kernel (Philox);
    with ``in_place`` into ``x`` itself (where ``x`` is dense)."""
    fmt, x, (y,) = aligned(x, y)
    if c == 0.0 and seed is None:
        noise = None  # as the reference: c = 0 reads no noise (nor its infs)
    n = x if noise is None else aligned_to(noise, x, fmt)
    out = x if in_place else torch.empty_like(x)
    _launch(
        _lincomb3_kernel,
        x,
        y,
        n,
        out,
        x.numel(),
        float(a),
        float(b),
        float(c),
        0 if seed is None else int(seed),
        HAS_NOISE=noise is not None,
        RANDOM=seed is not None,
    )
    return out


def inpaint_blend(
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    *,
    known_scale: float = 1.0,
    noise: Tensor | None = None,
    noise_scale: float = 0.0,
    seed: int | None = None,
    into_noise: bool = False,
) -> Tensor:
    """Fused ``(1 - m) x + m (known_scale known + noise_scale noise)``; with ``into_noise`` into
    ``noise``'s memory where it is laid out as ``x``, in ``x``'s dtype."""
    fmt, x, (known,) = aligned(x, known)
    n = x if noise is None else aligned_to(noise, x, fmt)
    C = x.shape[1]
    plane = math.prod(x.shape[2:])
    m, mode = mask_operand(mask, x, fmt)
    reuse = into_noise and noise is not None and n.dtype == x.dtype
    out = n if reuse else torch.empty_like(x)
    _launch(
        _inpaint_kernel,
        x,
        known,
        m,
        n,
        out,
        x.numel(),
        C,
        plane,
        float(known_scale),
        float(noise_scale),
        0 if seed is None else int(seed),
        MASK_MODE=mode,
        HAS_NOISE=noise is not None and float(noise_scale) != 0.0,  # as the reference: skip it
        RANDOM=seed is not None,
    )
    return out


def mix_pair(u: Tensor, v: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """Fused EDICT mixing pair in its general form, ``u' = alpha u + beta v``,
    ``v' = alpha v + beta u'`` for ``u``, ``v`` ``(B, ...)``: both outputs in one pass."""
    _, u, (v,) = aligned(u, v, cast=True)
    u_out, v_out = torch.empty_like(u), torch.empty_like(u)
    _launch(
        _edict_mix_kernel,
        u,
        v,
        u_out,
        v_out,
        u.numel(),
        float(alpha),
        float(beta),
    )
    return u_out, v_out


def edict_substep_mix(
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    a: float,
    b: float,
    p: float,
    update_x: bool,
    c: float = 0.0,
    *,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fused EDICT second sub-step and mixing pair: both outputs in one pass (with ``in_place``
    the sequence not moved by the sub-step is overwritten; see :func:`imgdiff.kernels.cpu`'s)."""
    _, x, (y, eps) = aligned(x, y, eps, cast=True)
    x_out, y_out = substep_mix_outputs(x, y, update_x, in_place, torch.empty_like)
    _launch(
        _edict_substep_mix_kernel,
        x,
        y,
        eps,
        x_out,
        y_out,
        x.numel(),
        float(a),
        float(b),
        float(c),
        float(p),
        UPDATE_X=bool(update_x),
    )
    return x_out, y_out


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
    """Fused DDPM step with a learned variance (contiguous layout; others are copied)."""
    x = x.contiguous()
    out = out.contiguous()
    has_noise = noise is not None and noise_mask != 0.0
    n = noise.contiguous() if noise is not None and has_noise else x
    y = torch.empty_like(x)
    _launch(
        _ddpm_learned_kernel,
        x,
        out,
        n,
        y,
        x.numel(),
        x.numel() // x.shape[0],
        float(x_coef),
        float(out_coef),
        float(log_beta),
        float(log_beta_tilde),
        float(noise_mask),
        HAS_NOISE=has_noise,
        LEARNED_RANGE=learned_range,
    )
    return y


def threshold_apply(x0: Tensor, s: Tensor) -> Tensor:
    """Fused per-sample ``clamp(x0, -s, s) / s`` (contiguous layout; others are copied)."""
    x0 = x0.contiguous()
    s = s.float().contiguous()
    y = torch.empty_like(x0)
    _launch(
        _threshold_kernel,
        x0,
        s,
        y,
        x0.numel(),
        max(1, x0.numel() // max(1, x0.shape[0])),
    )
    return y
