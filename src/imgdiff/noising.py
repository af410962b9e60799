"""The forward (noising) process and the training target for each prediction type."""

from __future__ import annotations

from torch import Tensor

from imgdiff._checks import (
    check_choice,
    check_pair,
    check_same_shape,
    check_tensor,
    check_timestep_tensor,
)
from imgdiff._ops import per_sample
from imgdiff.prediction import PREDICTION_TYPES, PredictionType
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = ["add_noise", "training_target"]


def _gathered(
    schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor | int
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample scales ``sqrt(ab)``, ``sqrt(1 - ab)`` and ``noise`` in ``x0``'s dtype."""
    check_schedule("schedule", schedule)
    check_tensor("x0", x0, floating=True, min_ndim=1)
    check_tensor("noise", noise, floating=True)
    check_same_shape("noise", noise, "x0", x0)
    noise = check_pair("noise", noise, "x0", x0)
    idx = check_timestep_tensor(
        "t", t, batch=x0.shape[0], num_train_timesteps=len(schedule), device=x0.device
    )
    ab = schedule.alpha_bar_at(idx)  # float64 until the cast: 1 - ab near 1 needs it
    return per_sample(ab.sqrt(), x0), per_sample((1.0 - ab).sqrt(), x0), noise


def add_noise(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
    """DDPM eq. 4: ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``.

    Shapes: ``x0`` and ``noise`` ``(B, ...)``; ``t`` an int or an integer tensor ``(B,)`` of
    training timesteps (one per sample). Returns ``x_t`` of ``x0``'s shape and dtype (``noise``
    is cast to it; it must be on ``x0``'s device).
    """
    a, s, noise = _gathered(schedule, x0, noise, t)
    return a * x0 + s * noise


def training_target(
    schedule: NoiseSchedule,
    x0: Tensor,
    noise: Tensor,
    t: Tensor | int,
    prediction: PredictionType,
) -> Tensor:
    """What a model of type ``prediction`` should output for ``x_t = add_noise(schedule, x0, noise, t)``.

    ``epsilon``: ``noise``; ``sample``: ``x0``; ``v``: ``sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0``
    (Salimans & Ho 2022). Shapes as in :func:`add_noise`.
    """
    prediction = check_choice("prediction", prediction, PREDICTION_TYPES)
    a, s, noise = _gathered(schedule, x0, noise, t)
    if prediction == "epsilon":
        return noise.clone()
    if prediction == "sample":
        return x0.clone()
    return a * noise - s * x0  # v_from_x0_eps with the (B, 1, ...) scales already gathered
