"""A diffusion U-Net's encoder at the clean noise level as a feature extractor (ZeCon, spec 7.5)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_float, check_int, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.losses._features import check_layers, feature_list
from imgdiff.nets.unet import NOISE_CONDITIONINGS, NoiseConditioning

__all__ = ["ZECON_LAYERS", "EncoderNetwork", "UNetEncoderFeatures"]

ZECON_LAYERS: tuple[int, ...] = (0, 2, 5, 8, 11)
"""Indices of the U-Net input blocks whose outputs ZeCon compares (guided-diffusion's 256x256
ImageNet model has 18 input blocks; spec 7.5)."""


class EncoderNetwork(Protocol):
    """A network with an encoder-only pass, such as :class:`imgdiff.nets.UNet`.

    ``encoder_features(x, t, **conditions)`` takes the network input ``(B, C_in, H, W)`` and the
    noise input ``t`` ``(B,)`` and returns the encoder's feature maps, shallow to deep.
    """

    def encoder_features(self, x: Tensor, t: Tensor, /) -> Sequence[Tensor]: ...


# ----------------------------------------------------------------------------------------------
# The U-Net encoder as a feature extractor


@dataclass(frozen=True, eq=False)
class UNetEncoderFeatures:
    """A diffusion U-Net's encoder at the clean noise level, as a :data:`FeatureExtractor`.

    ``extractor(x)`` for images ``x`` ``(B, C, H, W)`` runs ``net.encoder_features(net_input, t,
    **conditions)`` with the same ``t`` for every sample and returns the maps in ``layers``
    (``(B, C_l, h_l, w_l)`` each). ZeCon evaluates the encoder (input blocks only) at timestep 0,
    whatever the current sampling step, and keeps input blocks ``(0, 2, 5, 8, 11)`` (Yang et al.
    2023, Sec. 3; spec 7.5 step 1).

    Attributes:
        net: an :class:`imgdiff.nets.UNet` or any object with ``encoder_features(x, t,
            **conditions) -> list of maps``. The extractor changes no state of it: call
            ``net.requires_grad_(False)`` and ``net.eval()`` yourself for guidance.
        layers: indices into the encoder's maps. ``None`` (default): ZeCon's
            :data:`ZECON_LAYERS` ``(0, 2, 5, 8, 11)``, keeping only those the encoder has -- the
            reference :class:`~imgdiff.nets.UNet` has ``len(net.encoder_channels)`` maps (the
            input convolution, then each down block; 6 with the default config), far fewer than
            guided-diffusion's 18 input blocks, so the deeper indices are dropped; if none is
            left, an error. Explicit indices must all exist.
        t: the noise input for every sample. ``None`` (default): the clean end of the net's
            scale, ZeCon's "timestep 0": int64 zeros for ``noise_conditioning == "timestep"``;
            for ``"gamma"`` nets (input ``gamma = alpha_bar`` in [0, 1], Palette) the float
            ``1.0``, since ``gamma = alpha_bar_0 ~ 1`` is t = 0 (pass e.g. ``0.9999``, the linear
            schedule's ``alpha_bar_0``, to match exactly). An int is a timestep, a float a gamma.
        noise_conditioning: ``"timestep"`` or ``"gamma"``; ``None``: read
            ``net.config.noise_conditioning``, else ``"timestep"``.
        conditions: extra keyword arguments of ``encoder_features`` (e.g. ``class_labels``
            ``(B,)``), passed unchanged to both the ``x`` and the ``y`` call.
        concat: for channel-concatenation nets (Palette/SR3: ``in_channels = C_cond + C_x``) a
            fixed ``(B, C_cond, H, W)`` condition; the net sees ``cat([concat, x], dim=1)``
            (condition first, spec 8.1).
        prepare: instead of ``concat``, any ``x -> net input`` function (e.g. a different channel
            order). At most one of ``concat`` and ``prepare``.
    """

    net: EncoderNetwork
    layers: tuple[int, ...] | None = None
    t: int | float | None = None
    noise_conditioning: NoiseConditioning | None = None
    conditions: Mapping[str, Any] = field(default_factory=dict)
    concat: Tensor | None = None
    prepare: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not callable(getattr(self.net, "encoder_features", None)):
            raise InputTypeError(
                f"net: expected a network with an encoder_features(x, t, **conditions) method "
                f"(e.g. imgdiff.nets.UNet), got {describe(self.net)}"
            )
        layers = check_layers("layers", self.layers)
        requested: object = self.noise_conditioning
        if requested is None:
            found = getattr(getattr(self.net, "config", None), "noise_conditioning", None)
            requested = found if isinstance(found, str) else "timestep"
        mode = check_choice("noise_conditioning", requested, NOISE_CONDITIONINGS)
        object.__setattr__(self, "noise_conditioning", mode)
        if self.t is not None:
            if mode == "timestep":
                check_int("t", self.t, min=0)
            else:
                check_float("t", self.t, min=0.0, max=1.0)
        if not isinstance(self.conditions, Mapping) or not all(
            isinstance(k, str) for k in self.conditions
        ):
            raise InputTypeError(
                f"conditions: expected a mapping of keyword names to values, "
                f"got {describe(self.conditions)}"
            )
        if self.concat is not None:
            check_tensor("concat", self.concat, ndim=4, floating=True)
        if self.prepare is not None and not callable(self.prepare):
            raise InputTypeError(f"prepare: expected a callable, got {describe(self.prepare)}")
        if self.concat is not None and self.prepare is not None:
            raise InputValueError("concat, prepare: expected at most one of them, got both")
        channels = getattr(self.net, "encoder_channels", None)
        if isinstance(channels, tuple):
            layers = self._resolve(layers, len(channels))
        object.__setattr__(self, "layers", layers)

    def _resolve(self, layers: tuple[int, ...] | None, num_maps: int) -> tuple[int, ...]:
        if layers is None:
            kept = tuple(i for i in ZECON_LAYERS if i < num_maps)
            if not kept:
                raise InputValueError(
                    f"layers: none of ZeCon's layers {ZECON_LAYERS} exists in an encoder with "
                    f"{num_maps} feature maps; pass layers explicitly"
                )
            return kept
        for index in layers:
            if index >= num_maps:
                raise InputValueError(
                    f"layers: layer index {index} is out of range for an encoder with {num_maps} "
                    f"feature maps (indices 0 to {num_maps - 1})"
                )
        return layers

    def timesteps(self, x: Tensor) -> Tensor:
        """The ``(B,)`` noise input given to the net with images ``x`` ``(B, ...)``."""
        B = x.shape[0]
        if self.noise_conditioning == "gamma":
            level = 1.0 if self.t is None else float(self.t)
            dtype = torch.promote_types(x.dtype, torch.float32)
            return torch.full((B,), level, dtype=dtype, device=x.device)
        step = 0 if self.t is None else int(self.t)
        return torch.full((B,), step, dtype=torch.int64, device=x.device)

    def net_input(self, x: Tensor) -> Tensor:
        """``x``, ``cat([concat, x], dim=1)`` or ``prepare(x)``."""
        if self.prepare is not None:
            out = self.prepare(x)
            if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0]:
                raise InputValueError(
                    f"prepare: expected it to return a (B, C, H, W) tensor with B = "
                    f"{x.shape[0]}, got {describe(out)}"
                )
            return out
        if self.concat is not None:
            c = self.concat
            if c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
                raise InputValueError(
                    f"concat: expected shape ({x.shape[0]}, C, {x.shape[2]}, {x.shape[3]}) to "
                    f"match the images, got {tuple(c.shape)}"
                )
            return torch.cat([c.to(device=x.device, dtype=x.dtype), x], dim=1)
        return x

    def __call__(self, x: Tensor) -> list[Tensor]:
        """The selected encoder maps of ``x`` ``(B, C, H, W)``: a list of ``(B, C_l, h_l, w_l)``.

        The net's input is cast to the dtype of its parameters (differentiably), so a float64
        or half sampler state works with a float32 or bf16 network.
        """
        check_tensor("x", x, ndim=4, floating=True)
        inp = self.net_input(x)
        in_channels = getattr(getattr(self.net, "config", None), "in_channels", None)
        if isinstance(in_channels, int) and inp.shape[1] != in_channels:
            raise InputValueError(
                f"x: the net expects {in_channels} input channels (config.in_channels), got "
                f"{inp.shape[1]}; for a channel-concatenation net give concat or prepare"
            )
        param = next(iter(getattr(self.net, "parameters", lambda: iter(()))()), None)
        if isinstance(param, Tensor) and param.dtype.is_floating_point and inp.dtype != param.dtype:
            inp = inp.to(param.dtype)  # e.g. a float64 sampler state into a float32 or bf16 net
        encode = cast(Callable[..., object], self.net.encoder_features)
        out = encode(inp, self.timesteps(x), **self.conditions)
        maps = feature_list("net.encoder_features", out, x.shape[0])
        return [maps[i] for i in self._resolve(self.layers, len(maps))]
