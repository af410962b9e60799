"""What a model predicts (``epsilon``, ``sample`` = x0, or ``v``) and exact conversions between them.

With ``alpha = sqrt(alpha_bar_t)`` and ``sigma = sqrt(1 - alpha_bar_t)`` (so alpha^2 + sigma^2 = 1)
and ``x_t = alpha x0 + sigma eps``:

* epsilon: ``x0 = (x_t - sigma eps) / alpha`` (DDPM eq. 15);
* sample: ``eps = (x_t - alpha x0) / sigma``;
* v (Salimans & Ho 2022, App. D): ``v = alpha eps - sigma x0``, ``x0 = alpha x_t - sigma v``,
  ``eps = sigma x_t + alpha v``.

``x0`` from ``epsilon`` is undefined where ``alpha_bar = 0`` (zero terminal SNR): the functions
raise there instead of returning infinity.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from imgdiff._checks import (
    check_choice,
    check_pair,
    check_same_shape,
    check_tensor,
    check_unit_range,
    describe,
)
from imgdiff._ops import per_sample
from imgdiff.errors import InputTypeError, InputValueError

__all__ = [
    "PREDICTION_TYPES",
    "LinearPrediction",
    "PredictionType",
    "convert_prediction",
    "eps_from_v",
    "eps_from_x0",
    "linear_prediction_coefficients",
    "v_from_x0_eps",
    "x0_from_eps",
    "x0_from_v",
]

PredictionType = Literal["epsilon", "sample", "v"]
"""The quantity a model outputs: the noise ``epsilon``, the clean ``sample`` x0, or ``v``."""
PREDICTION_TYPES: tuple[PredictionType, ...] = get_args(PredictionType)


class LinearPrediction(NamedTuple):
    """``x0 = x0_from_x * x_t + x0_from_out * out`` and ``eps = eps_from_x * x_t + eps_from_out * out``.

    Every prediction type recovers ``x0`` and ``eps`` as linear combinations of the sample and the
    model output; samplers precompute these four coefficients per step in float64.
    """

    x0_from_x: Tensor
    x0_from_out: Tensor
    eps_from_x: Tensor
    eps_from_out: Tensor


def linear_prediction_coefficients(
    prediction: PredictionType, alpha_bar: Tensor, timesteps: Tensor | None = None
) -> LinearPrediction:
    """The four coefficients of :class:`LinearPrediction` for each ``alpha_bar`` (float64 in and out).

    Raises for ``epsilon`` where ``alpha_bar == 0`` and for ``sample`` where ``alpha_bar == 1``
    (``timesteps``, of ``alpha_bar``'s shape, only improves the message).
    """
    prediction = check_choice("prediction", prediction, PREDICTION_TYPES)
    check_tensor("alpha_bar", alpha_bar)
    ab = alpha_bar.to(torch.float64)
    check_unit_range("alpha_bar", ab, alpha_bar)
    a = torch.sqrt(ab)
    s = torch.sqrt(1.0 - ab)
    if prediction == "epsilon":
        _refuse_where(
            ab == 0,
            timesteps,
            "prediction='epsilon' cannot recover x0 where alpha_bar = 0 "
            "(zero terminal SNR); use prediction='v' or leave that timestep out",
        )
        return LinearPrediction(1.0 / a, -s / a, torch.zeros_like(ab), torch.ones_like(ab))
    if prediction == "sample":
        _refuse_where(
            ab == 1, timesteps, "prediction='sample' cannot recover eps where alpha_bar = 1"
        )
        return LinearPrediction(torch.zeros_like(ab), torch.ones_like(ab), 1.0 / s, -a / s)
    return LinearPrediction(a, -s, s, a)


def _refuse_where(bad: Tensor, timesteps: Tensor | None, message: str) -> None:
    if bool(bad.any()):
        where = ""
        if timesteps is not None:
            where = f" (timesteps {sorted({int(v) for v in timesteps[bad].tolist()})})"
        raise InputValueError(message + where)


def _alpha_bar_like(alpha_bar: object, x: Tensor) -> Tensor:
    """``alpha_bar`` (float, 0-d or ``(B,)``) as a tensor broadcastable to ``x`` as ``(B, 1, ..., 1)``."""
    if isinstance(alpha_bar, bool) or not isinstance(alpha_bar, (int, float, Tensor)):
        raise InputTypeError(
            f"alpha_bar: expected a float or a tensor of shape ({x.shape[0]},), got {describe(alpha_bar)}"
        )
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device)
    if ab.ndim == 1 and ab.shape[0] == x.shape[0]:
        ab = per_sample(ab, x, torch.float64)
    elif ab.ndim != 0:
        raise InputValueError(
            f"alpha_bar: expected a float, a 0-d tensor or shape ({x.shape[0]},) to match the "
            f"batch, got shape {tuple(ab.shape)}"
        )
    check_unit_range("alpha_bar", ab, alpha_bar)
    return ab


def _pair(name_a: str, a: object, name_b: str, b: object) -> tuple[Tensor, Tensor]:
    ta = check_tensor(name_a, a, floating=True, min_ndim=1)
    tb = check_tensor(name_b, b, floating=True, min_ndim=1)
    check_same_shape(name_b, tb, name_a, ta)
    return ta, check_pair(name_b, tb, name_a, ta)


def _scales(alpha_bar: object, x: Tensor) -> tuple[Tensor, Tensor]:
    ab = _alpha_bar_like(alpha_bar, x)
    return torch.sqrt(ab).to(x.dtype), torch.sqrt(1.0 - ab).to(x.dtype)


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """DDPM eq. 15: ``x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``; shapes ``(B, ...)``.

    ``alpha_bar`` is a float or a ``(B,)`` tensor. Raises where ``alpha_bar == 0``.
    """
    x_t, eps = _pair("x_t", x_t, "eps", eps)
    ab = _alpha_bar_like(alpha_bar, x_t)
    if bool((ab == 0).any()):
        raise InputValueError(
            "alpha_bar: x0 cannot be recovered from eps where alpha_bar = 0 (zero terminal SNR); "
            "use a v-prediction model there"
        )
    a, s = torch.sqrt(ab).to(x_t.dtype), torch.sqrt(1.0 - ab).to(x_t.dtype)
    return (x_t - s * eps) / a


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """``eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)``; raises where ``alpha_bar == 1``."""
    x_t, x0 = _pair("x_t", x_t, "x0", x0)
    ab = _alpha_bar_like(alpha_bar, x_t)
    if bool((ab == 1).any()):
        raise InputValueError("alpha_bar: eps cannot be recovered from x0 where alpha_bar = 1")
    a, s = torch.sqrt(ab).to(x_t.dtype), torch.sqrt(1.0 - ab).to(x_t.dtype)
    return (x_t - a * x0) / s


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Salimans & Ho 2022: ``x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``; shapes ``(B, ...)``."""
    x_t, v = _pair("x_t", x_t, "v", v)
    a, s = _scales(alpha_bar, x_t)
    return a * x_t - s * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Salimans & Ho 2022: ``eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v``; shapes ``(B, ...)``."""
    x_t, v = _pair("x_t", x_t, "v", v)
    a, s = _scales(alpha_bar, x_t)
    return s * x_t + a * v


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Salimans & Ho 2022: ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``; shapes ``(B, ...)``."""
    x0, eps = _pair("x0", x0, "eps", eps)
    a, s = _scales(alpha_bar, x0)
    return a * eps - s * x0


def convert_prediction(
    output: Tensor,
    x_t: Tensor,
    alpha_bar: Tensor | float,
    *,
    source: PredictionType,
    target: PredictionType,
) -> Tensor:
    """Convert a model output of type ``source`` at sample ``x_t`` into type ``target``.

    Shapes: ``output`` and ``x_t`` ``(B, ...)``; ``alpha_bar`` a float or ``(B,)``. Exact (up
    to rounding) for every pair; raises where the conversion is undefined (``epsilon`` to
    anything but itself at ``alpha_bar = 0``).
    """
    source = check_choice("source", source, PREDICTION_TYPES)
    target = check_choice("target", target, PREDICTION_TYPES)
    x_t, output = _pair("x_t", x_t, "output", output)
    _alpha_bar_like(alpha_bar, x_t)  # validated even when nothing is converted
    if source == target:
        return output
    if source == "epsilon":
        x0 = x0_from_eps(x_t, output, alpha_bar)
        return x0 if target == "sample" else v_from_x0_eps(x0, output, alpha_bar)
    if source == "sample":
        eps = eps_from_x0(x_t, output, alpha_bar)
        return eps if target == "epsilon" else v_from_x0_eps(output, eps, alpha_bar)
    if target == "sample":
        return x0_from_v(x_t, output, alpha_bar)
    return eps_from_v(x_t, output, alpha_bar)
