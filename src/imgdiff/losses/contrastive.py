"""ZeCon's zero-shot contrastive content loss: PatchNCE between features of two images (spec 7.5).

PatchNCE (Park et al. 2020, "Contrastive Learning for Unpaired Image-to-Image Translation", CUT,
Sec. 3) asks every feature vector ("patch") of the output to pick out the feature vector at the
same position of the input among the other positions of the input. ZeCon (Yang, Hwang & Ye 2023,
"Zero-Shot Contrastive Loss for Text-Guided Diffusion Image Style Transfer", arXiv 2303.08622,
Sec. 3, the zero-shot contrastive loss) uses it without training: the feature maps come from the
*encoder* of the pretrained diffusion U-Net run at timestep 0, and the loss, used as sampling
guidance, keeps the content of a source image while a CLIP loss changes its style.

Pieces, from the bottom up:

* :func:`patch_nce_loss` -- the loss of already-sampled ``(B, P, C)`` query and key vectors;
* :func:`sample_patch_positions`, :func:`gather_patches`, :func:`sample_shared_patches` -- one
  random set of positions shared by the query and key maps (and by the whole batch);
* :class:`ZeroShotContrastiveLoss` -- features of ``x`` (query) and ``y`` (key) from any feature
  extractor, PatchNCE per layer, summed over layers;
* :class:`UNetEncoderFeatures` -- the extractor ZeCon uses: a diffusion U-Net's encoder at t = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy

from imgdiff._checks import check_choice, check_float, check_int, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.nets.unet import NOISE_CONDITIONINGS, NoiseConditioning

__all__ = [
    "NORMALIZATION_EPS",
    "ZECON_LAYERS",
    "EncoderNetwork",
    "FeatureExtractor",
    "SharedPatches",
    "UNetEncoderFeatures",
    "ZeroShotContrastiveLoss",
    "gather_patches",
    "patch_nce_loss",
    "sample_patch_positions",
    "sample_shared_patches",
]

NORMALIZATION_EPS = 1e-7
"""Added to the norm in the L2 normalisation of feature vectors, ``f / (||f|| + eps)`` (CUT, ZeCon)."""

ZECON_LAYERS: tuple[int, ...] = (0, 2, 5, 8, 11)
"""Indices of the U-Net input blocks whose outputs ZeCon compares (guided-diffusion's 256x256
ImageNet model has 18 input blocks; spec 7.5)."""

FeatureExtractor = Callable[[Tensor], Sequence[Tensor]]
"""An image ``(B, 3, H, W)`` to a list of feature maps ``(B, C_l, h_l, w_l)`` (shallow to deep).

:class:`UNetEncoderFeatures` is one; a VGG stack returning its chosen activations is another;
any callable of this shape works."""


class EncoderNetwork(Protocol):
    """A network with an encoder-only pass, such as :class:`imgdiff.nets.UNet`.

    ``encoder_features(x, t, **conditions)`` takes the network input ``(B, C_in, H, W)`` and the
    noise input ``t`` ``(B,)`` and returns the encoder's feature maps, shallow to deep.
    """

    def encoder_features(self, x: Tensor, t: Tensor, /) -> Sequence[Tensor]: ...


# ----------------------------------------------------------------------------------------------
# PatchNCE on sampled vectors


def _normalize(f: Tensor) -> Tensor:
    """``f / (||f||_2 + 1e-7)`` over the last dimension (the feature channels)."""
    norm = torch.linalg.vector_norm(f, ord=2, dim=-1, keepdim=True)
    out: Tensor = f / (norm + NORMALIZATION_EPS)
    return out


def patch_nce_loss(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float = 0.07,
    diagonal_fill: float = -10.0,
    cross_batch_negatives: bool = False,
) -> Tensor:
    """PatchNCE: the cross-entropy of finding each query's own key among the other keys.

    Shapes: ``query`` and ``key`` ``(B, P, C)`` -- ``P`` feature vectors per image, already
    sampled at shared positions (:func:`sample_shared_patches`); returns a scalar.

    Each vector is L2-normalised, ``f / (||f|| + 1e-7)``; the keys are detached (no gradient
    reaches them). For image ``b`` and patch ``i`` the logits are

        ``[q_i·k_i, q_i·k_1, ..., q_i·k_P] / temperature``   (``P + 1`` logits),

    where the negatives run over all ``P`` keys of the image with the self-pair ``q_i·k_i``
    replaced by ``diagonal_fill`` (before the division, so ``-10 / 0.07 = -142.9``: effectively
    removed). The loss is the cross-entropy with target 0 (the positive), averaged over all
    ``B·P`` patches (Park et al. 2020, CUT, Sec. 3.1; ZeCon's ``PatchNCELoss``; spec 7.5 step 3).

    ``cross_batch_negatives=True`` reproduces ZeCon's code, which treats the batch as one image of
    ``B·P`` patches, so the keys of the *other* images are negatives too (``(B·P, B·P + 1)``
    logits). The paper's formulation, and the default, uses negatives from the same image only.
    With ``B = 1`` both are the same.

    Computed in at least float32 (half-precision features are upcast).
    """
    check_tensor("query", query, ndim=3, floating=True)
    check_tensor("key", key, ndim=3, floating=True)
    if key.shape != query.shape:
        raise InputValueError(
            f"key: expected shape {tuple(query.shape)} (the shape of query: (B, P, C)), "
            f"got {tuple(key.shape)}"
        )
    if query.shape[1] < 1 or query.shape[2] < 1:
        raise InputValueError(
            f"query: expected at least one patch and one channel (B, P, C), "
            f"got shape {tuple(query.shape)}"
        )
    temperature = check_float("temperature", temperature, min=0.0, min_open=True)
    diagonal_fill = check_float("diagonal_fill", diagonal_fill)
    if not isinstance(cross_batch_negatives, bool):
        raise InputTypeError(
            f"cross_batch_negatives: expected a bool, got {describe(cross_batch_negatives)}"
        )
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), torch.float32)
    q = _normalize(query.to(dtype))
    k = _normalize(key.detach().to(dtype=dtype, device=query.device))
    if cross_batch_negatives:
        q = q.reshape(1, -1, q.shape[-1])
        k = k.reshape(1, -1, k.shape[-1])
    P = q.shape[1]
    positive = (q * k).sum(dim=-1, keepdim=True)  # (B, P, 1)
    negatives = q @ k.transpose(1, 2)  # (B, P, P)
    self_pairs = torch.eye(P, dtype=torch.bool, device=q.device)
    negatives = negatives.masked_fill(self_pairs, diagonal_fill)
    logits = torch.cat([positive, negatives], dim=-1) / temperature  # (B, P, P + 1)
    target = torch.zeros(logits.shape[0] * P, dtype=torch.long, device=q.device)
    return cross_entropy(logits.reshape(-1, P + 1), target)


# ----------------------------------------------------------------------------------------------
# Shared patch positions


class SharedPatches(NamedTuple):
    """Feature vectors at shared positions: ``query``, ``key`` ``(B, P, C)``, ``positions`` ``(P,)``."""

    query: Tensor
    key: Tensor
    positions: Tensor


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    raise InputTypeError(
        "generator: expected None or one torch.Generator (patch positions are shared by the whole "
        f"batch, so there is one draw, not one per sample), got {describe(generator)}"
    )


def sample_patch_positions(
    num_positions: int,
    num_patches: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The first ``min(num_patches, num_positions)`` entries of a random permutation.

    Returns a ``(P,)`` int64 tensor of distinct flat positions in ``[0, num_positions)`` (row-major
    over an ``h x w`` map, ``num_positions = h·w``), on ``device``. A ``generator`` draws on its own
    device (then the result is moved, so a seed gives the same positions everywhere); without one,
    torch's global RNG of ``device`` is used, as ZeCon's ``torch.randperm``.
    """
    num_positions = check_int("num_positions", num_positions, min=1)
    num_patches = check_int("num_patches", num_patches, min=1)
    generator = _check_generator(generator)
    if generator is not None:
        perm = torch.randperm(num_positions, generator=generator, device=generator.device)
        perm = perm.to(device) if device is not None else perm
    else:
        perm = torch.randperm(num_positions, device=device)
    return perm[: min(num_patches, num_positions)]


def gather_patches(feature_map: Tensor, positions: Tensor) -> Tensor:
    """The feature vectors of ``feature_map`` ``(B, C, h, w)`` at flat ``positions`` ``(P,)``.

    Returns ``(B, P, C)``: entry ``[b, p]`` is ``feature_map[b, :, positions[p] // w,
    positions[p] % w]``.
    """
    check_tensor("feature_map", feature_map, ndim=4)
    check_tensor("positions", positions, ndim=1)
    if (
        positions.dtype.is_floating_point
        or positions.dtype.is_complex
        or positions.dtype == torch.bool
    ):
        raise InputTypeError(f"positions: expected an integer tensor, got dtype {positions.dtype}")
    n = feature_map.shape[2] * feature_map.shape[3]
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
        raise InputValueError(
            f"positions: expected flat positions in [0, {n - 1}] for a "
            f"{feature_map.shape[2]}x{feature_map.shape[3]} map, got values from "
            f"{int(positions.min())} to {int(positions.max())}"
        )
    return _gather(feature_map, positions)


def _gather(feature_map: Tensor, positions: Tensor) -> Tensor:
    """:func:`gather_patches` without the checks (which read values, so synchronise)."""
    flat = feature_map.flatten(2)  # (B, C, h·w)
    return flat[:, :, positions.to(flat.device)].transpose(1, 2)


def sample_shared_patches(
    query_map: Tensor,
    key_map: Tensor,
    *,
    num_patches: int = 256,
    generator: torch.Generator | None = None,
) -> SharedPatches:
    """Sample the same ``P = min(num_patches, h·w)`` positions from a query and a key map.

    Shapes: ``query_map`` and ``key_map`` ``(B, C, h, w)``; returns :class:`SharedPatches` with
    ``query``, ``key`` ``(B, P, C)`` and the ``positions`` ``(P,)``. The positions are shared by the
    two maps and by every image of the batch (ZeCon's ``PatchSampleF``; spec 7.5 step 2).
    """
    check_tensor("query_map", query_map, ndim=4)
    check_tensor("key_map", key_map, ndim=4)
    if key_map.shape != query_map.shape:
        raise InputValueError(
            f"key_map: expected shape {tuple(query_map.shape)} (the shape of query_map), "
            f"got {tuple(key_map.shape)}"
        )
    h, w = query_map.shape[2], query_map.shape[3]
    if h * w < 1:
        raise InputValueError(f"query_map: expected a non-empty map, got {h}x{w}")
    positions = sample_patch_positions(
        h * w, num_patches, generator=generator, device=query_map.device
    )
    return SharedPatches(_gather(query_map, positions), _gather(key_map, positions), positions)


# ----------------------------------------------------------------------------------------------
# The loss


def _check_layers(name: str, layers: object) -> tuple[int, ...] | None:
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


def _select(name: str, maps: list[Tensor], layers: tuple[int, ...] | None) -> list[Tensor]:
    if layers is None:
        return maps
    for index in layers:
        if index >= len(maps):
            raise InputValueError(
                f"{name}: layer index {index} is out of range for the {len(maps)} feature maps "
                f"the extractor returned (indices 0 to {len(maps) - 1})"
            )
    return [maps[i] for i in layers]


def _feature_list(name: str, out: object, batch: int) -> list[Tensor]:
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


@dataclass(frozen=True)
class ZeroShotContrastiveLoss:
    """ZeCon's content loss: PatchNCE between the feature maps of ``x`` and ``y``, summed over layers.

    ``loss(x, y)`` for images ``x``, ``y`` ``(B, 3, H, W)`` (any ``(B, C, H, W)`` the extractor
    accepts; same shape) returns a scalar::

        L = sum_l PatchNCE(F_l(x) at S_l, F_l(y) at S_l)

    where ``F_l`` are the extractor's maps (those in ``layers``), ``S_l`` is one random set of
    ``min(num_patches, h_l·w_l)`` positions per layer, shared by ``x``, ``y`` and the batch
    (:func:`sample_shared_patches`), and PatchNCE is :func:`patch_nce_loss` (L2-normalised vectors,
    ``temperature``, diagonal -10). The layers are summed, not averaged, as ZeCon (Yang et al.
    2023, Sec. 3; spec 7.5 step 4). ``x`` is the query (the image being generated; gradients flow
    to it); ``y`` the key (the source; its features are computed under ``torch.no_grad``).

    Attributes:
        extractor: any ``Callable[[Tensor], Sequence[Tensor]]``, an image to a list of feature
            maps ``(B, C_l, h_l, w_l)``: :class:`UNetEncoderFeatures` (ZeCon), a VGG stack such as
            ``imgdiff.losses.perceptual.VGGFeatures``, or your own. The loss changes no state of
            it: freeze its parameters (``requires_grad_(False)``) and put it in ``eval()`` mode
            yourself if it is a module.
        num_patches: positions sampled per layer (256).
        temperature: the PatchNCE temperature tau (0.07).
        cross_batch_negatives: ZeCon's code's batch handling (negatives from all images), see
            :func:`patch_nce_loss`. Default ``False``: negatives from the same image.
        layers: indices into the extractor's list of maps; ``None``: all.
    """

    extractor: FeatureExtractor
    num_patches: int = 256
    temperature: float = 0.07
    cross_batch_negatives: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not callable(self.extractor):
            raise InputTypeError(
                f"extractor: expected a callable image -> list of feature maps, "
                f"got {describe(self.extractor)}"
            )
        check_int("num_patches", self.num_patches, min=1)
        check_float("temperature", self.temperature, min=0.0, min_open=True)
        if not isinstance(self.cross_batch_negatives, bool):
            raise InputTypeError(
                f"cross_batch_negatives: expected a bool, got {describe(self.cross_batch_negatives)}"
            )
        object.__setattr__(self, "layers", _check_layers("layers", self.layers))

    def features(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The selected maps of ``x`` (with gradients) and ``y`` (without), checked pairwise."""
        check_tensor("x", x, ndim=4, floating=True)
        check_tensor("y", y, ndim=4, floating=True)
        if y.shape != x.shape:
            raise InputValueError(
                f"y: expected shape {tuple(x.shape)} (the shape of x), got {tuple(y.shape)}"
            )
        fx = _feature_list("extractor", self.extractor(x), x.shape[0])
        with torch.no_grad():
            fy = _feature_list("extractor", self.extractor(y), y.shape[0])
        if len(fx) != len(fy):
            raise InputValueError(
                f"extractor: returned {len(fx)} feature maps for x but {len(fy)} for y"
            )
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            if a.shape != b.shape:
                raise InputValueError(
                    f"extractor: feature map {i} has shape {tuple(a.shape)} for x but "
                    f"{tuple(b.shape)} for y"
                )
        return _select("layers", fx, self.layers), _select("layers", fy, self.layers)

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The loss (a scalar). ``generator`` draws the patch positions (one draw per layer)."""
        generator = _check_generator(generator)
        fx, fy = self.features(x, y)
        total: Tensor | None = None
        for qmap, kmap in zip(fx, fy, strict=True):
            patches = sample_shared_patches(
                qmap, kmap, num_patches=self.num_patches, generator=generator
            )
            term = patch_nce_loss(
                patches.query,
                patches.key,
                temperature=self.temperature,
                cross_batch_negatives=self.cross_batch_negatives,
            )
            total = term if total is None else total + term
        assert total is not None  # _feature_list refuses an empty list
        return total


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
        layers = _check_layers("layers", self.layers)
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
        maps = _feature_list("net.encoder_features", out, x.shape[0])
        return [maps[i] for i in self._resolve(self.layers, len(maps))]
