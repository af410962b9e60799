"""Evaluation metrics. ``imgdiff.metrics.quality``: PSNR and SSIM."""

from imgdiff.metrics.quality import psnr, ssim

__all__ = ["psnr", "ssim"]
