"""Samplers on one contract: :class:`Sampler` (any state), :class:`DenoisingSampler` (one model call
per step), :class:`DDPM` and :class:`DDIM` (with :meth:`DDIM.invert`)."""

from imgdiff.samplers.base import (
    BoundModel,
    Callback,
    Sampler,
    StepCoefficients,
    StepInfo,
    StepNoise,
    StepOutput,
)
from imgdiff.samplers.ddim import DDIM, DDIMCoefficients
from imgdiff.samplers.ddpm import DDPM, VARIANCE_TYPES, DDPMCoefficients, VarianceType
from imgdiff.samplers.denoising import DenoiserCoefficients, DenoisingSampler

__all__ = [
    "DDIM",
    "DDPM",
    "VARIANCE_TYPES",
    "BoundModel",
    "Callback",
    "DDIMCoefficients",
    "DDPMCoefficients",
    "DenoiserCoefficients",
    "DenoisingSampler",
    "Sampler",
    "StepCoefficients",
    "StepInfo",
    "StepNoise",
    "StepOutput",
    "VarianceType",
]
