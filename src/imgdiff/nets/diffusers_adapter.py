"""Use a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` as an imgdiff model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from imgdiff._checks import check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.nets.attention import check_context

__all__ = ["DiffusersUNet"]


@dataclass(frozen=True, eq=False)
class DiffusersUNet:
    """``model(x, t, context=..., class_labels=..., **rest) -> unet(x, t, ...).sample``.

    ``context`` ``(B, L, d)`` becomes ``encoder_hidden_states`` (required by
    ``UNet2DConditionModel``); ``class_labels`` and any other keyword arguments are passed through.
    Shapes: ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``; returns ``(B, C_out, H, W)`` (``2C`` for a
    learned-variance checkpoint: use ``DDPM(variance="learned_range")`` or
    :func:`imgdiff.without_variance`). diffusers is imported only by the caller.
    """

    unet: nn.Module

    def __post_init__(self) -> None:
        if not isinstance(self.unet, nn.Module):
            raise InputTypeError(
                f"unet: expected a diffusers UNet (torch.nn.Module), got {describe(self.unet)}"
            )

    @property
    def model(self) -> nn.Module:
        """The wrapped network (lets imgdiff find its dtype)."""
        return self.unet

    @property
    def takes_context(self) -> bool:
        """Whether the UNet has cross-attention (its config names a ``cross_attention_dim``, as
        ``UNet2DConditionModel``'s and its subclasses' do)."""
        return _cross_attention_dim(self.unet) is not None

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The UNet's ``.sample`` at ``(x, t)``."""
        check_tensor("x", x, min_ndim=2, floating=True)
        context = cond.pop("context", None)
        dim = _cross_attention_dim(self.unet)
        if dim is not None:
            if context is None:
                raise InputValueError(
                    f"context: expected (B, L, d) text embeddings for a {type(self.unet).__name__} "
                    "with cross-attention, got None"
                )
            # an int width is checked here; per-block widths (a tuple) are diffusers' to check
            cond["encoder_hidden_states"] = check_context(
                context, x, dim if isinstance(dim, int) else None
            )
        elif context is not None:
            raise InputValueError(
                f"context: {type(self.unet).__name__} has no cross-attention; got a context"
            )
        out = self.unet(x, t, **cond)
        sample = getattr(out, "sample", out)
        if not isinstance(sample, Tensor):
            raise InputTypeError(
                f"unet output: expected a tensor or an object with .sample, got {describe(out)}"
            )
        return sample


def _cross_attention_dim(unet: nn.Module) -> object:
    """``config.cross_attention_dim`` of a diffusers UNet (an int, or a tuple per block), if any."""
    config = getattr(unet, "config", None)
    dim = config.get("cross_attention_dim") if isinstance(config, dict) else None
    if dim is None:
        dim = getattr(config, "cross_attention_dim", None)
    return dim
