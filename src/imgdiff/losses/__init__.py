"""Training losses. ``imgdiff.losses.denoising``: L_simple, min-SNR weights, improved DDPM's hybrid VLB."""

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
