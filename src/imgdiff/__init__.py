"""imgdiff: diffusion building blocks for image-to-image research.

Ten lines to an image::

    import torch, imgdiff
    schedule = imgdiff.NoiseSchedule.linear()
    model = imgdiff.GaussianDenoiser(schedule)          # or your network: model(x, t) -> eps
    sampler = imgdiff.DDIM(schedule, eta=0.0)
    x = sampler.sample(model, torch.randn(4, 3, 32, 32), num_steps=50)

``import imgdiff`` loads torch, numpy and nothing heavier; optional parts (diffusers, CLIP,
LPIPS) are imported only when used.
"""

from imgdiff import conditioning, data, degradations, kernels, losses, metrics, nets, training
from imgdiff.conditioning import ClassifierFreeGuidance
from imgdiff.editing import edict_edit
from imgdiff.errors import (
    GraphCaptureError,
    ImgdiffError,
    ImgdiffWarning,
    InputTypeError,
    InputValueError,
    PerformanceWarning,
    PrecisionWarning,
    WeightsUnavailableError,
)
from imgdiff.guidance import ClassifierGuidance, Guidance, ModelGuidance
from imgdiff.loss_guidance import GuidanceInputs, LossGuidance, LossTerm
from imgdiff.models import BoundModel, Model, infer_model_dtype, without_variance
from imgdiff.noising import add_noise, training_target
from imgdiff.oracles import EmpiricalDenoiser, GaussianDenoiser
from imgdiff.prediction import PredictionType, convert_prediction
from imgdiff.randomness import Generators, randn
from imgdiff.samplers import (
    DDIM,
    DDPM,
    EDICT,
    DenoisingSampler,
    Sampler,
    StepCoefficients,
    StepContext,
    StepInfo,
    StepOutput,
)
from imgdiff.schedules import NoiseSchedule, karras_sigmas, sigma_to_timestep
from imgdiff.thresholding import Clip, DynamicThreshold, Thresholding
from imgdiff.timesteps import (
    SamplingPlan,
    Spacing,
    inference_timesteps,
    respace_timesteps,
    respaced_betas,
)
from imgdiff.zecon import ZeConConfig, zecon_edit

__version__ = "0.1.0.dev0"

__all__ = [
    "DDIM",
    "DDPM",
    "EDICT",
    "BoundModel",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "Clip",
    "DenoisingSampler",
    "DynamicThreshold",
    "EmpiricalDenoiser",
    "GaussianDenoiser",
    "Generators",
    "GraphCaptureError",
    "Guidance",
    "GuidanceInputs",
    "ImgdiffError",
    "ImgdiffWarning",
    "InputTypeError",
    "InputValueError",
    "LossGuidance",
    "LossTerm",
    "Model",
    "ModelGuidance",
    "NoiseSchedule",
    "PerformanceWarning",
    "PrecisionWarning",
    "PredictionType",
    "Sampler",
    "SamplingPlan",
    "Spacing",
    "StepCoefficients",
    "StepContext",
    "StepInfo",
    "StepOutput",
    "Thresholding",
    "WeightsUnavailableError",
    "ZeConConfig",
    "__version__",
    "add_noise",
    "conditioning",
    "convert_prediction",
    "data",
    "degradations",
    "edict_edit",
    "infer_model_dtype",
    "inference_timesteps",
    "karras_sigmas",
    "kernels",
    "losses",
    "metrics",
    "nets",
    "randn",
    "respace_timesteps",
    "respaced_betas",
    "sigma_to_timestep",
    "training",
    "training_target",
    "without_variance",
    "zecon_edit",
]
