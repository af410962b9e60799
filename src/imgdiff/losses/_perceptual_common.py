"""Shared checks of the perceptual losses (internal): optional imports, image pairs, freezing."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal, get_args

from torch import Tensor, nn

from imgdiff._checks import check_same_shape, check_tensor
from imgdiff.errors import InputValueError

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def import_optional(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - the dev environment has both
        raise ImportError(
            f"{what} needs lpips and torchvision: pip install 'imgdiff[perceptual]'"
        ) from exc


def check_image_pair(
    x: object, y: object, *, min_size: int, reference: Tensor, what: str
) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as ``(B, 3, H, W)`` floating tensors of one shape, on the network's device,
    cast to its dtype (``reference`` is one of its parameters), at least ``min_size`` high and wide."""
    xt = check_image("x", x, min_size=min_size, reference=reference, what=what)
    yt = check_image("y", y, min_size=min_size, reference=reference, what=what)
    check_same_shape("y", yt, "x", xt)
    return xt, yt


def check_image(name: str, value: object, *, min_size: int, reference: Tensor, what: str) -> Tensor:
    t = check_tensor(name, value, ndim=4, floating=True)
    if t.shape[1] != 3:
        raise InputValueError(
            f"{name}: expected an RGB image batch of shape (B, 3, H, W), got {t.shape[1]} "
            f"channels (shape {tuple(t.shape)})"
        )
    if t.shape[0] == 0:
        raise InputValueError(f"{name}: expected a non-empty batch, got shape {tuple(t.shape)}")
    if t.shape[2] < min_size or t.shape[3] < min_size:
        raise InputValueError(
            f"{name}: {what} needs images at least {min_size}x{min_size}, got shape "
            f"{tuple(t.shape)}"
        )
    if t.device != reference.device:
        raise InputValueError(
            f"{name}: on {t.device}, but the {what} network is on {reference.device}; "
            "move one of them with .to(device)"
        )
    # a sampler's state may be float64 or half while the network is float32: cast (differentiably)
    return t if t.dtype == reference.dtype else t.to(reference.dtype)


def freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()
