"""Samplers on one contract: :class:`Sampler` (any state), :class:`DenoisingSampler` (one model call
per step), :class:`DDPM` and :class:`DDIM` (with :meth:`DDIM.invert`), :class:`EDICT`; any loop can be
recorded as a CUDA graph (:class:`CUDAGraphSampling`)."""

from imgdiff.models import BoundModel
from imgdiff.samplers.base import Sampler
from imgdiff.samplers.ddim import DDIM, DDIMCoefficients
from imgdiff.samplers.ddpm import DDPM, VARIANCE_TYPES, DDPMCoefficients, VarianceType
from imgdiff.samplers.denoising import DenoiserCoefficients, DenoisingSampler, fused_coefficients
from imgdiff.samplers.edict import EDICT, EDICTCoefficients, EDICTState
from imgdiff.samplers.graphs import CUDAGraphSampling
from imgdiff.samplers.step import (
    Callback,
    Scalar,
    StepCoefficients,
    StepContext,
    StepInfo,
    StepNoise,
    StepOutput,
)

__all__ = [
    "DDIM",
    "DDPM",
    "EDICT",
    "VARIANCE_TYPES",
    "BoundModel",
    "CUDAGraphSampling",
    "Callback",
    "DDIMCoefficients",
    "DDPMCoefficients",
    "DenoiserCoefficients",
    "DenoisingSampler",
    "EDICTCoefficients",
    "EDICTState",
    "Sampler",
    "Scalar",
    "StepCoefficients",
    "StepContext",
    "StepInfo",
    "StepNoise",
    "StepOutput",
    "VarianceType",
    "fused_coefficients",
]
