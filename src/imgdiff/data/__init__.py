"""Data sets that ship with imgdiff (generated, nothing to download)."""

from imgdiff.data.toy import SHAPE_NAMES, toy_shapes

__all__ = ["SHAPE_NAMES", "toy_shapes"]
