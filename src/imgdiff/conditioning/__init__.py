"""Conditioning adapters: wrappers that turn a network plus a condition into imgdiff's model contract."""

from imgdiff.conditioning.cfg import ClassifierFreeGuidance, rescale_guidance
from imgdiff.conditioning.concat import ConcatConditioning, sd_inpaint_input
from imgdiff.conditioning.dropout import drop_conditions
from imgdiff.conditioning.masks import PASTE_MODES, KnownRegion, PasteMode, check_mask
from imgdiff.conditioning.noise_level import NoiseLevelConditioning
from imgdiff.conditioning.palette import (
    PaletteEmbedding,
    extract_palette,
    lab_to_rgb,
    rgb_to_lab,
    tile_palette,
)
from imgdiff.conditioning.text import TextConditioning

__all__ = [
    "PASTE_MODES",
    "ClassifierFreeGuidance",
    "ConcatConditioning",
    "KnownRegion",
    "NoiseLevelConditioning",
    "PaletteEmbedding",
    "PasteMode",
    "TextConditioning",
    "check_mask",
    "drop_conditions",
    "extract_palette",
    "lab_to_rgb",
    "rescale_guidance",
    "rgb_to_lab",
    "sd_inpaint_input",
    "tile_palette",
]
