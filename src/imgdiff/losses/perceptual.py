"""Perceptual and content losses for guidance and training: LPIPS, VGG features, MSE, range loss.

* :class:`LPIPSLoss` — LPIPS (Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable
  Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) through the ``lpips``
  package, as a frozen, differentiable loss (spec 9.3, 7.6).
* :class:`VGGFeatures` / :class:`VGGFeatureLoss` — the VGG content loss of ZeCon (Yang, Hwang, Ye,
  "Zero-Shot Contrastive Loss for Text-Guided Diffusion Image Style Transfer", ICCV 2023):
  ``Σ_layers mean((F(y) − F(x))²)`` over torchvision VGG19 ``features`` modules 0 and 5
  (conv1_1, conv2_1) after ImageNet normalisation (spec 7.6).
* :func:`mse_loss` and :func:`range_loss` — ZeCon's pixel MSE and the range penalty on the raw
  x̂0 (weighted by ``range_lambda = 50`` in ZeCon; spec 7.6).

Images are ``(B, 3, H, W)`` floating tensors in [-1, 1] unless ``input_range`` says otherwise.
Values are not range-checked (a guidance x̂0 may overshoot [-1, 1]); shapes and dtypes are.

Pretrained backbones are torchvision's ImageNet weights, found by
:mod:`imgdiff.losses._torchvision_weights`: ``weights_path=`` (a file), else the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``), else a download unless offline; otherwise a
:class:`~imgdiff.errors.WeightsUnavailableError` says what was looked for and how to provide it.
``pretrained=False`` gives random weights (tests). ``lpips`` and ``torchvision`` (the
``perceptual`` extra) are imported only when an :class:`LPIPSLoss` is built.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal, Self, get_args

import torch
from torch import Tensor, nn

from imgdiff._checks import check_choice, check_same_shape, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError
from imgdiff.losses._torchvision_weights import Backbone, load_backbone_state_dict, resolve_offline

__all__ = [
    "LPIPS_NETS",
    "VGG_ARCHS",
    "VGG_INPUT_RANGES",
    "LPIPSLoss",
    "LPIPSNet",
    "VGGArch",
    "VGGFeatureLoss",
    "VGGFeatures",
    "VGGInputRange",
    "mse_loss",
    "range_loss",
]

LPIPSNet = Literal["alex", "vgg", "squeeze"]
"""The LPIPS backbone: AlexNet (the LPIPS default), VGG16 or SqueezeNet 1.1."""
LPIPS_NETS: tuple[LPIPSNet, ...] = get_args(LPIPSNet)

VGGArch = Literal["vgg19", "vgg16"]
"""The torchvision VGG whose ``features`` :class:`VGGFeatures` runs (ZeCon: VGG19)."""
VGG_ARCHS: tuple[VGGArch, ...] = get_args(VGGArch)

VGGInputRange = Literal["[-1,1]", "[0,1]", "zecon"]
"""How :class:`VGGFeatures` reads its input before the ImageNet normalisation: ``"[-1,1]"`` maps
``(x + 1) / 2`` first, ``"[0,1]"`` takes ``x`` as is, ``"zecon"`` feeds a [-1, 1] image straight
into the normalisation, as ZeCon's code does (spec 7.6)."""
VGG_INPUT_RANGES: tuple[VGGInputRange, ...] = get_args(VGGInputRange)

_LPIPSInputRange = Literal["[-1,1]", "[0,1]"]
_LPIPS_INPUT_RANGES: tuple[_LPIPSInputRange, ...] = get_args(_LPIPSInputRange)
_Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS: tuple[_Reduction, ...] = get_args(_Reduction)

_LPIPS_BACKBONE: dict[LPIPSNet, Backbone] = {
    "alex": "alexnet",
    "vgg": "vgg16",
    "squeeze": "squeezenet1_1",
}
# The smallest H and W each LPIPS backbone accepts (smaller inputs pool down to nothing).
_LPIPS_MIN_SIZE: dict[LPIPSNet, int] = {"alex": 31, "vgg": 16, "squeeze": 17}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.models.vgg.cfgs "D" (VGG16) and "E" (VGG19): conv widths, "M" = 2x2 max pool.
_VGG_CFGS: dict[VGGArch, str] = {
    "vgg16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "vgg19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}


def _import(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - the dev environment has both
        raise ImportError(
            f"{what} needs lpips and torchvision: pip install 'imgdiff[perceptual]'"
        ) from exc


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InputTypeError(f"{name}: expected a bool, got {describe(value)}")
    return value


def _check_image_pair(
    x: object, y: object, *, min_size: int, reference: Tensor, what: str
) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as ``(B, 3, H, W)`` floating tensors of one shape, on the network's device,
    cast to its dtype (``reference`` is one of its parameters), at least ``min_size`` high and wide."""
    xt = _check_image("x", x, min_size=min_size, reference=reference, what=what)
    yt = _check_image("y", y, min_size=min_size, reference=reference, what=what)
    check_same_shape("y", yt, "x", xt)
    return xt, yt


def _check_image(
    name: str, value: object, *, min_size: int, reference: Tensor, what: str
) -> Tensor:
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


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


class LPIPSLoss(nn.Module):
    """LPIPS distance as a frozen, differentiable loss (Zhang et al. 2018; spec 9.3).

    Pipeline (the ``lpips`` package, version 0.1): scaling layer ``(x − shift) / scale`` with
    shift (−0.030, −0.088, −0.188) and scale (0.458, 0.448, 0.450); backbone feature taps (alex:
    5, vgg16: 5, squeeze: 7); per tap a unit normalisation along channels, the squared difference
    of the two images, a learned non-negative 1×1 linear head to one channel and a spatial mean;
    the sum over taps is the distance ``d(x, y) ≥ 0``, ``d(x, x) = 0``, symmetric.

    Args:
        net: the backbone, ``"alex"`` (default), ``"vgg"`` (VGG16) or ``"squeeze"`` (SqueezeNet 1.1).
        pretrained: ``True`` (default) loads the torchvision ImageNet backbone (see ``weights_path``)
            and the linear heads that ship inside the ``lpips`` wheel (no network). ``False`` gives
            a random backbone and random heads: for tests only, not a perceptual metric.
        weights_path: a file with the torchvision state dict of the backbone (``alexnet``,
            ``vgg16`` or ``squeezenet1_1``, the whole model's or its ``features``'); default: the
            torch hub cache ``$TORCH_HOME/hub/checkpoints/<file>``, else a download. Only with
            ``pretrained=True``.
        offline: never download (``True``), or try (``False``); ``None`` (default) reads
            ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.
        reduction: over the batch, ``"mean"`` (default), ``"sum"`` or ``"none"`` (per image).
        input_range: ``"[-1,1]"`` (default) or ``"[0,1]"`` (mapped with ``2x − 1``, lpips'
            ``normalize=True``).

    ``forward(x, y)``: ``x``, ``y`` of shape ``(B, 3, H, W)``, floating, the same shape (H, W at
    least 31 for alex, 16 for vgg, 17 for squeeze); returns ``(B,)`` with ``reduction="none"``,
    else a scalar. The network is frozen (no parameter requires grad, always in eval mode, also
    after ``.train()``); gradients flow to the inputs.

    Raises:
        WeightsUnavailableError: ``pretrained=True`` and the backbone weights are nowhere to be
            found (the message lists where it looked and how to provide them).
    """

    model: nn.Module
    net: LPIPSNet
    reduction: _Reduction
    input_range: _LPIPSInputRange
    weights_source: str

    def __init__(
        self,
        net: LPIPSNet = "alex",
        *,
        pretrained: bool = True,
        weights_path: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        reduction: _Reduction = "mean",
        input_range: _LPIPSInputRange = "[-1,1]",
    ) -> None:
        super().__init__()
        net = check_choice("net", net, LPIPS_NETS)
        pretrained = _check_bool("pretrained", pretrained)
        reduction = check_choice("reduction", reduction, _REDUCTIONS)
        input_range = check_choice("input_range", input_range, _LPIPS_INPUT_RANGES)
        resolve_offline(offline)
        if weights_path is not None and not pretrained:
            raise InputValueError(
                "weights_path: only used with pretrained=True (pretrained=False gives random "
                "weights)"
            )
        backbone = _LPIPS_BACKBONE[net]
        state: dict[str, Tensor] | None = None
        source = "random (pretrained=False)"
        if pretrained:  # find the backbone first: fail fast, before building anything
            state, source = load_backbone_state_dict(
                backbone, path=weights_path, offline=offline, purpose=f"LPIPSLoss(net={net!r})"
            )
        lpips = _import("lpips", "LPIPSLoss")
        _import("torchvision", "LPIPSLoss")
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated pretrained=
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            model = lpips.LPIPS(pretrained=pretrained, net=net, pnet_rand=True, verbose=False)
        if state is not None:
            _load_lpips_backbone(model, state, backbone, source, weights_path is not None)
        self._setup(model, net, reduction, input_range, source)

    @classmethod
    def from_lpips(
        cls,
        model: nn.Module,
        *,
        reduction: _Reduction = "mean",
        input_range: _LPIPSInputRange = "[-1,1]",
    ) -> LPIPSLoss:
        """Wrap an existing ``lpips.LPIPS`` model (frozen and put in eval mode, in place).

        ``model`` must be an ``lpips.LPIPS`` with ``spatial=False``; its weights are used as they
        are (its backbone and heads, whatever they were loaded from).
        """
        lpips = _import("lpips", "LPIPSLoss.from_lpips")
        if not isinstance(model, lpips.LPIPS):
            raise InputTypeError(f"model: expected an lpips.LPIPS instance, got {describe(model)}")
        if model.spatial:
            raise InputValueError(
                "model: expected an lpips.LPIPS built with spatial=False (one distance per image)"
            )
        net = check_choice(
            "model.pnet_type", "vgg" if model.pnet_type == "vgg16" else model.pnet_type, LPIPS_NETS
        )
        reduction = check_choice("reduction", reduction, _REDUCTIONS)
        input_range = check_choice("input_range", input_range, _LPIPS_INPUT_RANGES)
        loss = cls.__new__(cls)
        nn.Module.__init__(loss)
        loss._setup(model, net, reduction, input_range, "wrapped lpips.LPIPS")
        return loss

    def _setup(
        self,
        model: nn.Module,
        net: LPIPSNet,
        reduction: _Reduction,
        input_range: _LPIPSInputRange,
        source: str,
    ) -> None:
        _freeze(model)
        self.model = model
        self.net = net
        self.reduction = reduction
        self.input_range = input_range
        self.weights_source = source

    def train(self, mode: bool = True) -> Self:
        """Set the wrapper's mode; the LPIPS network stays in eval mode (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"net={self.net!r}, reduction={self.reduction!r}, input_range={self.input_range!r}, "
            f"weights={self.weights_source!r}"
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS ``d(x, y)``: ``(B,)`` with ``reduction="none"``, else a scalar."""
        reference = next(self.model.parameters())
        x, y = _check_image_pair(
            x, y, min_size=_LPIPS_MIN_SIZE[self.net], reference=reference, what=f"LPIPS({self.net})"
        )
        d: Tensor = self.model(x, y, normalize=self.input_range == "[0,1]")
        d = d.reshape(x.shape[0])
        if self.reduction == "mean":
            return d.mean()
        if self.reduction == "sum":
            return d.sum()
        return d


def _load_lpips_backbone(
    model: Any, state: dict[str, Tensor], backbone: Backbone, source: str, from_argument: bool
) -> None:
    """Copy a torchvision ``features`` state dict into lpips' ``net.sliceK`` Sequentials.

    lpips keeps torchvision's ``features`` modules under their original index names, so
    ``<i>.<rest>`` goes to ``slice<k>.<i>.<rest>`` for the slice holding module ``str(i)``.
    Every backbone parameter must be loaded, and every tensor of the file used.
    """
    net: nn.Module = model.net
    slice_of = {
        index: slice_name
        for slice_name, block in net.named_children()
        for index, _ in block.named_children()
    }
    expected = net.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        index, rest = key.split(".", 1)
        target = f"{slice_of.get(index)}.{index}.{rest}"
        if target in expected:
            mapped[target] = value
        else:
            unexpected.append(key)
    missing = sorted(k for k in expected if k not in mapped)
    shapes = [
        f"{k}: {tuple(v.shape)} instead of {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        message = (
            f"{'weights_path: ' if from_argument else ''}the state dict from {source} does not fit "
            f"torchvision's {backbone} features: missing {missing[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}, wrong shapes {shapes[:5]}"
        )
        raise InputValueError(message) if from_argument else WeightsUnavailableError(message)
    dtype = next(net.parameters()).dtype
    net.load_state_dict({k: v.to(dtype) for k, v in mapped.items()}, strict=True)


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
        pretrained = _check_bool("pretrained", pretrained)
        self.input_range: VGGInputRange = check_choice("input_range", input_range, VGG_INPUT_RANGES)
        self.post_relu = _check_bool("post_relu", post_relu)
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
        _freeze(self)

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
        x = _check_image(name, x, min_size=self._min_size, reference=reference, what=self.arch)
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


def mse_loss(x: Tensor, y: Tensor) -> Tensor:
    """``mean((x − y)²)`` over every element, a scalar (ZeCon's ``l_mse`` term; spec 7.6).

    ``x`` and ``y``: floating tensors of the same shape (no broadcasting).
    """
    check_tensor("x", x, floating=True)
    check_tensor("y", y, floating=True)
    check_same_shape("y", y, "x", x)
    if x.numel() == 0:
        raise InputValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    return (x - y).square().mean()


def range_loss(x0_hat: Tensor) -> Tensor:
    """``Σ_b mean((x̂0_b − clamp(x̂0_b, −1, 1))²)``: the range penalty on the raw x̂0 (spec 7.6).

    Per image the mean squared excess over [-1, 1] (zero inside), summed over the batch, as in
    ZeCon (Yang et al. 2023) and blended diffusion, which weight it by ``range_lambda = 50``.
    ``x0_hat``: a floating ``(B, ...)`` tensor (``(B, C, H, W)`` for images); returns a scalar.
    """
    check_tensor("x0_hat", x0_hat, min_ndim=2, floating=True)
    if x0_hat.numel() == 0:
        raise InputValueError(
            f"x0_hat: expected a non-empty tensor, got shape {tuple(x0_hat.shape)}"
        )
    excess = x0_hat - x0_hat.clamp(-1, 1)
    return excess.square().reshape(x0_hat.shape[0], -1).mean(dim=1).sum()
