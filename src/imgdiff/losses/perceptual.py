"""Perceptual and content losses for guidance and training: LPIPS, VGG features, MSE, range loss.

LPIPS lives in :mod:`imgdiff.losses.lpips_loss` and the VGG features in
:mod:`imgdiff.losses.vgg_features`; both are re-exported here with the pixel losses.

* :class:`LPIPSLoss` — LPIPS (Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable
  Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) through the ``lpips``
  package, as a frozen, differentiable loss (spec 9.3, 7.6).
* :class:`VGGFeatures` / :class:`VGGFeatureLoss` — the VGG content loss of ZeCon (Yang, Hwang, Ye,
  "Zero-Shot Contrastive Loss for Text-Guided Diffusion Image Style Transfer", ICCV 2023):
  ``Σ_layers mean((F(y) − F(x))²)`` over torchvision VGG19 ``features`` modules 0 and 5
  (conv1_1, conv2_1) after ImageNet normalisation (spec 7.6).
* :func:`mse_loss` and :func:`range_loss` — ZeCon's pixel MSE and the range penalty on the raw
  x̂0 (weighted by ``range_lambda = 50`` in ZeCon; spec 7.6).

Images are ``(B, 3, H, W)`` floating tensors in [-1, 1] unless ``input_range`` says otherwise.
Values are not range-checked (a guidance x̂0 may overshoot [-1, 1]); shapes and dtypes are.

Pretrained backbones are torchvision's ImageNet weights, found by
:mod:`imgdiff.losses._torchvision_weights`: ``weights_path=`` (a file), else the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``), else a download unless offline; otherwise a
:class:`~imgdiff.errors.WeightsUnavailableError` says what was looked for and how to provide it.
``pretrained=False`` gives random weights (tests). ``lpips`` and ``torchvision`` (the
``perceptual`` extra) are imported only when an :class:`LPIPSLoss` is built.
"""

from __future__ import annotations

from torch import Tensor

from imgdiff._checks import check_same_shape, check_tensor
from imgdiff.errors import InputValueError
from imgdiff.losses.lpips_loss import LPIPS_NETS, LPIPSLoss, LPIPSNet
from imgdiff.losses.vgg_features import (
    VGG_ARCHS,
    VGG_INPUT_RANGES,
    VGGArch,
    VGGFeatureLoss,
    VGGFeatures,
    VGGInputRange,
)

__all__ = [
    "LPIPS_NETS",
    "VGG_ARCHS",
    "VGG_INPUT_RANGES",
    "LPIPSLoss",
    "LPIPSNet",
    "VGGArch",
    "VGGFeatureLoss",
    "VGGFeatures",
    "VGGInputRange",
    "mse_loss",
    "range_loss",
]


def mse_loss(x: Tensor, y: Tensor) -> Tensor:
    """``mean((x − y)²)`` over every element, a scalar (ZeCon's ``l_mse`` term; spec 7.6).

    ``x`` and ``y``: floating tensors of the same shape (no broadcasting).
    """
    check_tensor("x", x, floating=True)
    check_tensor("y", y, floating=True)
    check_same_shape("y", y, "x", x)
    if x.numel() == 0:
        raise InputValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    return (x - y).square().mean()


def range_loss(x0_hat: Tensor) -> Tensor:
    """``Σ_b mean((x̂0_b − clamp(x̂0_b, −1, 1))²)``: the range penalty on the raw x̂0 (spec 7.6).

    Per image the mean squared excess over [-1, 1] (zero inside), summed over the batch, as in
    ZeCon (Yang et al. 2023) and blended diffusion, which weight it by ``range_lambda = 50``.
    ``x0_hat``: a floating ``(B, ...)`` tensor (``(B, C, H, W)`` for images); returns a scalar.
    """
    check_tensor("x0_hat", x0_hat, min_ndim=2, floating=True)
    if x0_hat.numel() == 0:
        raise InputValueError(
            f"x0_hat: expected a non-empty tensor, got shape {tuple(x0_hat.shape)}"
        )
    excess = x0_hat - x0_hat.clamp(-1, 1)
    return excess.square().reshape(x0_hat.shape[0], -1).mean(dim=1).sum()
