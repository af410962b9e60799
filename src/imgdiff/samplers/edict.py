"""EDICT: exact diffusion inversion via coupled transformations (Wallace, Gokul & Naik, CVPR 2023).

Two sequences ``x`` and ``y`` take turns: each sub-step moves one of them by the DDIM (eta = 0)
map ``z -> a z + b eps(other, t)`` whose shift depends only on the *other* sequence, and a mixing
layer couples them (Sec. 3, eq. 8-11). Every piece is invertible in closed form, so inversion is
exact for any deterministic model, classifier-free guidance included, as long as both passes
use the same model function. The inverse processes steps in reverse generation order and takes
the update order from the *generation* index, so it is exact for odd step counts too (the
diffusers community pipeline is not; algorithms spec 4.3).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from imgdiff import kernels
from imgdiff._checks import check_float, check_same_shape, check_tensor, describe
from imgdiff._ops import Scalar, fusable, lincomb
from imgdiff._warnings import warn_user
from imgdiff.buffers import exclusive, out_like
from imgdiff.errors import InputTypeError, InputValueError, PrecisionWarning
from imgdiff.kernels import Fused, fused_backend, fused_for
from imgdiff.models import BoundModel, Model, check_model_output
from imgdiff.randomness import Generators
from imgdiff.samplers.base import Sampler
from imgdiff.samplers.denoising import DenoiserCoefficients
from imgdiff.samplers.graphs import CUDAGraphSampling
from imgdiff.samplers.step import Callback, StepContext, StepNoise, StepOutput
from imgdiff.timesteps import SamplingPlan

__all__ = ["EDICT", "EDICTCoefficients", "EDICTState", "edict_mix", "edict_unmix"]

OutT = TypeVar("OutT")

EDICTState = tuple[Tensor, Tensor]
"""The coupled pair ``(x, y)``, each ``(B, ...)``."""


@dataclass(frozen=True, eq=False)
class EDICTCoefficients(DenoiserCoefficients):
    """Per-step coefficients of EDICT's step from ``t`` to ``s`` (algorithms spec 4.1).

    ``a = sqrt(ab_s / ab_t)`` and ``b = sqrt(1 - ab_s) - a sqrt(1 - ab_t)``, so the DDIM (eta = 0)
    step is ``z_s = a z_t + b eps(z_t, t)``. ``x_first`` is 1 when the generation step updates
    ``x`` before ``y`` (even generation index, or leapfrog off), else 0.
    """

    a: Scalar
    b: Scalar
    x_first: Scalar


@dataclass(frozen=True, kw_only=True)
class EDICT(Sampler[EDICTState, EDICTCoefficients]):
    """EDICT sampling and exact inversion on imgdiff's sampler contract.

    Args (besides :class:`~imgdiff.samplers.Sampler`'s, all keyword-only):
        mix: the mixing weight ``p`` in ``(0, 1]`` (paper: 0.93). Inversion amplifies the
            ``x - y`` difference by ``1/p^2`` per step (the mixing matrix's eigenvalues are 1 and
            ``p^2``); a warning is given below 0.9.
        leapfrog: alternate which sequence is updated first on odd steps (paper default).
        thresholding: must be ``None``; clipping ``x0_hat`` breaks exactness.
        dtype: state dtype, float64 by default; the model runs in its own dtype. Lower precision
            works but inversion is then exact only to ~1e-5 (a :class:`PrecisionWarning` says so).

    ``invert(model, x0)`` returns the pair ``(x_T, y_T)``; ``sample(model, pair)`` returns
    ``x_0`` (``sample_pair`` returns both). With the same model function, arguments and
    ``strength``, ``sample(invert(x0)) == x0`` to float64 rounding.
    """

    dtype: torch.dtype | None = torch.float64
    mix: float = 0.93
    leapfrog: bool = True
    thresholding: None = None

    steps_from_pure_noise: ClassVar[bool] = False  # z -> a z + b eps needs alpha_bar > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("mix", self.mix, min=0.0, max=1.0, min_open=True)
        if not isinstance(self.leapfrog, bool):
            raise InputTypeError(f"leapfrog: expected a bool, got {describe(self.leapfrog)}")
        if self.thresholding is not None:
            raise InputValueError(
                f"thresholding: expected None for EDICT, got {self.thresholding!r}; clipping or "
                "thresholding x0_hat makes the coupled steps non-invertible"
            )
        if self.mix < 0.9:
            warn_user(
                f"EDICT mix={self.mix}: inversion amplifies the x - y difference by 1/mix^2 = "
                f"{1 / self.mix**2:.2f}x per step (spec 4.5: p = 0.8 gave a latent of std 3e5 after "
                "50 steps); keep mix >= 0.9",
                PrecisionWarning,
            )
        if self.dtype is not None:
            _warn_precision(self.dtype)

    # ------------------------------------------------------------------ coefficients

    def coefficients(self, plan: SamplingPlan) -> EDICTCoefficients:
        return self._table(plan, torch.arange(len(plan)))

    def _table(self, plan: SamplingPlan, generation_index: Tensor) -> EDICTCoefficients:
        """Coefficients for transitions ``t -> s`` given each row's generation index."""
        ab, ab_s = plan.alpha_bar, plan.alpha_bar_next
        if bool((ab == 0).any()):
            t = sorted({int(v) for v in plan.timesteps[ab == 0].tolist()})
            raise InputValueError(
                f"timesteps: EDICT's step z -> a z + b eps needs alpha_bar > 0 at the noisy end, got "
                f"alpha_bar = 0 at timesteps {t} (zero terminal SNR); leave that timestep out (e.g. "
                "leading spacing, or an explicit list without it)"
            )
        a = torch.sqrt(ab_s / ab)
        x_first = (generation_index % 2 == 0) | (not self.leapfrog)
        return EDICTCoefficients(
            **self.prediction_fields(plan),
            a=a,
            b=torch.sqrt(1.0 - ab_s) - a * torch.sqrt(1.0 - ab),
            x_first=x_first.to(torch.float64),
        )

    # ------------------------------------------------------------------ state

    def init_state(self, x: Tensor) -> EDICTState:
        return (x, x)

    def final_sample(self, state: EDICTState) -> Tensor:
        return state[0]

    # ------------------------------------------------------------------ the coupled step

    def step(
        self,
        model: BoundModel,
        state: EDICTState,
        coeffs: EDICTCoefficients,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[EDICTState]:
        """Generation step (paper eq. 10-11): two affine sub-steps, then mixing."""
        c, p, t = coeffs, self.mix, ctx.t
        x, y = state
        _check_pair(x, y)
        impl = fused_backend(self.backend, x, y)  # once per step: x, y share device and dtype
        a, b = c.a, c.b
        x_first = bool(c.x_first)
        first, other = (x, y) if x_first else (y, x)
        k = None if impl is None else _folded(c, a, b)
        # the sequence updated first (sub-step 1), then the other one (sub-step 2) and the mixing
        out1 = _model_output(model, other, t)
        first1 = _substep(impl, k, c, first, a, b, other, out1)
        out = _model_output(model, _lent(first1, k), t)
        impl = fused_for(impl, first1, out)  # autograd must see what needs it
        if impl is not None and k is not None:
            # sub-step 2 fused with the mixing layer: one pass, into first1's memory where the
            # model kept nothing of it
            u, v = (first1, y) if x_first else (x, first1)
            mixed = kernels.fused_edict_substep_mix(
                impl, u, v, out, k[0], k[1], p, not x_first, k[2], in_place=exclusive(first1)
            )
        else:
            other1 = lincomb(other, a, c.eps_hat(first1, out), b)
            mixed = edict_mix(first1, other1, p) if x_first else edict_mix(other1, first1, p)
        return StepOutput(mixed, lambda: c.raw_x0_hat(other, out1))

    # ------------------------------------------------------------------ the exact inverse

    def inverse_coefficients(self, plan: SamplingPlan) -> EDICTCoefficients:
        """Coefficients for ``plan.reversed()`` rows: row ``k`` undoes generation step ``L-1-k``."""
        L = len(plan)
        return self._table(plan, L - 1 - torch.arange(L))

    def inverse_step(
        self,
        model: BoundModel,
        state: EDICTState,
        coeffs: EDICTCoefficients,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[EDICTState]:
        """Inverse step (paper eq. 12-14): unmix, then undo the sub-steps in reverse order."""
        c, p, t = coeffs, self.mix, ctx.t
        x2, y2 = state
        _check_pair(x2, y2)
        impl = fused_backend(self.backend, x2, y2)
        x1, y1 = (
            edict_unmix(x2, y2, p) if impl is None else kernels.fused_edict_unmix(impl, x2, y2, p)
        )
        # generation moved `first` then `other`: undo `other` first, z = (z' - b eps(w)) / a
        first1, other1 = (x1, y1) if c.x_first else (y1, x1)
        inv_a = 1.0 / c.a
        minus_b = -c.b * inv_a
        k = None if impl is None else _folded(c, inv_a, minus_b)
        out1 = _model_output(model, _lent(first1, k), t)
        # both sub-steps write into the unmixed tensors, where no one else holds them
        other0 = _substep(impl, k, c, other1, inv_a, minus_b, first1, out1, own=True)
        out = _model_output(model, other0, t)
        first0 = _substep(impl, k, c, first1, inv_a, minus_b, other0, out, own=True)
        state1 = (first0, other0) if c.x_first else (other0, first0)
        # the second call's input is at level t, where the coefficients convert
        return StepOutput(state1, lambda: c.raw_x0_hat(other0, out))

    # ------------------------------------------------------------------ public entry points

    def sample(
        self,
        model: Model,
        noise: Tensor | EDICTState,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        generator: Generators = None,
        step_noise: StepNoise | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> Tensor:
        """Generate from ``noise`` ``(B, ...)`` (then ``x = y = noise``) or from a pair ``(x, y)``.

        Returns ``x`` at the end (``y`` is close to it; see :meth:`sample_pair`). EDICT is
        deterministic: ``generator`` and ``step_noise`` must be ``None``.
        """
        _check_no_noise(generator, step_noise)
        return self.sample_pair(
            model,
            noise,
            num_steps=num_steps,
            timesteps=timesteps,
            strength=strength,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
        )[0]

    def sample_pair(
        self,
        model: Model,
        noise: Tensor | EDICTState,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> EDICTState:
        """Like :meth:`sample` but returns both final sequences ``(x_0, y_0)``."""
        return self._run_pair(
            model,
            ("noise", noise),
            self.plan(num_steps, timesteps=timesteps, strength=strength),
            inverse=False,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
        )

    def invert(
        self,
        model: Model,
        x0: Tensor | EDICTState,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> EDICTState:
        """Exact inversion of ``x0`` ``(B, ...)`` (or a pair) into the pair at the plan's first level.

        Undoes the generation steps of the same plan in reverse order (algorithms spec 4.3):
        unmix, then the two affine sub-steps in the reverse of the order generation used at that
        step's *generation* index. Returns ``(x_T, y_T)``; pass it to :meth:`sample` with the same
        model, ``model_kwargs``, step arguments and ``strength`` to get ``x0`` back.
        """
        return self._run_pair(
            model,
            ("x0", x0),
            self.plan(num_steps, timesteps=timesteps, strength=strength),
            inverse=True,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
        )

    def capture_graph(
        self,
        model: Model,
        noise: Tensor,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        generator: Generators = None,
        step_noise: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        warmup: int = 2,
    ) -> CUDAGraphSampling[Tensor]:
        """:meth:`Sampler.capture_graph` for :meth:`sample` from ``noise`` ``(B, ...)``: each replay
        returns ``x_0``. EDICT draws no noise: ``generator`` and ``step_noise`` must be ``None``."""
        _check_no_noise(generator, step_noise)
        return self._capture_pair(
            model,
            "noise",
            noise,
            self.final_sample,
            self.plan(num_steps, timesteps=timesteps, strength=strength),
            inverse=False,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            warmup=warmup,
        )

    def capture_graph_pair(
        self,
        model: Model,
        start: Tensor | EDICTState,
        *,
        inverse: bool = False,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        warmup: int = 2,
    ) -> CUDAGraphSampling[EDICTState]:
        """Record :meth:`sample_pair` (or, with ``inverse=True``, :meth:`invert`) as a CUDA graph.

        ``start`` is a tensor ``(B, ...)`` or a pair, and every replay takes the same kind (one
        tensor, or a pair) and returns the pair ``(x, y)``. Rules as in
        :meth:`Sampler.capture_graph`.
        """
        if not isinstance(inverse, bool):
            raise InputTypeError(f"inverse: expected a bool, got {describe(inverse)}")
        return self._capture_pair(
            model,
            "x0" if inverse else "noise",
            start,
            lambda pair: pair,
            self.plan(num_steps, timesteps=timesteps, strength=strength),
            inverse=inverse,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            warmup=warmup,
        )

    def _capture_pair(
        self,
        model: Model,
        name: str,
        start: Tensor | EDICTState,
        finish: Callable[[EDICTState], OutT],
        plan: SamplingPlan,
        *,
        inverse: bool,
        model_kwargs: Mapping[str, Any] | None,
        model_dtype: torch.dtype | None,
        callback: Callback | None,
        warmup: int,
    ) -> CUDAGraphSampling[OutT]:
        """Record generation (or inversion over ``plan.reversed()``) from a tensor or a pair."""
        _, like = self._start(name, start)  # validates and warns
        dtype = self.state_dtype(like)
        if isinstance(start, tuple):
            starts = {f"{name}[0]": start[0], f"{name}[1]": start[1]}
        else:
            starts = {name: start}

        def make_state(s: tuple[Tensor, ...]) -> EDICTState:
            return (s[0].to(dtype), s[-1].to(dtype))

        return self._capture(
            model,
            starts,
            make_state,
            finish,
            plan.reversed() if inverse else plan,
            inverse=inverse,
            generator=None,
            step_noise=None,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            warmup=warmup,
        )

    def _run_pair(
        self,
        model: Model,
        start: tuple[str, Tensor | EDICTState],
        plan: SamplingPlan,
        *,
        inverse: bool,
        model_kwargs: Mapping[str, Any] | None,
        model_dtype: torch.dtype | None,
        callback: Callback | None,
        progress: bool,
    ) -> EDICTState:
        """Generation over ``plan``, or its exact inverse over ``plan.reversed()``."""
        state, like = self._start(*start)
        return self.run_state(
            model,
            state,
            plan.reversed() if inverse else plan,
            like=like,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc="EDICT inversion" if inverse else "EDICT sampling",
            inverse=inverse,
        )

    def _start(self, name: str, value: Tensor | EDICTState) -> tuple[EDICTState, Tensor]:
        """The initial pair in the state dtype, and a tensor like the sample."""
        if isinstance(value, tuple):
            if len(value) != 2:
                raise InputValueError(
                    f"{name}: expected a tensor or a pair (x, y), got a tuple of {len(value)}"
                )
            x = check_tensor(f"{name}[0]", value[0], floating=True, min_ndim=2)
            y = check_tensor(f"{name}[1]", value[1], floating=True, min_ndim=2)
            check_same_shape(f"{name}[1]", y, f"{name}[0]", x)  # and its device
        else:
            x = y = check_tensor(name, value, floating=True, min_ndim=2)
        dtype = self.state_dtype(x)
        if self.dtype is None:  # an explicit dtype was warned about at construction
            _warn_precision(dtype)
        return (x.to(dtype), y.to(dtype)), x


def edict_mix(x: Tensor, y: Tensor, p: float) -> EDICTState:
    """EDICT's mixing layer (paper eq. 11): ``x' = p x + (1-p) y``, then ``y' = p y + (1-p) x'``.

    Sequential (``y'`` uses the mixed ``x'``); shapes ``(B, ...)``. Inverse: :func:`edict_unmix`.
    """
    # lerp(a, b, w) = a + w (b - a): one pass each
    x_mixed = torch.lerp(y, x, p, out=out_like(x, y))
    return x_mixed, torch.lerp(x_mixed, y, p, out=out_like(x, y))


def edict_unmix(x: Tensor, y: Tensor, p: float) -> EDICTState:
    """The exact inverse of :func:`edict_mix` (paper eq. 12): undo ``y`` first, then ``x``."""
    y_prev = lincomb(y, 1.0 / p, x, -(1.0 - p) / p)
    return lincomb(x, 1.0 / p, y_prev, -(1.0 - p) / p), y_prev


def _model_output(model: BoundModel, z: Tensor, t: Tensor) -> Tensor:
    """The model's output at ``(z, t)``, checked against ``z``'s shape."""
    out = model(z, t)
    check_model_output(out, z)
    return out


def _folded(c: EDICTCoefficients, a: Scalar, b: Scalar) -> tuple[float, float, float] | None:
    """``(a, b eps_from_out, b eps_from_x)``: a sub-step ``a z + b eps_hat(w, out)`` as one
    combination of ``z``, ``out`` and ``w`` with float coefficients, for a fused pass; ``None``
    where a coefficient is a tensor, or where the folded pair would cancel (beyond
    :data:`~imgdiff._ops.FUSE_LIMIT`; an epsilon model never: its ``eps_from_x`` is 0)."""
    ex, eo = c.eps_from_x, c.eps_from_out
    if not (
        isinstance(a, float)
        and isinstance(b, float)
        and isinstance(ex, float)
        and isinstance(eo, float)
    ):
        return None
    kb, kc = b * eo, b * ex
    if kc != 0.0 and not fusable(kb, kc):
        return None
    return a, kb, kc


def _substep(
    impl: Fused | None,
    k: tuple[float, float, float] | None,
    c: EDICTCoefficients,
    z: Tensor,
    a: Scalar,
    b: Scalar,
    w: Tensor,
    out: Tensor,
    *,
    own: bool = False,
) -> Tensor:
    """An affine sub-step ``a z + b eps_hat(w, out)`` (paper eq. 10; its inverse with ``1/a`` and
    ``-b/a``), ``out`` the model's output at the other sequence ``w``: one fused pass with the
    folded coefficients ``k`` (:func:`_folded` of ``a``, ``b``) where ``impl`` (from
    :attr:`EDICT.backend`) allows and autograd need not see it. With ``own`` (``z`` is the step's
    own tensor, lent to the model only through :func:`_lent`) the pass writes into ``z`` where
    :func:`~imgdiff.buffers.exclusive` finds no one else holding it."""
    if k is not None and (impl := fused_for(impl, z, w, out)) is not None:
        in_place = own and exclusive(z)  # the kernels leave w out where k[2] is 0
        return kernels.fused_lincomb3(impl, z, k[0], out, k[1], w, k[2], in_place=in_place)
    return lincomb(z, a, c.eps_hat(w, out), b)


def _lent(z: Tensor, k: tuple[float, float, float] | None) -> Tensor:
    """``z`` as given to the model: a ``detach()`` of it (another tensor on its memory, so that
    :func:`~imgdiff.buffers.exclusive` sees what the model keeps) where the step may overwrite
    ``z`` afterwards (fused, ``k`` not ``None``, and no autograd graph through ``z``)."""
    return z if k is None or z.requires_grad else z.detach()


def _check_pair(x: Tensor, y: Tensor) -> None:
    """A step's state: two tensors of one shape (the fused kernels walk both over x's elements)."""
    if x.shape != y.shape:
        raise InputValueError(
            f"state: expected a pair (x, y) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def _check_no_noise(generator: object, step_noise: object) -> None:
    if generator is not None or step_noise is not None:
        raise InputValueError(
            "generator: EDICT is deterministic and draws no noise; expected generator=None and "
            f"step_noise=None, got {describe(generator)} and {describe(step_noise)}"
        )


def _warn_precision(dtype: torch.dtype) -> None:
    if dtype != torch.float64:
        warn_user(
            f"EDICT with a {dtype} state: the inversion is exact only to rounding of that dtype "
            "(measured 2e-5 to 4e-5 max error for float32 over 50 steps, more for half precision); "
            "use dtype=torch.float64 (the default) for reconstruction to ~1e-14",
            PrecisionWarning,
        )
