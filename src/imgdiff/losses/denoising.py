"""Denoising training losses: L_simple (L1/L2), min-SNR weighting, and improved DDPM's hybrid VLB.

All losses are per sample, shape ``(B,)``: the mean over every non-batch element ("mean_flat",
as improved-diffusion), so they are per-pixel losses. Average over the batch yourself.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff._checks import (
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_floating_dtype,
    check_same_shape,
    check_tensor,
    check_timestep_tensor,
    check_unit_range,
)
from imgdiff._ops import lincomb, per_sample
from imgdiff.errors import InputValueError
from imgdiff.noising import training_target
from imgdiff.posterior import learned_range_log_variance
from imgdiff.prediction import PREDICTION_TYPES, PredictionType, linear_prediction_coefficients
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = [
    "LOSS_NORMS",
    "MASK_NORMALIZATIONS",
    "LossNorm",
    "MaskNormalization",
    "denoising_loss",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "masked_denoising_loss",
    "min_snr_weight",
    "min_snr_weight_from_alpha_bar",
    "normal_kl",
    "vlb_term",
]

LossNorm = Literal["l2", "l1"]
"""The per-element penalty of :func:`denoising_loss`: squared (``"l2"``) or absolute (``"l1"``)."""
LOSS_NORMS: tuple[LossNorm, ...] = get_args(LossNorm)


def _mean_flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def denoising_loss(model_output: Tensor, target: Tensor, *, norm: LossNorm = "l2") -> Tensor:
    """``mean_flat(|model_output - target|^p)`` per sample, ``p = 2`` (``"l2"``) or 1 (``"l1"``).

    Shapes: both ``(B, ...)``; returns ``(B,)``. Build ``target`` with
    :func:`imgdiff.training_target` for the model's prediction type (DDPM's L_simple for eps).
    """
    norm = check_choice("norm", norm, LOSS_NORMS)
    check_tensor("model_output", model_output, floating=True, min_ndim=1, nonempty=True)
    check_tensor("target", target, floating=True)
    check_same_shape("target", target, "model_output", model_output)
    diff = model_output - target
    return _mean_flat(diff.square() if norm == "l2" else diff.abs())


MaskNormalization = Literal["hole", "image"]
"""How :func:`masked_denoising_loss` averages: over the hole's elements (``"hole"``, the faithful
"loss on masked pixels only") or over all elements with zeros outside the hole (``"image"``,
Palette's code: ``mse_loss(m eps, m eps_hat)``, which scales the loss by the hole fraction)."""
MASK_NORMALIZATIONS: tuple[MaskNormalization, ...] = get_args(MaskNormalization)


def masked_denoising_loss(
    model_output: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    norm: LossNorm = "l2",
    normalization: MaskNormalization = "hole",
) -> Tensor:
    """The denoising loss on the hole only (Palette inpainting), per sample ``(B,)`` (spec 2.6).

    ``model_output``/``target`` ``(B, C, H, W)``; ``mask`` ``(B, 1, H, W)`` or ``(B, C, H, W)``,
    1 = hole (bool, or 0/1 values, which are checked on the host). ``"hole"``: ``sum(m |d|^p) / sum(m)`` over the hole's elements (a sample without
    hole gives 0); ``"image"``: ``mean(m |d|^p)`` over all elements.
    """
    norm = check_choice("norm", norm, LOSS_NORMS)
    normalization = check_choice("normalization", normalization, MASK_NORMALIZATIONS)
    check_tensor("model_output", model_output, floating=True, ndim=4, nonempty=True)
    check_tensor("target", target, floating=True)
    check_same_shape("target", target, "model_output", model_output)
    m = check_tensor("mask", mask, ndim=4)
    check_device("mask", m, "model_output", model_output)
    B, C, H, W = model_output.shape
    if m.shape[0] != B or tuple(m.shape[2:]) != (H, W) or m.shape[1] not in (1, C):
        raise InputValueError(
            f"mask: expected shape ({B}, 1 or {C}, {H}, {W}), got {tuple(m.shape)}"
        )
    if m.dtype != torch.bool and (m.dtype.is_complex or not bool(((m == 0) | (m == 1)).all())):
        raise InputValueError(
            "mask: expected a binary mask of 0 and 1 (1 = hole) or a bool mask, got "
            f"{'dtype ' + str(m.dtype) if m.dtype.is_complex else 'other values'}"
        )
    m = m.to(model_output.dtype).expand_as(model_output)
    diff = model_output - target
    per_element = m * (diff.square() if norm == "l2" else diff.abs())
    if normalization == "image":
        return _mean_flat(per_element)
    total = per_element.reshape(B, -1).sum(dim=1)
    return total / m.reshape(B, -1).sum(dim=1).clamp_min(1.0)


def min_snr_weight(
    schedule: NoiseSchedule,
    t: Tensor,
    prediction: PredictionType,
    gamma: float = 5.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape ``(B,)`` in ``dtype`` on ``t``'s device.

    Makes the weighted loss equal ``min(SNR, gamma) |x0 - x0_hat|^2``: the weight is
    ``min(SNR, gamma) / SNR`` for eps targets, ``min(SNR, gamma) / (SNR + 1)`` for v targets
    and ``min(SNR, gamma)`` for x0 targets.
    """
    schedule = check_schedule("schedule", schedule)
    prediction = check_choice("prediction", prediction, PREDICTION_TYPES)
    gamma = check_float("gamma", gamma, min=0.0, min_open=True)
    check_tensor("t", t, ndim=1)
    idx = check_timestep_tensor(
        "t", t, batch=t.shape[0], num_train_timesteps=len(schedule), device=t.device
    )
    ab = schedule.alpha_bar_at(idx)
    return min_snr_weight_from_alpha_bar(ab, prediction, gamma, dtype=dtype)


def min_snr_weight_from_alpha_bar(
    alpha_bar: Tensor,
    prediction: PredictionType,
    gamma: float = 5.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`min_snr_weight` at noise levels ``alpha_bar`` ``(B,)`` in [0, 1] (e.g. Palette's gamma)."""
    prediction = check_choice("prediction", prediction, PREDICTION_TYPES)
    gamma = check_float("gamma", gamma, min=0.0, min_open=True)
    ab = check_tensor("alpha_bar", alpha_bar, ndim=1, floating=True).to(torch.float64)
    check_unit_range("alpha_bar", ab, alpha_bar)  # a CPU alpha_bar (the trainer's) is read freely
    snr = ab / (1.0 - ab)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "epsilon":
        # min(SNR, gamma) / SNR -> 1 as SNR -> 0 (zero terminal SNR).
        w = torch.where(snr > 0, clipped / snr.clamp_min(1e-300), torch.ones_like(snr))
    elif prediction == "v":
        w = clipped / (snr + 1.0)
    else:
        w = clipped
    return w.to(check_floating_dtype("dtype", dtype) or torch.float32)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor | float) -> Tensor:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats.

    All tensors share ``mean1``'s shape; ``logvar2`` may also be a float.
    """
    check_tensor("mean1", mean1, floating=True)
    for name, value in (("logvar1", logvar1), ("mean2", mean2), ("logvar2", logvar2)):
        if name == "logvar2" and isinstance(value, float):
            continue
        check_same_shape(name, check_tensor(name, value, floating=True), "mean1", mean1)
    lv2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (
        -1.0 + lv2 - logvar1 + torch.exp(logvar1 - lv2) + (mean1 - mean2).square() * torch.exp(-lv2)
    )


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # Page 1976's tanh approximation of the Gaussian CDF, as used by improved DDPM.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats) of 8-bit data ``x`` in ``[-1, 1]`` under a Gaussian discretised to bins.

    Bins have half-width ``1/255``; the outermost bins (``x < -0.999``, ``x > 0.999``) extend to
    infinity (DDPM Sec. 3.3). Elementwise; all shapes equal.
    """
    check_tensor("x", x, floating=True)
    check_same_shape("means", check_tensor("means", means, floating=True), "x", x)
    check_same_shape("log_scales", check_tensor("log_scales", log_scales, floating=True), "x", x)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_term(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    prediction: PredictionType = "epsilon",
    variance: Literal["learned", "learned_range"] = "learned_range",
    detach_mean: bool = True,
) -> Tensor:
    """The variational bound term ``L_t`` in bits per dimension, shape ``(B,)`` (improved DDPM Sec. 3.1).

    For ``t > 0``: ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / log 2``; for ``t = 0``: the
    negative discretised-Gaussian log-likelihood of ``x0`` under ``p(x_0 | x_1)``. The model's
    ``p`` has the posterior mean of its ``x0_hat`` and the variance from the extra channels of
    ``model_output`` ``(B, 2C, ...)``: ``learned_range`` interpolates between ``log beta_t``
    and :attr:`NoiseSchedule.posterior_log_variance_clipped` (``beta_tilde_1`` at ``t = 0``, as
    improved DDPM), ``learned`` reads a log-variance. With ``detach_mean`` (default) the mean half
    is detached, so this term trains only the variance (the ``stop_gradient`` of the hybrid loss).
    ``t`` ``(B,)`` is read where it lives: on the CPU (as the trainer passes it) that costs no
    device sync.
    """
    schedule = check_schedule("schedule", schedule)
    detach_mean = check_bool("detach_mean", detach_mean)
    variance = check_choice("variance", variance, ("learned", "learned_range"))
    check_tensor("x0", x0, floating=True, min_ndim=2, nonempty=True)
    check_tensor("x_t", x_t, floating=True)
    check_same_shape("x_t", x_t, "x0", x0)
    check_tensor("model_output", model_output, floating=True)
    check_device("model_output", model_output, "x0", x0)
    C = x0.shape[1]
    expected = (x0.shape[0], 2 * C, *x0.shape[2:])
    if tuple(model_output.shape) != expected:
        raise InputValueError(
            f"model_output: expected shape {expected} (mean and variance channels), "
            f"got {tuple(model_output.shape)}"
        )
    # values checked (and the coefficients below computed) on t's own device
    t = check_timestep_tensor(
        "t",
        t,
        batch=x0.shape[0],
        num_train_timesteps=len(schedule),
        device=t.device if isinstance(t, Tensor) else torch.device("cpu"),
    )
    idx = t.to(x0.device)
    mean_out, var_out = model_output[:, :C], model_output[:, C:]
    if detach_mean:
        mean_out = mean_out.detach()

    def at(table: Tensor) -> Tensor:
        return per_sample(table.to(x0.device)[idx], x0)

    ab = schedule.alpha_bar_at(t)
    pred = linear_prediction_coefficients(prediction, ab)
    x0_hat = lincomb(
        x_t, per_sample(pred.x0_from_x, x0), mean_out, per_sample(pred.x0_from_out, x0)
    )
    c1, c2 = at(schedule.posterior_mean_coef1), at(schedule.posterior_mean_coef2)
    log_beta_tilde = at(schedule.posterior_log_variance_clipped)
    if variance == "learned":
        model_log_var = var_out
    else:
        model_log_var = learned_range_log_variance(
            var_out, at(torch.log(schedule.betas)), log_beta_tilde
        )
    model_mean = c1 * x0_hat + c2 * x_t
    true_mean = c1 * x0 + c2 * x_t
    kl = _mean_flat(normal_kl(true_mean, log_beta_tilde.expand_as(x0), model_mean, model_log_var))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(idx == 0, nll, kl) / math.log(2.0)


def hybrid_loss(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    prediction: PredictionType = "epsilon",
    vlb_weight: float = 0.001,
) -> Tensor:
    """Improved DDPM's ``L_hybrid = L_simple + lambda L_vlb`` per sample, shape ``(B,)``.

    ``L_vlb`` is estimated as ``T L_t`` for the sampled ``t``, so the VLB part is
    ``vlb_weight * T * vlb_term(...)``: for ``T = 1000`` and ``lambda = 0.001`` this is
    improved-diffusion's ``RESCALED_MSE`` weighting. The model must return ``(B, 2C, ...)``
    with a ``learned_range`` variance; the VLB only trains the variance half.
    """
    schedule = check_schedule("schedule", schedule)
    w = check_float("vlb_weight", vlb_weight, min=0.0)
    check_tensor("x0", x0, floating=True, min_ndim=2)
    check_tensor("model_output", model_output, floating=True, min_ndim=2)
    C = x0.shape[1]
    target = training_target(schedule, x0, noise, t, prediction)
    simple = denoising_loss(model_output[:, :C], target)
    vlb = vlb_term(schedule, model_output, x0, x_t, t, prediction=prediction)
    return simple + w * len(schedule) * vlb
