"""Feature extractors' outputs and layer choices, shared by the contrastive loss (internal)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from imgdiff._checks import check_int, describe
from imgdiff.errors import InputTypeError, InputValueError

FeatureExtractor = Callable[[Tensor], Sequence[Tensor]]
"""An image ``(B, 3, H, W)`` to a list of feature maps ``(B, C_l, h_l, w_l)`` (shallow to deep).

:class:`UNetEncoderFeatures` is one; a VGG stack returning its chosen activations is another;
any callable of this shape works."""


def check_layers(name: str, layers: object) -> tuple[int, ...] | None:
    """``None`` or a non-empty sequence of distinct ints >= 0, returned as a tuple."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes, Tensor)) or not isinstance(layers, Sequence):
        raise InputTypeError(
            f"{name}: expected None or a sequence of layer indices, got {describe(layers)}"
        )
    out = tuple(check_int(f"{name}[{i}]", v, min=0) for i, v in enumerate(layers))
    if not out:
        raise InputValueError(f"{name}: expected at least one layer index, got an empty sequence")
    if len(set(out)) != len(out):
        raise InputValueError(f"{name}: expected distinct layer indices, got {out}")
    return out


def select_layers(name: str, maps: list[Tensor], layers: tuple[int, ...] | None) -> list[Tensor]:
    if layers is None:
        return maps
    for index in layers:
        if index >= len(maps):
            raise InputValueError(
                f"{name}: layer index {index} is out of range for the {len(maps)} feature maps "
                f"the extractor returned (indices 0 to {len(maps) - 1})"
            )
    return [maps[i] for i in layers]


def feature_list(name: str, out: object, batch: int) -> list[Tensor]:
    """Check that an extractor returned a non-empty list/tuple of ``(B, C, h, w)`` tensors."""
    if not isinstance(out, (list, tuple)):
        raise InputTypeError(
            f"{name}: expected it to return a list or tuple of feature maps (B, C, h, w), "
            f"got {describe(out)}"
        )
    if not out:
        raise InputValueError(f"{name}: returned no feature maps, expected at least one")
    maps: list[Tensor] = []
    for i, f in enumerate(out):
        if not isinstance(f, Tensor):
            raise InputTypeError(
                f"{name}: expected feature map {i} to be a torch.Tensor, got {describe(f)}"
            )
        if f.ndim != 4 or f.shape[0] != batch or not f.dtype.is_floating_point:
            raise InputValueError(
                f"{name}: expected feature map {i} to be a floating (B, C, h, w) tensor with "
                f"B = {batch}, got {describe(f)}"
            )
        maps.append(f)
    return maps
