"""LPIPS as a frozen, differentiable loss (Zhang, Isola, Efros, Shechtman, Wang, CVPR 2018; spec 9.3).

Through the ``lpips`` package (its linear heads ship in its wheel); the torchvision ImageNet
backbone is found by :mod:`imgdiff.losses._torchvision_weights` (``weights_path=``, the torch hub
cache, a download unless offline) and loaded into lpips' slices. ``lpips`` and ``torchvision``
are imported only when an :class:`LPIPSLoss` is built.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Self, get_args

from torch import Tensor, nn

from imgdiff._checks import check_bool, check_choice, describe
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError
from imgdiff.losses._perceptual_common import (
    REDUCTIONS,
    Reduction,
    check_image_pair,
    freeze,
    import_optional,
)
from imgdiff.losses._torchvision_weights import Backbone, load_backbone_state_dict, resolve_offline

__all__ = ["LPIPS_NETS", "LPIPSLoss", "LPIPSNet"]

LPIPSNet = Literal["alex", "vgg", "squeeze"]
"""The LPIPS backbone: AlexNet (the LPIPS default), VGG16 or SqueezeNet 1.1."""
LPIPS_NETS: tuple[LPIPSNet, ...] = get_args(LPIPSNet)

_LPIPSInputRange = Literal["[-1,1]", "[0,1]"]
_LPIPS_INPUT_RANGES: tuple[_LPIPSInputRange, ...] = get_args(_LPIPSInputRange)

_LPIPS_BACKBONE: dict[LPIPSNet, Backbone] = {
    "alex": "alexnet",
    "vgg": "vgg16",
    "squeeze": "squeezenet1_1",
}
# The smallest H and W each LPIPS backbone accepts (smaller inputs pool down to nothing).
_LPIPS_MIN_SIZE: dict[LPIPSNet, int] = {"alex": 31, "vgg": 16, "squeeze": 17}


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
    reduction: Reduction
    input_range: _LPIPSInputRange
    weights_source: str

    def __init__(
        self,
        net: LPIPSNet = "alex",
        *,
        pretrained: bool = True,
        weights_path: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        reduction: Reduction = "mean",
        input_range: _LPIPSInputRange = "[-1,1]",
    ) -> None:
        super().__init__()
        net = check_choice("net", net, LPIPS_NETS)
        pretrained = check_bool("pretrained", pretrained)
        reduction = check_choice("reduction", reduction, REDUCTIONS)
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
        lpips = import_optional("lpips", "LPIPSLoss")
        import_optional("torchvision", "LPIPSLoss")
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
        reduction: Reduction = "mean",
        input_range: _LPIPSInputRange = "[-1,1]",
    ) -> LPIPSLoss:
        """Wrap an existing ``lpips.LPIPS`` model (frozen and put in eval mode, in place).

        ``model`` must be an ``lpips.LPIPS`` with ``spatial=False``; its weights are used as they
        are (its backbone and heads, whatever they were loaded from).
        """
        lpips = import_optional("lpips", "LPIPSLoss.from_lpips")
        if not isinstance(model, lpips.LPIPS):
            raise InputTypeError(f"model: expected an lpips.LPIPS instance, got {describe(model)}")
        if model.spatial:
            raise InputValueError(
                "model: expected an lpips.LPIPS built with spatial=False (one distance per image)"
            )
        net = check_choice(
            "model.pnet_type", "vgg" if model.pnet_type == "vgg16" else model.pnet_type, LPIPS_NETS
        )
        reduction = check_choice("reduction", reduction, REDUCTIONS)
        input_range = check_choice("input_range", input_range, _LPIPS_INPUT_RANGES)
        loss = cls.__new__(cls)
        nn.Module.__init__(loss)
        loss._setup(model, net, reduction, input_range, "wrapped lpips.LPIPS")
        return loss

    def _setup(
        self,
        model: nn.Module,
        net: LPIPSNet,
        reduction: Reduction,
        input_range: _LPIPSInputRange,
        source: str,
    ) -> None:
        freeze(model)
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
        x, y = check_image_pair(
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
