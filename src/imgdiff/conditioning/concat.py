"""Channel concatenation (SR3, Palette): the condition image is stacked with the noisy sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_device, check_int, check_same_shape, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model

__all__ = ["ConcatConditioning", "sd_inpaint_input"]


@dataclass(frozen=True, eq=False)
class ConcatConditioning:
    """``model(x_t, t, source=s, **rest) = net(cat([s, x_t], dim=1), t, **rest)`` (source first).

    Palette and SR3 feed the network the source image concatenated channel-wise *before* the
    noisy target (Palette: 3 + 3 = 6 input channels, spec 8.1); the order is part of a trained
    network's contract and is fixed here. ``source`` ``(B, C_s, H, W)`` must match ``x_t``
    ``(B, C, H, W)`` in batch and size; with ``source_channels`` set, ``C_s`` is checked too.
    """

    net: Model
    key: str = "source"
    source_channels: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.net):
            raise InputTypeError(f"net: expected a callable network, got {describe(self.net)}")
        if not isinstance(self.key, str) or not self.key:
            raise InputTypeError(
                f"key: expected the keyword name of the condition image (a non-empty str), "
                f"got {describe(self.key)}"
            )
        if self.source_channels is not None:
            check_int("source_channels", self.source_channels, min=1)

    @property
    def model(self) -> Model:
        """The wrapped network (lets imgdiff find its dtype)."""
        return self.net

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The network's output for ``(cat([source, x]), t)``, shape ``(B, C_out, H, W)``."""
        x = check_tensor("x", x, ndim=4, floating=True)
        if self.key not in cond:
            raise InputValueError(
                f"{self.key}: expected the condition image as keyword '{self.key}', got none"
            )
        source = check_tensor(self.key, cond.pop(self.key), ndim=4, floating=True)
        expected = (x.shape[0], self.source_channels or source.shape[1], *x.shape[2:])
        if tuple(source.shape) != expected:
            raise InputValueError(
                f"{self.key}: expected shape {expected} to match the sample {tuple(x.shape)}"
                f"{'' if self.source_channels is None else f' with {self.source_channels} channels'}, "
                f"got {tuple(source.shape)}"
            )
        out: Tensor = self.net(
            torch.cat([source.to(device=x.device, dtype=x.dtype), x], dim=1), t, **cond
        )
        return out


def sd_inpaint_input(latents: Tensor, mask: Tensor, masked_image_latents: Tensor) -> Tensor:
    """Stable Diffusion inpainting's 9-channel UNet input: ``cat([z_t (4), mask (1), masked latents (4)])``.

    ``latents`` and ``masked_image_latents`` ``(B, 4, h, w)``; ``mask`` ``(B, 1, h, w)`` at the latent
    resolution, 1 = repaint (spec 8.1). Returns ``(B, 9, h, w)`` with the mask at channel 4. Under
    classifier-free guidance all three are duplicated with the batch.
    """
    check_tensor("latents", latents, ndim=4, floating=True)
    check_tensor("mask", mask, ndim=4, floating=True)
    check_tensor("masked_image_latents", masked_image_latents, ndim=4, floating=True)
    B, _, h, w = latents.shape
    if tuple(mask.shape) != (B, 1, h, w):
        raise InputValueError(
            f"mask: expected shape {(B, 1, h, w)} (latent resolution), got {tuple(mask.shape)}"
        )
    check_same_shape("masked_image_latents", masked_image_latents, "latents", latents)
    check_device("mask", mask, "latents", latents)
    return torch.cat(
        [latents, mask.to(latents.dtype), masked_image_latents.to(latents.dtype)], dim=1
    )
