"""Losses.

* ``imgdiff.losses.denoising``: training losses (L_simple, min-SNR weights, improved DDPM's hybrid VLB);
* ``imgdiff.losses.clip``: CLIP global and directional losses, with ZeCon's augmentations
  (``imgdiff.losses.augment``);
* ``imgdiff.losses.contrastive``: ZeCon's zero-shot contrastive (PatchNCE) content loss;
* ``imgdiff.losses.perceptual``: LPIPS, VGG feature loss, MSE, range loss.

Guidance by these losses: :class:`imgdiff.LossGuidance`.
"""

from imgdiff.losses.augment import CLIPAugment
from imgdiff.losses.clip import (
    CLIPDirectionalLoss,
    CLIPGlobalLoss,
    ClipMetric,
    DirectionalVariant,
    Reduction,
    cosine_distance,
    diffusionclip_transform,
    directional_loss,
    spherical_distance,
)
from imgdiff.losses.contrastive import (
    ZECON_LAYERS,
    FeatureExtractor,
    UNetEncoderFeatures,
    ZeroShotContrastiveLoss,
    patch_nce_loss,
    sample_shared_patches,
)
from imgdiff.losses.denoising import (
    LOSS_NORMS,
    MASK_NORMALIZATIONS,
    LossNorm,
    MaskNormalization,
    denoising_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    masked_denoising_loss,
    min_snr_weight,
    min_snr_weight_from_alpha_bar,
    normal_kl,
    vlb_term,
)
from imgdiff.losses.perceptual import (
    LPIPSLoss,
    VGGFeatureLoss,
    VGGFeatures,
    mse_loss,
    range_loss,
)

__all__ = [
    "LOSS_NORMS",
    "MASK_NORMALIZATIONS",
    "ZECON_LAYERS",
    "CLIPAugment",
    "CLIPDirectionalLoss",
    "CLIPGlobalLoss",
    "ClipMetric",
    "DirectionalVariant",
    "FeatureExtractor",
    "LPIPSLoss",
    "LossNorm",
    "MaskNormalization",
    "Reduction",
    "UNetEncoderFeatures",
    "VGGFeatureLoss",
    "VGGFeatures",
    "ZeroShotContrastiveLoss",
    "cosine_distance",
    "denoising_loss",
    "diffusionclip_transform",
    "directional_loss",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "masked_denoising_loss",
    "min_snr_weight",
    "min_snr_weight_from_alpha_bar",
    "mse_loss",
    "normal_kl",
    "patch_nce_loss",
    "range_loss",
    "sample_shared_patches",
    "spherical_distance",
    "vlb_term",
]
