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
* :class:`UNetEncoderFeatures` -- the extractor ZeCon uses: a diffusion U-Net's encoder at t = 0
  (:mod:`imgdiff.losses.unet_features`, re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.functional import cross_entropy

from imgdiff._checks import (
    check_float,
    check_int,
    check_same_shape,
    check_tensor,
    describe,
    is_integer_dtype,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.losses._features import FeatureExtractor, check_layers, feature_list, select_layers
from imgdiff.losses.unet_features import ZECON_LAYERS, EncoderNetwork, UNetEncoderFeatures

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
    check_tensor("query", query, ndim=3, floating=True, nonempty=True)
    check_same_shape("key", check_tensor("key", key, ndim=3, floating=True), "query", query)
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
    if not is_integer_dtype(positions.dtype):
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
        object.__setattr__(self, "layers", check_layers("layers", self.layers))

    def features(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The selected maps of ``x`` (with gradients) and ``y`` (without), checked pairwise."""
        check_tensor("x", x, ndim=4, floating=True, nonempty=True)
        check_tensor("y", y, ndim=4, floating=True)
        check_same_shape("y", y, "x", x)
        fx = feature_list("extractor", self.extractor(x), x.shape[0])
        with torch.no_grad():
            fy = feature_list("extractor", self.extractor(y), y.shape[0])
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
        return select_layers("layers", fx, self.layers), select_layers("layers", fy, self.layers)

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
        assert total is not None  # feature_list refuses an empty list
        return total
