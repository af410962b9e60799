"""Fused updates of the samplers' hot loops: a plain-torch reference and fused kernels each.

Every function takes ``backend``: ``"torch"``, ``"triton"`` (on CUDA tensors of float32,
bfloat16 or float16; on a CPU only under ``TRITON_INTERPRET=1``, which the parity tests use),
``"cpu"`` (the compiled C kernels of :mod:`imgdiff.kernels.cpu`, CPU tensors of float32 or
bfloat16) or ``"auto"``. float64 and tensors of more than 2^31 - 1 elements (the kernels use
int32 offsets) always run the reference. ``"auto"`` picks the C kernels for CPU tensors when
they build, and will pick Triton for CUDA tensors once the compiled kernels have been checked on
a GPU (so far they have run only under Triton's interpreter); until then it picks torch there,
and ``backend="triton"`` opts in. The kernels compute in float32 and read each input once and
write each output once; each equals its reference to float32 rounding (tested).

* :func:`lincomb3`: ``a x + b y + c noise``: the DDIM step (``x_coef``, ``out_coef``, ``sigma``),
  DDPM with a fixed variance, the x0/eps/v conversions; noise injected or drawn in the kernel
  from a seed (Philox).
* :func:`inpaint_blend`: ``(1 - m) x + m (known_scale known + noise_scale noise)``: Palette's
  clean paste and RePaint's noised paste, with a ``(B, 1, ...)`` or full-size mask.
* :func:`edict_mix`: EDICT's mixing pair in one pass; :func:`edict_unmix`: its exact inverse.
* :func:`edict_substep_mix`: EDICT's second affine sub-step and the mixing pair in one pass.
* :func:`threshold_apply`: ``clamp(x0, -s, s) / s`` with per-sample ``s`` (dynamic thresholding;
  the quantile itself is a torch reduction).
* :func:`ddpm_learned_step`: a DDPM step with a learned (or learned-range) variance read from the
  model output's second half, noise included.

The samplers take the same ``backend`` option: DDIM and fixed-variance DDPM steps (noise
included), EDICT's sub-steps and mixing, and :class:`~imgdiff.conditioning.KnownRegion`'s paste
run as one kernel each where the backend resolves to a fused one, and as the lean torch arithmetic of
``imgdiff._ops`` otherwise.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import os
from typing import Literal

import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_float, check_int, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.kernels import cpu, reference

__all__ = [
    "BACKENDS",
    "Backend",
    "Fused",
    "ddpm_learned_step",
    "edict_mix",
    "edict_substep_mix",
    "edict_unmix",
    "fused_backend",
    "fused_edict_mix",
    "fused_edict_substep_mix",
    "fused_edict_unmix",
    "fused_for",
    "fused_inpaint_blend",
    "fused_lincomb3",
    "inpaint_blend",
    "lincomb3",
    "resolve_backend",
    "threshold_apply",
    "use_triton",
]

Backend = Literal["auto", "torch", "triton", "cpu"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton", "cpu")
Fused = Literal["triton", "cpu"]
"""A fused implementation: the Triton kernels (CUDA) or the compiled CPU kernels."""
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


# Whether "auto" picks Triton for CUDA tensors: off until the compiled kernels have been run and
# checked on a GPU (parity tests and benchmarks/kernels.py on CUDA); see docs/kernels.md.
_AUTO_PICKS_TRITON = False


# The oldest Triton the kernels are tested with (CI runs 3.6 and the newest; Triton 3.0's
# interpreter already refuses them).
_MIN_TRITON = (3, 6)


@functools.cache
def _triton_problem() -> str | None:
    """Why the Triton kernels cannot run here (not installed, too old), or ``None``."""
    if importlib.util.find_spec("triton") is None:
        return "needs the triton package (pip install triton)"
    try:
        found = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: trust it
        return None
    if _release(found) < _MIN_TRITON:
        want = ".".join(map(str, _MIN_TRITON))
        return f"needs triton >= {want} (the version its kernels are tested with); found {found}"
    return None


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric components of a version string: ``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


# The Triton kernels index with int32 offsets; larger tensors take the reference path (on every
# backend, so that one rule decides).
_MAX_NUMEL = 2**31 - 1


def fused_backend(backend: Backend, x: Tensor, *others: Tensor | None) -> Fused | None:
    """The fused kernels a validated ``backend`` runs for a sample ``x`` and the update's other
    operands (``None``: absent), or ``None`` for the torch path (fast; for inner loops).

    The torch path is also chosen for empty tensors, for operands of another number of elements
    (a kernel walks each operand over ``x``'s elements: torch broadcasts or raises instead) or
    dtype (torch promotes), and where autograd must see the update.
    """
    n = x.numel()
    if backend == "torch" or n == 0 or n > _MAX_NUMEL:
        return None
    dtype = x.dtype
    for t in others:
        if t is not None and (t.numel() != n or t.dtype is not dtype):  # dtypes are singletons
            return None
    if torch.is_grad_enabled() and (  # no tuple or call on the common path (autograd off)
        x.requires_grad or any(t is not None and t.requires_grad for t in others)
    ):
        return None
    key = (backend, x.is_cuda, x.is_cpu, dtype)  # cheaper than x.device
    try:
        return _RESOLVED[key]
    except KeyError:
        pass
    resolved = _auto(x) if backend == "auto" else resolve_backend(backend, x)
    fused: Fused | None = None if resolved is None or resolved == "torch" else resolved
    _RESOLVED[key] = fused
    return fused


# What fused_backend resolved per (backend, device kind, dtype): the answer depends only on them
# (CUDA, CPU or another device; not the device index) and on facts fixed for the process (triton
# importable, the CPU kernels built); errors are not kept.
_RESOLVED: dict[tuple[str, bool, bool, torch.dtype], Fused | None] = {}


def _auto(x: Tensor) -> Fused | None:
    """What ``"auto"`` picks for ``x`` (size and autograd aside)."""
    if x.is_cuda:
        return (
            "triton"
            if _AUTO_PICKS_TRITON and x.dtype in _FUSED_DTYPES and _triton_problem() is None
            else None
        )
    if x.device.type == "cpu" and x.dtype in cpu.DTYPES and cpu.available():
        return "cpu"
    return None


def fused_for(impl: Fused | None, *others: Tensor | None) -> Fused | None:
    """``impl`` (from :func:`fused_backend`) for an update that also takes ``others`` (``None``:
    absent), or ``None`` (the torch path) where autograd must see it (the kernels are not
    differentiable): for operands that arrive after the backend was chosen, such as a model's
    output within a step."""
    if impl is None or not torch.is_grad_enabled():
        return impl
    return None if any(t is not None and t.requires_grad for t in others) else impl


def use_triton(backend: Backend, x: Tensor) -> bool:
    """Whether a validated ``backend`` runs the Triton kernel for ``x``."""
    return fused_backend(backend, x) == "triton"


def resolve_backend(backend: Backend, x: Tensor) -> Literal["torch", "triton", "cpu"]:
    """The implementation ``backend`` picks for a sample ``x`` (see the module docstring).

    ``"triton"`` and ``"cpu"`` fall back to torch for dtypes their kernels do not take (float64
    always) and raise when they cannot run on ``x``'s device.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch" or x.numel() > _MAX_NUMEL:
        return "torch"
    if backend == "auto":
        return _auto(x) or "torch"
    if backend == "cpu":
        if x.device.type != "cpu":
            raise InputValueError(f"backend: 'cpu' runs on CPU tensors, got a tensor on {x.device}")
        if x.dtype not in cpu.DTYPES:
            return "torch"
        if not cpu.available():
            raise InputValueError(
                f"backend: 'cpu' needs the compiled CPU kernels, which are unavailable: "
                f"{cpu.build_error()}"
            )
        return "cpu"
    if x.dtype not in _FUSED_DTYPES:
        return "torch"
    problem = _triton_problem()
    if problem is not None:
        raise InputValueError(f"backend: 'triton' {problem}")
    if not x.is_cuda and not _interpreting():
        raise InputValueError(
            f"backend: 'triton' runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1; "
            f"got a tensor on {x.device}"
        )
    return "triton"


def fused_lincomb3(
    impl: Fused,
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
    """:func:`lincomb3` on the fused kernels ``impl`` (from :func:`fused_backend`), unchecked: for
    sampling loops whose operands are already validated. ``in_place``: write into ``x`` (a
    tensor the loop owns and no one else uses; see :func:`imgdiff.buffers.exclusive`)."""
    if impl == "cpu":
        z = noise if seed is None else _torch_noise(x, seed)
        if z is not None and z.dtype != x.dtype:  # a seed's float32 draw with a half x:
            return reference.lincomb3(x, a, y, b, z, c)  # the C kernels would round it first
        return cpu.lincomb3(x, a, y, b, z, c, in_place=in_place)
    from imgdiff.kernels import fused

    return fused.lincomb3(x, a, y, b, noise, c, seed, in_place=in_place)


def fused_edict_mix(impl: Fused, x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """:func:`edict_mix` on the fused kernels ``impl``, unchecked (see :func:`fused_lincomb3`)."""
    return _mix_pair(impl, x, y, p, 1.0 - p)


def fused_edict_unmix(impl: Fused, x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """:func:`edict_unmix` on the fused kernels ``impl``, unchecked (see :func:`fused_lincomb3`)."""
    # the mixing pair's form run on (y, x): y first, then x from the unmixed y
    y_prev, x_prev = _mix_pair(impl, y, x, 1.0 / p, -(1.0 - p) / p)
    return x_prev, y_prev


def _mix_pair(
    impl: Fused, u: Tensor, v: Tensor, alpha: float, beta: float
) -> tuple[Tensor, Tensor]:
    """``u' = alpha u + beta v``, ``v' = alpha v + beta u'`` on the fused kernels ``impl``."""
    if impl == "cpu":
        return cpu.mix_pair(u, v, alpha, beta)
    from imgdiff.kernels import fused

    return fused.mix_pair(u, v, alpha, beta)


def fused_edict_substep_mix(
    impl: Fused,
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
    """:func:`edict_substep_mix` on the fused kernels ``impl``, unchecked (``update_x``: whether
    the sub-step moves ``x``; see :func:`fused_lincomb3`). ``in_place``: the mixed value of the
    sequence the sub-step does not move is written into that input (as ``in_place`` there)."""
    if impl == "cpu":
        return cpu.edict_substep_mix(x, y, eps, a, b, p, update_x, c, in_place=in_place)
    from imgdiff.kernels import fused

    return fused.edict_substep_mix(x, y, eps, a, b, p, update_x, c, in_place=in_place)


def fused_inpaint_blend(
    impl: Fused,
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    known_scale: float,
    noise: Tensor | None,
    noise_scale: float,
    seed: int | None = None,
    *,
    into_noise: bool = False,
) -> Tensor:
    """:func:`inpaint_blend` on the fused kernels ``impl``, unchecked (see :func:`fused_lincomb3`);
    ``mask`` floating, of ``x``'s shape or ``(B, 1, ...)``. ``into_noise``: write the result into
    ``noise`` (a fresh draw the caller owns) where its layout and dtype allow."""
    if impl == "cpu":
        z = noise if seed is None else _torch_noise(x, seed)
        if z is not None and z.dtype != x.dtype:  # as fused_lincomb3's
            return reference.inpaint_blend(
                x, known, mask, known_scale=known_scale, noise=z, noise_scale=noise_scale
            )
        return cpu.inpaint_blend(
            x,
            known,
            mask,
            known_scale=known_scale,
            noise=z,
            noise_scale=noise_scale,
            into_noise=into_noise,
        )
    from imgdiff.kernels import fused

    return fused.inpaint_blend(
        x,
        known,
        mask,
        known_scale=known_scale,
        noise=noise,
        noise_scale=noise_scale,
        seed=seed,
        into_noise=into_noise,
    )


def _impl(
    backend: Backend, x: Tensor, *operands: Tensor | None, aside: tuple[Tensor, ...] = ()
) -> Literal["torch", "triton", "cpu"]:
    """The implementation a public function runs: :func:`fused_backend`'s rule for ``x`` and the
    ``operands`` walked over its elements (torch for another element count, another dtype, which
    torch promotes where a kernel would round it to ``x``'s, empty tensors and autograd), and
    autograd alone for ``aside`` (masks, per-sample thresholds, a ``2C`` output)."""
    return fused_for(fused_backend(backend, x, *operands), *aside) or "torch"


def _same(name: str, value: object, x: Tensor) -> Tensor:
    t = check_tensor(name, value, floating=True)
    if t.shape != x.shape:
        raise InputValueError(
            f"{name}: expected shape {tuple(x.shape)} (x's), got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise InputValueError(f"{name}: expected a tensor on {x.device} (x's), got {t.device}")
    return t


def _seed(seed: object, noise: Tensor | None) -> int | None:
    if seed is None:
        return None
    if noise is not None:
        raise InputValueError("seed: give either noise or a seed to draw it from, not both")
    return check_int("seed", seed, min=0, max=2**31 - 1)


def _torch_noise(x: Tensor, seed: int) -> Tensor:
    """The reference path's noise for a seed (its stream differs from the kernel's Philox)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32)


def lincomb3(
    x: Tensor,
    a: float,
    y: Tensor,
    b: float,
    noise: Tensor | None = None,
    c: float = 0.0,
    *,
    seed: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """``a x + b y + c noise``, all ``(B, ...)`` of one shape, as a new tensor of ``x``'s dtype.

    ``noise`` is injected, or drawn from ``seed`` (in the kernel with Triton, from a seeded
    ``torch.Generator`` with the reference: the two streams differ).
    """
    x = check_tensor("x", x, floating=True, min_ndim=1)
    y = _same("y", y, x)
    if noise is not None:
        noise = _same("noise", noise, x)
    a, b, c = check_float("a", a), check_float("b", b), check_float("c", c)
    s = _seed(seed, noise)
    impl = _impl(backend, x, y, noise)
    if impl != "torch":
        return fused_lincomb3(impl, x, a, y, b, noise, c, s)
    if s is not None:
        noise = _torch_noise(x, s)
    return reference.lincomb3(x, a, y, b, noise, c)


def inpaint_blend(
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    *,
    known_scale: float = 1.0,
    noise: Tensor | None = None,
    noise_scale: float = 0.0,
    seed: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """``(1 - m) x + m (known_scale known + noise_scale noise)`` as a new tensor.

    ``x``, ``known``, ``noise``: ``(B, C, ...)``; ``mask``: 1 on the known region, of ``x``'s
    shape or ``(B, 1, ...)`` (values are not checked here: a sampling loop must not read them).
    Arithmetic on every backend: where ``m`` is 0 or 1 the result equals ``x`` or the pasted
    value for finite inputs, and a NaN or inf on the side left out still propagates (``0 * inf``).
    """
    x = check_tensor("x", x, floating=True, min_ndim=2)
    known = _same("known", known, x)
    if noise is not None:
        noise = _same("noise", noise, x)
    mask = check_tensor("mask", mask)
    single = (x.shape[0], 1, *x.shape[2:])
    if mask.shape not in (x.shape, torch.Size(single)):
        raise InputValueError(
            f"mask: expected shape {tuple(x.shape)} or {single}, got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise InputValueError(f"mask: expected a tensor on {x.device} (x's), got {mask.device}")
    if mask.dtype.is_complex:
        raise InputTypeError(f"mask: expected a real or bool tensor, got {describe(mask)}")
    ks = check_float("known_scale", known_scale)
    ns = check_float("noise_scale", noise_scale)
    s = _seed(seed, noise)
    if mask.dtype == torch.bool:
        mask = mask.to(x.dtype)
    impl = _impl(backend, x, known, noise, aside=(mask,))
    if impl != "torch":
        return fused_inpaint_blend(impl, x, known, mask, ks, noise, ns, s)
    if s is not None:
        noise = _torch_noise(x, s)
    return reference.inpaint_blend(x, known, mask, known_scale=ks, noise=noise, noise_scale=ns)


def edict_mix(
    x: Tensor, y: Tensor, p: float, *, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """EDICT's mixing pair ``x' = p x + (1 - p) y``, ``y' = p y + (1 - p) x'`` (Wallace et al.
    2023, Eq. 13): two new ``(B, ...)`` tensors of ``x``'s shape and dtype."""
    x, y, mix = _mix_operands(x, y, p)
    impl = _impl(backend, x, y)
    if impl != "torch":
        return fused_edict_mix(impl, x, y, mix)
    return reference.edict_mix(x, y, mix)


def edict_unmix(
    x: Tensor, y: Tensor, p: float, *, backend: Backend = "auto"
) -> tuple[Tensor, Tensor]:
    """The exact inverse of :func:`edict_mix` (EDICT inversion, algorithms spec 4.3): from the
    mixed pair, ``y = (y' - (1 - p) x') / p``, then ``x = (x' - (1 - p) y) / p``. Returns
    ``(x, y)``: two new ``(B, ...)`` tensors of ``x``'s shape and dtype."""
    x, y, mix = _mix_operands(x, y, p)
    impl = _impl(backend, x, y)
    if impl != "torch":
        return fused_edict_unmix(impl, x, y, mix)
    return reference.edict_unmix(x, y, mix)


def _mix_operands(x: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor, float]:
    """The checked operands of :func:`edict_mix` and :func:`edict_unmix`."""
    x = check_tensor("x", x, floating=True, min_ndim=1)
    y = _same("y", y, x)
    if y.dtype != x.dtype:
        raise InputTypeError(f"y: expected x's dtype {x.dtype}, got {y.dtype}")
    return x, y, check_float("p", p, min=0.0, max=1.0, min_open=True)


def edict_substep_mix(
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    a: float,
    b: float,
    p: float,
    *,
    update: Literal["x", "y"],
    c: float = 0.0,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """The second half of an EDICT generation step in one pass (Wallace et al. 2023, Eq. 10-13).

    The sequence named by ``update`` (``"x"`` or ``"y"``) takes its affine sub-step
    ``z -> a z + b eps + c w``, ``w`` the *other* sequence (``eps`` is the model's output at
    ``w``; ``c`` is 0 for an epsilon model, and a model whose noise estimate is
    ``eps_from_x w + eps_from_out out`` passes ``b eps_from_out`` and ``b eps_from_x`` as ``b``
    and ``c``), then the mixing pair ``x' = p x + (1 - p) y``, ``y' = p y + (1 - p) x'``. ``x``,
    ``y``, ``eps``: ``(B, ...)`` of one shape, device and dtype; returns two new tensors like
    ``x``. Equals :func:`lincomb3` then :func:`edict_mix` except that the sub-step's result is not
    rounded to the storage dtype before mixing.
    """
    x = check_tensor("x", x, floating=True, min_ndim=1)
    y = _same("y", y, x)
    e = _same("eps", eps, x)
    for name, t in (("y", y), ("eps", e)):
        if t.dtype != x.dtype:
            raise InputTypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
    fa, fb, fc = check_float("a", a), check_float("b", b), check_float("c", c)
    mix = check_float("p", p, min=0.0, max=1.0, min_open=True)
    update_x = check_choice("update", update, ("x", "y")) == "x"
    impl = _impl(backend, x, y, e)
    if impl != "torch":
        return fused_edict_substep_mix(impl, x, y, e, fa, fb, mix, update_x, fc)
    return reference.edict_substep_mix(x, y, e, fa, fb, mix, update_x=update_x, c=fc)


def ddpm_learned_step(
    x: Tensor,
    out: Tensor,
    x_coef: float,
    out_coef: float,
    noise: Tensor | None,
    *,
    log_beta: float,
    log_beta_tilde: float,
    noise_mask: float = 1.0,
    learned_range: bool = True,
    backend: Backend = "auto",
) -> Tensor:
    """DDPM step ``x_coef x + out_coef out[:, :C] + noise_mask exp(log Sigma / 2) noise``.

    ``x`` ``(B, C, ...)``, ``out`` ``(B, 2C, ...)`` (mean part, then the variance part ``v``),
    ``noise`` of ``x``'s shape (``None``: the mean only). ``log Sigma`` is improved DDPM's
    ``frac log_beta + (1 - frac) log_beta_tilde``, ``frac = (v + 1) / 2`` (``learned_range``), or
    ``v`` itself.
    """
    x = check_tensor("x", x, floating=True, min_ndim=2)
    out = check_tensor("out", out, floating=True)
    expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
    if tuple(out.shape) != expected:
        raise InputValueError(
            f"out: expected shape {expected} (2C channels), got {tuple(out.shape)}"
        )
    if noise is not None:
        noise = _same("noise", noise, x)
    a, b = check_float("x_coef", x_coef), check_float("out_coef", out_coef)
    lb, lbt = check_float("log_beta", log_beta), check_float("log_beta_tilde", log_beta_tilde)
    nm = check_float("noise_mask", noise_mask)
    # out has twice x's elements (the kernel's offsets into it are int32): checked here
    fusable = out.numel() <= _MAX_NUMEL and out.dtype == x.dtype
    if fusable and _impl(backend, x, noise, aside=(out,)) == "triton":
        from imgdiff.kernels import fused

        return fused.ddpm_learned_step(
            x, out, a, b, noise, lb, lbt, nm, learned_range=learned_range
        )
    return reference.ddpm_learned_step(
        x, out, a, b, noise, lb, lbt, nm, learned_range=learned_range
    )


def threshold_apply(x0: Tensor, s: Tensor, *, backend: Backend = "auto") -> Tensor:
    """``clamp(x0, -s_b, s_b) / s_b`` for ``x0`` ``(B, ...)`` and per-sample thresholds ``s`` ``(B,)`` > 0."""
    x0 = check_tensor("x0", x0, floating=True, min_ndim=1)
    s = check_tensor("s", s, ndim=1, floating=True)
    if s.shape[0] != x0.shape[0]:
        raise InputValueError(
            f"s: expected one threshold per sample ({x0.shape[0]}), got shape {tuple(s.shape)}"
        )
    if s.device != x0.device:
        raise InputValueError(f"s: expected a tensor on {x0.device} (x0's), got {s.device}")
    if _impl(backend, x0, aside=(s,)) == "triton":
        from imgdiff.kernels import fused

        return fused.threshold_apply(x0, s)
    return reference.threshold_apply(x0, s)
