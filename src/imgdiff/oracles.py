"""Exact denoisers for known data distributions: models without weights, for tests and demos.

For data whose distribution is known, ``E[x0 | x_t]`` has a closed form, so these are the
optimal models a network could learn. A correct sampler driven by them must reproduce the data
distribution (Gaussian) or the data set itself (empirical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from imgdiff._checks import (
    check_batch_timesteps,
    check_choice,
    check_float,
    check_tensor,
    check_timestep_tensor,
)
from imgdiff._ops import per_sample
from imgdiff.errors import InputValueError
from imgdiff.prediction import PREDICTION_TYPES, PredictionType, convert_prediction
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = ["EmpiricalDenoiser", "GaussianDenoiser"]


def _express(x0: Tensor, x_t: Tensor, ab: Tensor, prediction: PredictionType) -> Tensor:
    """Express the exact ``x0`` as the requested prediction type (``ab`` is ``(B, 1, ..., 1)``)."""
    return convert_prediction(x0, x_t, ab.reshape(-1), source="sample", target=prediction)


def _work(x: Tensor) -> Tensor:
    """``x`` in the oracles' working precision: float64 (float32 on MPS, which lacks it).

    The oracles are exact models: they compute in float64 and return ``x``'s dtype, so a
    bfloat16 or float16 sample gets the exact answer rounded once (``alpha_bar_0 = 0.9999``
    rounds to 1 in those dtypes, where eps cannot be recovered from x0).
    """
    check_tensor("x", x, floating=True, min_ndim=2)
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def _levels(schedule: NoiseSchedule, x: Tensor, t: Tensor) -> Tensor:
    """``alpha_bar_t`` as ``(B, 1, ..., 1)`` in ``x``'s dtype (``x`` from :func:`_work`).

    Validates ``t`` (a host read): these oracles are test and demo models, not fast networks.
    """
    check_batch_timesteps(t, x)
    idx = check_timestep_tensor(
        "t", t, batch=x.shape[0], num_train_timesteps=len(schedule), device=x.device
    )
    table = schedule.alphas_cumprod.to(device=x.device, dtype=x.dtype)
    return per_sample(table[idx], x)


@dataclass(frozen=True)
class GaussianDenoiser:
    """The exact denoiser for i.i.d. data ``x0 ~ N(mean, std^2)`` per element.

    ``E[x0 | x_t] = mean + std^2 sqrt(ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)``, so
    ``eps* = sqrt(1 - ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab)``. Call it as a model:
    ``denoiser(x, t)`` with ``x`` ``(B, ...)`` and ``t`` ``(B,)``; it returns ``prediction``.
    """

    schedule: NoiseSchedule
    mean: float = 0.5
    std: float = 0.3
    prediction: PredictionType = "epsilon"

    def __post_init__(self) -> None:
        check_schedule("schedule", self.schedule)
        check_float("mean", self.mean)
        check_float("std", self.std, min=0.0, min_open=True)
        check_choice("prediction", self.prediction, PREDICTION_TYPES)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        xw = _work(x)
        ab = _levels(self.schedule, xw, t)
        a = ab.sqrt()
        var = ab * self.std**2 + 1.0 - ab
        x0 = self.mean + self.std**2 * a * (xw - a * self.mean) / var
        return _express(x0, xw, ab, self.prediction).to(x.dtype)


@dataclass(frozen=True, eq=False)
class EmpiricalDenoiser:
    """The exact denoiser for data drawn uniformly from ``data`` ``(K, ...)``, each item blurred by
    Gaussian noise of standard deviation ``std`` (0: the data set itself).

    With ``x_t | k ~ N(sqrt(ab) d_k, v I)``, ``v = ab std^2 + 1 - ab``, the posterior weights are
    ``w = softmax_k(-|x_t - sqrt(ab) d_k|^2 / (2 v))`` and
    ``E[x0 | x_t] = sum_k w_k (d_k + std^2 sqrt(ab) (x_t - sqrt(ab) d_k) / v)``
    (Karras et al. 2022's "ideal denoiser" for ``std = 0``). Sampling with ``std = 0`` returns
    members of ``data``; ``std > 0`` makes the model smooth at low noise, like a trained network.
    Call it as a model: ``denoiser(x, t)`` with ``x`` ``(B, ...)`` of ``data``'s item shape.
    """

    schedule: NoiseSchedule
    data: Tensor
    prediction: PredictionType = "epsilon"
    std: float = 0.0

    def __post_init__(self) -> None:
        check_schedule("schedule", self.schedule)
        check_tensor("data", self.data, floating=True, min_ndim=2)
        check_choice("prediction", self.prediction, PREDICTION_TYPES)
        check_float("std", self.std, min=0.0)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        x, out_dtype = _work(x), x.dtype  # _work checks x first
        if x.shape[1:] != self.data.shape[1:]:
            raise InputValueError(
                f"x: expected items of shape {tuple(self.data.shape[1:])} like data, "
                f"got {tuple(x.shape[1:])}"
            )
        ab = _levels(self.schedule, x, t)
        data = self.data.to(device=x.device, dtype=x.dtype)
        flat_x = x.reshape(x.shape[0], 1, -1)
        flat_d = data.reshape(1, data.shape[0], -1)
        ab_b = ab.reshape(-1, 1, 1)
        var = ab_b * self.std**2 + 1.0 - ab_b  # (B, 1, 1)
        # |x_t - sqrt(ab) d_k|^2 per sample, without the matmul expansion (it cancels badly).
        dist2 = torch.cdist(
            flat_x, ab_b.sqrt() * flat_d, compute_mode="donot_use_mm_for_euclid_dist"
        ).square()
        weights = torch.softmax(-dist2.squeeze(1) / (2.0 * var.reshape(-1, 1)), dim=1)  # (B, K)
        mean_d = weights @ flat_d.squeeze(0)  # sum_k w_k d_k, (B, D)
        shrink = (self.std**2 * ab_b.sqrt() / var).reshape(-1, 1)
        x0 = mean_d + shrink * (flat_x.squeeze(1) - ab_b.reshape(-1, 1).sqrt() * mean_d)
        return _express(x0.reshape(x.shape), x, ab, self.prediction).to(out_dtype)
