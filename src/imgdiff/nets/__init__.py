"""Small reference networks for examples, tests and small experiments (not a model zoo)."""

from imgdiff.nets.attention import CrossAttention, SpatialAttention
from imgdiff.nets.diffusers_adapter import DiffusersUNet
from imgdiff.nets.embeddings import TimestepEmbedding, sinusoidal_embedding
from imgdiff.nets.palette_embedding import LAB_SCALE, PALETTE_SIZE, PaletteEmbedding
from imgdiff.nets.unet import NOISE_CONDITIONINGS, NoiseConditioning, UNet, UNetConfig

__all__ = [
    "LAB_SCALE",
    "NOISE_CONDITIONINGS",
    "PALETTE_SIZE",
    "CrossAttention",
    "DiffusersUNet",
    "NoiseConditioning",
    "PaletteEmbedding",
    "SpatialAttention",
    "TimestepEmbedding",
    "UNet",
    "UNetConfig",
    "sinusoidal_embedding",
]
