"""VGG feature maps and the VGG content loss of ZeCon (Yang, Hwang, Ye, ICCV 2023; spec 7.6).

``Σ_layers mean((F(y) − F(x))²)`` over torchvision VGG19 ``features`` modules (default 0 and 5,
conv1_1 and conv2_1) after ImageNet normalisation. Pretrained weights are found by
:mod:`imgdiff.losses._torchvision_weights`; ``pretrained=False`` gives random weights (tests).
``torchvision`` is imported only when a :class:`VGGFeatures` is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from imgdiff._checks import check_bool, check_choice, check_same_shape, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError
from imgdiff.losses._perceptual_common import (
    check_image,
    freeze,
)
from imgdiff.losses._torchvision_weights import load_backbone_state_dict, resolve_offline

__all__ = [
    "VGG_ARCHS",
    "VGG_INPUT_RANGES",
    "VGGArch",
    "VGGFeatureLoss",
    "VGGFeatures",
    "VGGInputRange",
]

VGGArch = Literal["vgg19", "vgg16"]
"""The torchvision VGG whose ``features`` :class:`VGGFeatures` runs (ZeCon: VGG19)."""
VGG_ARCHS: tuple[VGGArch, ...] = get_args(VGGArch)

VGGInputRange = Literal["[-1,1]", "[0,1]", "zecon"]
"""How :class:`VGGFeatures` reads its input before the ImageNet normalisation: ``"[-1,1]"`` maps
``(x + 1) / 2`` first, ``"[0,1]"`` takes ``x`` as is, ``"zecon"`` feeds a [-1, 1] image straight
into the normalisation, as ZeCon's code does (spec 7.6)."""
VGG_INPUT_RANGES: tuple[VGGInputRange, ...] = get_args(VGGInputRange)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.models.vgg.cfgs "D" (VGG16) and "E" (VGG19): conv widths, "M" = 2x2 max pool.
_VGG_CFGS: dict[VGGArch, str] = {
    "vgg16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "vgg19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}


def _vgg_layout(arch: VGGArch) -> list[tuple[str, int, int]]:
    """torchvision's VGG ``features`` as (kind, in, out) per module; kind conv / relu / pool."""
    layout: list[tuple[str, int, int]] = []
    channels = 3
    for v in _VGG_CFGS[arch].split():
        if v == "M":
            layout.append(("pool", channels, channels))
        else:
            layout += [("conv", channels, int(v)), ("relu", int(v), int(v))]
            channels = int(v)
    return layout


def _vgg_layer_names(arch: VGGArch) -> list[str]:
    """``conv1_1, relu1_1, conv1_2, ..., pool1, conv2_1, ...`` for each module index."""
    names: list[str] = []
    block, conv = 1, 0
    for kind, _, _ in _vgg_layout(arch):
        if kind == "pool":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        elif kind == "conv":
            conv += 1
            names.append(f"conv{block}_{conv}")
        else:
            names.append(f"relu{block}_{conv}")
    return names


class VGGFeatures(nn.Module):
    """Outputs of chosen modules of torchvision's VGG ``features`` (ZeCon's VGG loss; spec 7.6).

    The input goes through ImageNet normalisation ``(x' − mean) / std`` (mean 0.485/0.456/0.406,
    std 0.229/0.224/0.225) with ``x'`` from ``input_range``: ``"[-1,1]"`` (default)
    ``x' = (x + 1) / 2``; ``"[0,1]"`` ``x' = x``; ``"zecon"`` ``x' = x`` for a [-1, 1] image, as
    ZeCon's code does (Yang et al. 2023). The stack is torchvision's ``features`` layout (module
    indices as in ``torchvision.models.vgg19().features``), truncated after the largest requested
    index; its ReLUs are not in place, so a tapped conv output stays pre-ReLU.

    Args:
        layers: module indices to return, in this order (default ``(0, 5)``: conv1_1 and conv2_1,
            pre-ReLU, ZeCon's choice). See :attr:`layer_names`.
        arch: ``"vgg19"`` (default, ZeCon) or ``"vgg16"``.
        pretrained: ``True`` (default) loads torchvision's ImageNet weights (see ``weights_path``);
            ``False`` initialises randomly as torchvision does (Kaiming normal, fan-out; zero bias).
        weights_path: a file with the torchvision state dict of ``arch`` (the whole model's or its
            ``features``'); default: the torch hub cache, else a download. Only with
            ``pretrained=True``.
        offline: never download (``True``), or try (``False``); ``None`` (default) reads
            ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.
        input_range: ``"[-1,1]"``, ``"[0,1]"`` or ``"zecon"``, see above.
        post_relu: return ``relu(output)`` for tapped conv modules. ZeCon's ``get_features`` names
            its taps conv1_1 and conv2_1, but torchvision's ``ReLU(inplace=True)`` overwrites the
            stored conv output, so its loss actually compares relu1_1 and relu2_1: set
            ``post_relu=True`` to reproduce that. Default ``False`` (pre-ReLU, as named).

    ``forward(x)``: ``x`` of shape ``(B, 3, H, W)``, floating (H, W at least ``2**p`` for ``p``
    pools before the last tap); returns a list with one ``(B, C_i, H_i, W_i)`` tensor per entry of
    ``layers``. Frozen (no parameter requires grad) and built in eval mode (no layer depends on
    the mode); gradients flow to the input.
    """

    features: nn.Sequential
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        layers: Sequence[int] = (0, 5),
        *,
        arch: VGGArch = "vgg19",
        pretrained: bool = True,
        weights_path: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        input_range: VGGInputRange = "[-1,1]",
        post_relu: bool = False,
    ) -> None:
        super().__init__()
        arch = check_choice("arch", arch, VGG_ARCHS)
        pretrained = check_bool("pretrained", pretrained)
        self.input_range: VGGInputRange = check_choice("input_range", input_range, VGG_INPUT_RANGES)
        self.post_relu = check_bool("post_relu", post_relu)
        resolve_offline(offline)
        layout = _vgg_layout(arch)
        self.layers: tuple[int, ...] = _check_layers(layers, len(layout))
        if weights_path is not None and not pretrained:
            raise InputValueError(
                "weights_path: only used with pretrained=True (pretrained=False gives random "
                "weights)"
            )
        self.arch: VGGArch = arch
        state: dict[str, Tensor] | None = None
        self.weights_source = "random (pretrained=False)"
        if pretrained:
            state, self.weights_source = load_backbone_state_dict(
                arch, path=weights_path, offline=offline, purpose=f"VGGFeatures(arch={arch!r})"
            )
        modules: list[nn.Module] = []
        for kind, c_in, c_out in layout[: max(self.layers) + 1]:
            if kind == "conv":
                conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
                if state is None:  # torchvision's VGG initialisation
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    assert conv.bias is not None
                    nn.init.zeros_(conv.bias)
                modules.append(conv)
            elif kind == "relu":
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*modules)
        if state is not None:
            full_keys = {
                f"{i}.{p}"
                for i, (kind, _, _) in enumerate(layout)
                if kind == "conv"
                for p in ("weight", "bias")
            }
            _load_vgg(self.features, state, full_keys, arch, self.weights_source, weights_path)
        self._min_size = 2 ** sum(
            1 for kind, _, _ in layout[: max(self.layers) + 1] if kind == "pool"
        )
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False
        )
        freeze(self)

    @property
    def layer_names(self) -> list[str]:
        """The names of the returned modules (``["conv1_1", "conv2_1"]`` for the default)."""
        names = _vgg_layer_names(self.arch)
        return [names[i] for i in self.layers]

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, layers={self.layers} ({', '.join(self.layer_names)}), "
            f"input_range={self.input_range!r}, post_relu={self.post_relu}, "
            f"weights={self.weights_source!r}"
        )

    def normalize(self, x: Tensor) -> Tensor:
        """The network input: ImageNet normalisation of ``x`` read according to ``input_range``."""
        if self.input_range == "[-1,1]":
            x = (x + 1) / 2
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The outputs of modules ``layers`` for ``x`` of shape ``(B, 3, H, W)``."""
        return self._extract("x", x)

    def _extract(self, name: str, x: object) -> list[Tensor]:
        reference = next(self.features.parameters())
        x = check_image(name, x, min_size=self._min_size, reference=reference, what=self.arch)
        h = self.normalize(x)
        wanted = set(self.layers)
        taps: dict[int, Tensor] = {}
        for index, module in enumerate(self.features):
            h = module(h)
            if index in wanted:
                taps[index] = (
                    torch.relu(h) if self.post_relu and isinstance(module, nn.Conv2d) else h
                )
        return [taps[i] for i in self.layers]


def _check_layers(layers: object, n: int) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise InputTypeError(
            f"layers: expected a sequence of module indices, got {describe(layers)}"
        )
    out: list[int] = []
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InputTypeError(f"layers: expected int module indices, got {describe(item)}")
        if not 0 <= item < n:
            raise InputValueError(f"layers: expected indices in [0, {n - 1}], got {item}")
        if item in out:
            raise InputValueError(f"layers: index {item} appears twice in {tuple(layers)}")
        out.append(item)
    if not out:
        raise InputValueError("layers: expected at least one module index, got none")
    return tuple(out)


def _load_vgg(
    features: nn.Sequential,
    state: dict[str, Tensor],
    full_keys: set[str],
    arch: VGGArch,
    source: str,
    weights_path: object,
) -> None:
    """Load the truncated stack from a full ``features`` state dict, checking it is ``arch``'s."""
    missing = sorted(full_keys - state.keys())
    unexpected = sorted(state.keys() - full_keys)
    expected = features.state_dict()
    shapes = [
        f"{k}: {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        message = (
            f"{'weights_path: ' if weights_path is not None else ''}the state dict from {source} "
            f"does not fit torchvision's {arch} features: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {shapes[:5]}"
        )
        raise (
            InputValueError(message)
            if weights_path is not None
            else WeightsUnavailableError(message)
        )
    dtype = next(features.parameters()).dtype
    features.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=True)


class VGGFeatureLoss(nn.Module):
    """ZeCon's VGG content loss ``Σ_layers mean((F(y) − F(x))²)`` (Yang et al. 2023; spec 7.6).

    ``F`` is a :class:`VGGFeatures` (default: VGG19 modules 0 and 5, conv1_1 and conv2_1); each
    layer's squared difference is averaged over batch, channels and positions, then the layers are
    summed. ZeCon weights it by ``l_vgg`` (100 in its README recipe).

    Build it from a :class:`VGGFeatures` (``VGGFeatureLoss(features)``) or from the same
    arguments (``VGGFeatureLoss(layers=(0, 5), pretrained=False)``), not both.

    ``forward(x, y)``: ``x``, ``y`` of shape ``(B, 3, H, W)``, floating, the same shape; returns
    a scalar. Gradients flow to both inputs.
    """

    features: VGGFeatures

    def __init__(
        self,
        features: VGGFeatures | None = None,
        *,
        layers: Sequence[int] = (0, 5),
        arch: VGGArch = "vgg19",
        pretrained: bool = True,
        weights_path: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        input_range: VGGInputRange = "[-1,1]",
        post_relu: bool = False,
    ) -> None:
        super().__init__()
        if features is None:
            features = VGGFeatures(
                layers,
                arch=arch,
                pretrained=pretrained,
                weights_path=weights_path,
                offline=offline,
                input_range=input_range,
                post_relu=post_relu,
            )
        elif not isinstance(features, VGGFeatures):
            raise InputTypeError(
                f"features: expected None or a VGGFeatures, got {describe(features)}"
            )
        else:
            given = (tuple(layers), arch, pretrained, weights_path, offline, input_range, post_relu)
            if given != ((0, 5), "vgg19", True, None, None, "[-1,1]", False):
                raise InputValueError(
                    "features: given together with construction arguments (layers, arch, "
                    "pretrained, weights_path, offline, input_range, post_relu); pass either a "
                    "VGGFeatures or the arguments to build one"
                )
        self.features = features

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``Σ_layers mean((F(y) − F(x))²)``, a scalar."""
        check_tensor("x", x, ndim=4, floating=True)
        check_tensor("y", y, ndim=4, floating=True)
        check_same_shape("y", y, "x", x)
        loss = x.new_zeros(())
        feats_x = self.features._extract("x", x)
        feats_y = self.features._extract("y", y)
        for fx, fy in zip(feats_x, feats_y, strict=True):
            loss = loss + (fy - fx).square().mean()
        return loss
