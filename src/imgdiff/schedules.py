"""Noise schedules: an immutable table of ``alpha_bar`` in float64 and everything derived from it.

Notation (DDPM, Ho et al. 2020; 0-based ``t`` as in diffusers and guided-diffusion):
``beta_t``, ``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod_{s<=t} alpha_s``, forward marginal
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from imgdiff._checks import (
    check_float,
    check_int,
    check_tensor,
    check_timestep_tensor,
    describe,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.posterior import posterior_coefficients

__all__ = ["NoiseSchedule", "check_schedule", "karras_sigmas", "sigma_to_timestep"]

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _as_float64(name: str, values: ArrayLike) -> Tensor:
    if isinstance(values, Tensor):
        out = values.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        try:
            out = torch.as_tensor(np.asarray(values, dtype=np.float64)).clone()
        except (TypeError, ValueError) as exc:
            raise InputValueError(f"{name}: expected a 1-d sequence of floats ({exc})") from None
    check_tensor(name, out, ndim=1)
    if out.numel() < 2:
        raise InputValueError(f"{name}: expected at least 2 training timesteps, got {out.numel()}")
    if not torch.isfinite(out).all():
        raise InputValueError(f"{name}: expected finite values, got NaN or infinity")
    return out


class NoiseSchedule:
    """An immutable discrete noise schedule with ``T`` training timesteps (0-based).

    The schedule stores ``betas`` and ``alphas_cumprod`` (``alpha_bar``) in float64 on the CPU;
    every property returns a fresh float64 tensor of shape ``(T,)``, so the schedule cannot be
    changed through what it returns. Samplers gather these tables once per call and cast the
    coefficients to the sample dtype at use.

    Build one with a named constructor (:meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`,
    :meth:`sigmoid`, :meth:`sigmoid_chen`) or from tables (:meth:`from_betas`,
    :meth:`from_alphas_cumprod`).

    Example:
        >>> schedule = NoiseSchedule.scaled_linear()  # Stable Diffusion's
        >>> round(float(schedule.sigmas[-1]), 3)
        14.615
    """

    __slots__ = ("_alphas_cumprod", "_betas")

    _betas: Tensor
    _alphas_cumprod: Tensor

    def __init__(self, betas: ArrayLike, alphas_cumprod: ArrayLike) -> None:
        """Both tables ``(T,)``, which must agree: ``alpha_bar = cumprod(1 - beta)`` (to 1e-3
        relative, so float32 tables such as diffusers' pass).

        Copied to float64 on the CPU and validated like :meth:`from_alphas_cumprod`; the named
        constructors are the usual way in.
        """
        ab = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)._alphas_cumprod
        b = _as_float64("betas", betas)
        if b.shape != ab.shape:
            raise InputValueError(
                f"betas: expected shape {tuple(ab.shape)} like alphas_cumprod, got {tuple(b.shape)}"
            )
        implied = torch.cumprod(1.0 - b, dim=0)
        if not torch.allclose(implied, ab, rtol=1e-3, atol=1e-12):
            k = int(torch.nonzero(~torch.isclose(implied, ab, rtol=1e-3, atol=1e-12))[0])
            raise InputValueError(
                "betas: expected alphas_cumprod = cumprod(1 - betas), got cumprod "
                f"{float(implied[k]):.6g} against alphas_cumprod {float(ab[k]):.6g} at timestep {k}"
            )
        object.__setattr__(self, "_betas", b)
        object.__setattr__(self, "_alphas_cumprod", ab)

    @classmethod
    def _trusted(cls, betas: Tensor, alphas_cumprod: Tensor) -> NoiseSchedule:
        """A schedule from tables this module computed and checked (float64 CPU, consistent)."""
        schedule = object.__new__(cls)
        object.__setattr__(schedule, "_betas", betas)
        object.__setattr__(schedule, "_alphas_cumprod", alphas_cumprod)
        return schedule

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"NoiseSchedule is immutable; cannot set {name!r}")

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_betas(cls, betas: ArrayLike) -> NoiseSchedule:
        """Schedule from ``betas`` of shape ``(T,)`` with ``0 < beta_t <= 1`` (1 only at the end)."""
        b = _as_float64("betas", betas)
        if not bool(((b > 0) & (b <= 1)).all()):
            raise InputValueError(
                f"betas: expected values in (0, 1], got min {float(b.min())} and max {float(b.max())}"
            )
        if bool((b[:-1] >= 1).any()):
            k = int(torch.nonzero(b[:-1] >= 1)[0])
            raise InputValueError(
                "betas: expected beta < 1 before the last timestep (alpha_bar would reach 0 "
                f"early), got {float(b[k])} at timestep {k}"
            )
        ab = torch.cumprod(1.0 - b, dim=0)
        bad = (ab[:-1] <= 0) | (ab[1:] >= ab[:-1])
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise InputValueError(
                f"betas: alpha_bar = cumprod(1 - beta) stops decreasing or underflows to 0 at "
                f"timestep {k} of {b.numel()} (alpha_bar = {float(ab[k]):.3g}); expected "
                "alpha_bar > 0 and strictly decreasing before the last timestep (smaller betas "
                "or fewer timesteps)"
            )
        return cls._trusted(b, ab)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: ArrayLike) -> NoiseSchedule:
        """Schedule from ``alpha_bar`` of shape ``(T,)``: strictly decreasing in ``[0, 1)``.

        Only the last value may be 0 (zero terminal SNR).
        """
        ab = _as_float64("alphas_cumprod", alphas_cumprod)
        if not (float(ab[0]) < 1.0 and float(ab[-1]) >= 0.0 and bool((ab[:-1] > 0).all())):
            raise InputValueError(
                "alphas_cumprod: expected values in (0, 1) (the last may be 0), "
                f"got first {float(ab[0])} and last {float(ab[-1])}"
            )
        if not bool((ab[1:] < ab[:-1]).all()):
            k = int(torch.nonzero(ab[1:] >= ab[:-1])[0])
            raise InputValueError(
                "alphas_cumprod: expected a strictly decreasing sequence, got "
                f"{float(ab[k])} followed by {float(ab[k + 1])} at timestep {k + 1}"
            )
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls._trusted(1.0 - ab / prev, ab)

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """DDPM's linear betas (Ho et al. 2020): ``beta_i = linspace(beta_start, beta_end, T)[i]``.

        The ends are used as given for any ``T`` (as diffusers). improved-diffusion instead scales
        both by ``1000 / T`` so other ``T`` keep the same total noise: pass
        ``beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T`` for that.
        """
        T = check_int("num_train_timesteps", num_train_timesteps, min=2)
        start = check_float("beta_start", beta_start, min=0.0, max=1.0, min_open=True)
        end = check_float("beta_end", beta_end, min=0.0, max=1.0, min_open=True)
        return cls.from_betas(torch.linspace(start, end, T, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> NoiseSchedule:
        """Latent Diffusion / Stable Diffusion: ``beta_i = linspace(sqrt(start), sqrt(end), T)[i]^2``."""
        T = check_int("num_train_timesteps", num_train_timesteps, min=2)
        start = check_float("beta_start", beta_start, min=0.0, max=1.0, min_open=True)
        end = check_float("beta_end", beta_end, min=0.0, max=1.0, min_open=True)
        roots = torch.linspace(math.sqrt(start), math.sqrt(end), T, dtype=torch.float64)
        return cls.from_betas(roots**2)

    @classmethod
    def cosine(
        cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
    ) -> NoiseSchedule:
        """Nichol & Dhariwal 2021, eq. 17: ``f(u) = cos^2((u + s)/(1 + s) pi/2)``.

        ``beta_i = min(1 - f((i+1)/T) / f(i/T), max_beta)``; diffusers calls it
        ``"squaredcos_cap_v2"``. With T = 1000 exactly the last beta is capped.
        """
        T = check_int("num_train_timesteps", num_train_timesteps, min=2)
        s = check_float("s", s, min=0.0)
        cap = check_float("max_beta", max_beta, min=0.0, max=1.0, min_open=True)
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return cls.from_betas(torch.clamp(1.0 - f[1:] / f[:-1], max=cap))

    @classmethod
    def sigmoid(
        cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> NoiseSchedule:
        """GeoDiff's sigmoid betas (diffusers ``"sigmoid"``).

        ``beta_i = sigmoid(linspace(-6, 6, T)[i]) (beta_end - beta_start) + beta_start``.
        """
        T = check_int("num_train_timesteps", num_train_timesteps, min=2)
        start = check_float("beta_start", beta_start, min=0.0, max=1.0, min_open=True)
        end = check_float("beta_end", beta_end, min=0.0, max=1.0, min_open=True)
        z = torch.linspace(-6.0, 6.0, T, dtype=torch.float64)
        return cls.from_betas(torch.sigmoid(z) * (end - start) + start)

    @classmethod
    def sigmoid_chen(
        cls,
        num_train_timesteps: int = 1000,
        start: float = -3.0,
        end: float = 3.0,
        tau: float = 1.0,
        max_beta: float = 0.999,
    ) -> NoiseSchedule:
        """Chen 2023 ("On the importance of noise scheduling"), Fig. 8 sigmoid ``alpha_bar(u)``.

        ``g(u) = sigmoid((u (end - start) + start) / tau)``,
        ``alpha_bar(u) = (g(1) - g(u)) / (g(1) - g(0))``, then betas from consecutive ratios,
        capped at ``max_beta``.
        """
        T = check_int("num_train_timesteps", num_train_timesteps, min=2)
        s = check_float("start", start)
        e = check_float("end", end)
        if not e > s:
            raise InputValueError(f"end: expected a value > start ({s}), got {e}")
        tau = check_float("tau", tau, min=0.0, min_open=True)
        cap = check_float("max_beta", max_beta, min=0.0, max=1.0, min_open=True)
        u = torch.arange(T + 1, dtype=torch.float64) / T
        v_start = torch.sigmoid(torch.tensor(s / tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(e / tau, dtype=torch.float64))
        ab = (v_end - torch.sigmoid((u * (e - s) + s) / tau)) / (v_end - v_start)
        if not bool(torch.isfinite(ab).all()) or not bool((ab[1:-1] < ab[:-2]).all()):
            raise InputValueError(
                f"tau: {tau} saturates the sigmoid over [start, end] = [{s}, {e}] so alpha_bar "
                "is not strictly decreasing in float64; expected a larger tau or a narrower range"
            )
        return cls.from_betas(torch.clamp(1.0 - ab[1:] / ab[:-1], min=0.0, max=cap))

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """Lin et al. 2023, Algorithm 1: shift and scale ``sqrt(alpha_bar)`` so the last is 0.

        ``a'_t = (a_t - a_{T-1}) a_0 / (a_0 - a_{T-1})`` with ``a = sqrt(alpha_bar)``. The
        result has ``alpha_bar_{T-1} = 0`` (``beta_{T-1} = 1``): sample it with ``"v"``
        prediction and ``"trailing"`` spacing. Applying it twice changes nothing.
        """
        a = torch.sqrt(self._alphas_cumprod)
        a0, a_last = a[0], a[-1]
        a_new = (a - a_last) * a0 / (a0 - a_last)
        ab = a_new**2
        ab[-1] = 0.0
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return NoiseSchedule._trusted(1.0 - ab / prev, ab)

    # ---------------------------------------------------------------- tables

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether ``alpha_bar_{T-1} = 0``: the last level is pure noise (Lin et al. 2023)."""
        return bool(self._alphas_cumprod[-1] == 0.0)

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the number of training timesteps."""
        return int(self._alphas_cumprod.shape[0])

    def __len__(self) -> int:
        return self.num_train_timesteps

    @property
    def betas(self) -> Tensor:
        """``beta_t``, shape ``(T,)``."""
        return self._betas.clone()

    @property
    def alphas(self) -> Tensor:
        """``alpha_t = 1 - beta_t``, shape ``(T,)``."""
        return 1.0 - self._betas

    @property
    def alphas_cumprod(self) -> Tensor:
        """``alpha_bar_t``, shape ``(T,)``."""
        return self._alphas_cumprod.clone()

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """``alpha_bar_{t-1}`` with ``alpha_bar_{-1} = 1``, shape ``(T,)``."""
        return torch.cat([self._alphas_cumprod.new_ones(1), self._alphas_cumprod[:-1]])

    @property
    def alphas_cumprod_next(self) -> Tensor:
        """``alpha_bar_{t+1}`` with ``alpha_bar_T = 0``, shape ``(T,)`` (improved-diffusion)."""
        return torch.cat([self._alphas_cumprod[1:], self._alphas_cumprod.new_zeros(1)])

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        """``sqrt(alpha_bar_t)``: the signal scale of ``x_t``, shape ``(T,)``."""
        return torch.sqrt(self._alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        """``sqrt(1 - alpha_bar_t)``: the noise scale of ``x_t``, shape ``(T,)``."""
        return torch.sqrt(1.0 - self._alphas_cumprod)

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)``, shape ``(T,)``."""
        return self._alphas_cumprod / (1.0 - self._alphas_cumprod)

    @property
    def log_snr(self) -> Tensor:
        """``lambda_t = log SNR_t`` (``-inf`` at zero terminal SNR), shape ``(T,)``."""
        return torch.log(self._alphas_cumprod) - torch.log1p(-self._alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """VE / Karras noise level ``sigma_t = sqrt((1 - alpha_bar)/alpha_bar) = exp(-lambda/2)``.

        Shape ``(T,)``; ``inf`` where ``alpha_bar = 0``. ``x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps``.
        """
        return torch.sqrt((1.0 - self._alphas_cumprod) / self._alphas_cumprod)

    @property
    def posterior_variance(self) -> Tensor:
        """``beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`` (0 at t = 0).

        Variance of ``q(x_{t-1} | x_t, x_0)`` (DDPM eq. 7), shape ``(T,)``.
        """
        return posterior_coefficients(self._alphas_cumprod, self.alphas_cumprod_prev).beta_tilde

    @property
    def posterior_log_variance_clipped(self) -> Tensor:
        """``log beta_tilde_t`` with ``t = 0`` replaced by ``t = 1`` (improved DDPM), shape ``(T,)``.

        ``beta_tilde_0 = 0``; improved-diffusion substitutes ``beta_tilde_1`` there, which is what
        the decoder term of the variational bound at ``t = 0`` uses. (diffusers instead clamps at
        ``1e-20``, as imgdiff's DDPM sampler does; that value is only read on the step to the
        clean level, which adds no noise.)
        """
        beta_tilde = self.posterior_variance
        return torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))

    @property
    def posterior_mean_coef1(self) -> Tensor:
        """``c1_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)``: weight of ``x_0`` in DDPM eq. 7."""
        return posterior_coefficients(self._alphas_cumprod, self.alphas_cumprod_prev).mean_x0

    @property
    def posterior_mean_coef2(self) -> Tensor:
        """``c2_t = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``: weight of ``x_t``."""
        return posterior_coefficients(self._alphas_cumprod, self.alphas_cumprod_prev).mean_x

    def alpha_bar_at(self, t: Tensor | int, *, batch: int | None = None) -> Tensor:
        """Gather ``alpha_bar`` at training timesteps ``t``: float64 of shape ``(B,)`` on ``t``'s device.

        ``t`` is an int or an integer tensor of shape ``(B,)``; ``-1`` gives 1 (the clean level).
        """
        if isinstance(t, Tensor):
            device = t.device
            B = batch if batch is not None else (t.shape[0] if t.ndim == 1 else 1)
        else:
            device = torch.device("cpu")
            B = batch if batch is not None else 1
        idx = check_timestep_tensor(
            "t",
            t,
            batch=B,
            num_train_timesteps=self.num_train_timesteps,
            device=device,
            allow_final=True,
        )
        table = torch.cat([self._alphas_cumprod.new_ones(1), self._alphas_cumprod]).to(device)
        return table[idx + 1]

    # ---------------------------------------------------------------- dunder

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return bool(torch.equal(self._alphas_cumprod, other._alphas_cumprod)) and bool(
            torch.equal(self._betas, other._betas)
        )

    def __hash__(self) -> int:
        return hash(self._alphas_cumprod.numpy().tobytes())

    def __repr__(self) -> str:
        ab = self._alphas_cumprod
        return (
            f"NoiseSchedule(T={self.num_train_timesteps}, alpha_bar[0]={float(ab[0]):.6g}, "
            f"alpha_bar[T-1]={float(ab[-1]):.6g})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (NoiseSchedule, (self._betas, self._alphas_cumprod))


def check_schedule(name: str, value: object) -> NoiseSchedule:
    """Check that ``value`` is a :class:`NoiseSchedule` and return it."""
    if not isinstance(value, NoiseSchedule):
        raise InputTypeError(f"{name}: expected an imgdiff.NoiseSchedule, got {describe(value)}")
    return value


def karras_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Karras et al. 2022 (EDM), eq. 5: ``num_steps`` noise levels from ``sigma_max`` to ``sigma_min``.

    ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    followed by an appended 0 (the clean level; drop it, ``sigmas[:-1]``, before
    :func:`sigma_to_timestep`). Returns float64 of shape ``(num_steps + 1,)``. The end points
    default to the schedule's smallest and largest finite VE sigma; a zero-terminal-SNR schedule
    has an infinite largest sigma, so pass ``sigma_max`` explicitly for it.
    """
    schedule = check_schedule("schedule", schedule)
    N = check_int("num_steps", num_steps, min=2)
    rho = check_float("rho", rho, min=0.0, min_open=True)
    sig = schedule.sigmas
    lo = float(sig.min()) if sigma_min is None else check_float("sigma_min", sigma_min, min=0.0)
    if sigma_max is None:
        hi = float(sig.max())
        if not math.isfinite(hi):
            raise InputValueError(
                "sigma_max: the schedule's largest sigma is infinite (zero terminal SNR); "
                "expected an explicit finite sigma_max"
            )
    else:
        hi = check_float("sigma_max", sigma_max, min=0.0, min_open=True)
    if not 0 < lo < hi:
        raise InputValueError(f"sigma_min: expected 0 < sigma_min < sigma_max ({hi}), got {lo}")
    ramp = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    inv_lo, inv_hi = lo ** (1.0 / rho), hi ** (1.0 / rho)
    sigmas = (inv_hi + ramp * (inv_lo - inv_hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_timestep(sigmas: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Fractional training timesteps for VE noise levels, by interpolating ``log sigma_t`` linearly.

    ``sigmas`` of any shape (positive, finite); returns float64 of the same shape, clamped to the
    timesteps with a finite sigma (``[0, T-1]``, or ``[0, T-2]`` at zero terminal SNR). Models
    that accept continuous timesteps can be fed these; imgdiff's samplers pass integer ones.
    """
    check_tensor("sigmas", sigmas, floating=True)
    schedule = check_schedule("schedule", schedule)
    s = sigmas.detach().to(device="cpu", dtype=torch.float64)
    bad = ~((s > 0) & torch.isfinite(s))
    if bool(bad.any()):
        raise InputValueError(
            f"sigmas: expected positive finite noise levels, got {float(s[bad].reshape(-1)[0])}"
        )
    log_table = torch.log(schedule.sigmas)  # increasing in t
    finite = torch.isfinite(log_table)
    log_table = log_table[finite]
    log_s = torch.log(s).reshape(-1)
    idx = torch.searchsorted(log_table, log_s).clamp(1, log_table.shape[0] - 1)
    lo, hi = log_table[idx - 1], log_table[idx]
    w = ((log_s - lo) / (hi - lo)).clamp(0.0, 1.0)
    t = (idx - 1).to(torch.float64) + w
    return t.reshape(s.shape).to(sigmas.device)
