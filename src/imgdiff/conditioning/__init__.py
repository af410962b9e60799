"""Conditioning adapters: wrappers that turn a network plus a condition into imgdiff's model contract."""

from imgdiff.conditioning.cfg import ClassifierFreeGuidance, rescale_guidance

__all__ = ["ClassifierFreeGuidance", "rescale_guidance"]
