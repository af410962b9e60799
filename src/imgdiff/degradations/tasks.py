"""Palette's four image-to-image tasks as (source, target, mask) training and evaluation pairs.

Palette (Saharia et al. 2022) trains one conditional diffusion model per task, or one model on
all four: colorization, inpainting, uncropping and JPEG restoration. Given clean targets
``(B, 3, H, W)`` in ``[-1, 1]``, the builders here make the degraded source the network is
conditioned on (concatenated channel-wise with the noisy target) and the mask of the pixels to
generate, ``(B, 1, H, W)`` with 1 = generated:

* ``"colorization"``: BT.601 grayscale replicated to 3 channels; mask all ones;
* ``"inpainting"``: ``source = target (1 - m) + m ε``, ``ε ~ N(0, I)`` (Palette fills the hole
  with Gaussian noise, not zeros); mask from a :data:`~imgdiff.degradations.masks.MaskKind`;
* ``"uncropping"``: the same with the uncropping masks;
* ``"jpeg"``: a real pillow JPEG round trip at a quality drawn uniformly per image; mask all ones.

``generator`` is ``None`` (torch's global generator), one ``torch.Generator`` for the batch
(consumed sample by sample, in batch order), or a sequence with one per sample; with a sequence
sample ``b`` depends only on ``generator[b]`` and its task, so it is the same alone or in any
batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_int, check_tensor, describe
from imgdiff.conditioning.masks import check_mask
from imgdiff.degradations._common import check_images, draw_int
from imgdiff.degradations.masks import MASK_KINDS, MaskKind, make_mask
from imgdiff.degradations.operators import check_quality_range, jpeg_round_trip, luma
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.randomness import Generators, check_generators

__all__ = [
    "TASKS",
    "UNCROPPING_MASK_KINDS",
    "DegradedPair",
    "Task",
    "colorization_pair",
    "inpainting_pair",
    "jpeg_pair",
    "make_pairs",
    "sample_tasks",
    "uncropping_pair",
]

Task = Literal["colorization", "inpainting", "uncropping", "jpeg"]
"""Palette's four tasks."""

TASKS: tuple[Task, ...] = get_args(Task)

UNCROPPING_MASK_KINDS: tuple[MaskKind, ...] = ("one_direction", "four_direction", "uncrop")
"""Mask kinds accepted for the uncropping task."""


@dataclass(frozen=True, eq=False)
class DegradedPair:
    """A batch of training or evaluation pairs.

    Attributes:
        source: ``(B, 3, H, W)``, the degraded image the model is conditioned on.
        target: ``(B, 3, H, W)``, the clean images (the tensor that was passed in, not a copy).
        mask: ``(B, 1, H, W)`` of 0/1, 1 = pixels the model generates (all ones for
            colorization and JPEG restoration); dtype and device of ``target``.
        tasks: the task of every sample, length ``B``.
    """

    source: Tensor
    target: Tensor
    mask: Tensor
    tasks: tuple[Task, ...]


def _check_masks(mask: object, images: Tensor) -> Tensor:
    """Explicit masks for ``images`` ``(B, 3, H, W)``: ``(1, H, W)`` or ``(1, 1, H, W)`` (one for
    every image) or ``(B, 1, H, W)``; bool, or integer or floating 0/1 values (1 = hole), as
    :func:`imgdiff.conditioning.check_mask` accepts. Returns ``(B, 1, H, W)`` in the images' dtype
    (a new tensor or a view; the caller's is not modified)."""
    B, _, H, W = images.shape
    m = check_tensor("mask", mask)
    if m.shape == (1, H, W):
        m = m.unsqueeze(0)
    if m.shape not in ((1, 1, H, W), (B, 1, H, W)):
        raise InputValueError(
            f"mask: expected shape (1, {H}, {W}), (1, 1, {H}, {W}) or ({B}, 1, {H}, {W}) "
            f"(1 = hole), got {tuple(m.shape)}"
        )
    return check_mask("mask", m, images).expand(B, -1, -1, -1)


def _per_sample(gens: Generators, b: int) -> torch.Generator | None:
    if gens is None or isinstance(gens, torch.Generator):
        return gens
    return gens[b]


def _noise(shape: tuple[int, ...], gen: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device (float64 for float64 images)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    device = gen.device if gen is not None else torch.device("cpu")
    z = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return z.to(device=like.device, dtype=like.dtype)


def _build(
    images: Tensor,
    tasks: tuple[Task, ...],
    gens: Generators,
    *,
    inpainting_mask: MaskKind,
    uncropping_mask: MaskKind,
    quality: tuple[int, int],
    masks: Tensor | None = None,
) -> DegradedPair:
    """The pairs of already-validated arguments.

    The random draws happen sample by sample in batch order (mask then noise, or the JPEG
    quality), then each task's operator runs once on its samples.
    """
    B, _, H, W = images.shape
    mask = torch.ones(B, 1, H, W, dtype=images.dtype, device=images.device)
    source = torch.empty_like(images)
    jpeg: dict[int, int] = {}
    holes: dict[int, tuple[Tensor, Tensor]] = {}
    for b, task in enumerate(tasks):
        gen = _per_sample(gens, b)
        if task == "jpeg":
            jpeg[b] = draw_int(gen, *quality)
        elif task != "colorization":
            if masks is not None:
                m = masks[b]
            else:
                kind = inpainting_mask if task == "inpainting" else uncropping_mask
                m = make_mask(kind, (H, W), gen)
            holes[b] = (m, _noise((3, H, W), gen, images))
    gray = [b for b, task in enumerate(tasks) if task == "colorization"]
    if gray:
        source[gray] = luma(images[gray])
    if jpeg:
        source[list(jpeg)] = jpeg_round_trip(images[list(jpeg)], list(jpeg.values()))
    if holes:
        index = list(holes)
        m = torch.stack([holes[b][0] for b in index]).to(device=images.device, dtype=images.dtype)
        noise = torch.stack([holes[b][1] for b in index])
        # Palette: x = y (1 - m) + m ε; torch.where keeps the known pixels bit-exact.
        source[index] = torch.where(m.bool(), noise, images[index])
        mask[index] = m
    return DegradedPair(source=source, target=images, mask=mask, tasks=tasks)


def _repeat(task: Task, n: int) -> tuple[Task, ...]:
    return (task,) * n


def _check_tasks(tasks: object, B: int) -> tuple[Task, ...]:
    if isinstance(tasks, str):
        return (check_choice("tasks", tasks, TASKS),) * B
    if not isinstance(tasks, Sequence):
        raise InputTypeError(
            f"tasks: expected a task name or a sequence of them (one per image), got {describe(tasks)}"
        )
    names = tuple(check_choice(f"tasks[{i}]", t, TASKS) for i, t in enumerate(tasks))
    if len(names) != B:
        raise InputValueError(f"tasks: expected one task per image ({B}), got {len(names)}")
    return names


def make_pairs(
    images: Tensor,
    tasks: Task | Sequence[Task],
    generator: Generators = None,
    *,
    inpainting_mask: MaskKind = "hybrid",
    uncropping_mask: MaskKind = "uncrop",
    jpeg_quality: int | tuple[int, int] = (5, 30),
) -> DegradedPair:
    """Pairs for one task or a mix of tasks (one per sample), e.g. for a multi-task model.

    Args:
        images: clean targets ``(B, 3, H, W)`` in ``[-1, 1]``, floating, ``H, W >= 8``; not
            modified.
        tasks: one of :data:`TASKS` for every image, or a sequence with one per image (see
            :func:`sample_tasks`).
        generator: ``None``, one ``torch.Generator``, or one per image.
        inpainting_mask: mask kind for ``"inpainting"`` samples (Palette: ``"hybrid"``).
        uncropping_mask: mask kind for ``"uncropping"`` samples, one of
            :data:`UNCROPPING_MASK_KINDS` (default: one or four directions, 50/50).
        jpeg_quality: a fixed quality or a range ``(low, high)``, both ends included, within
            ``[1, 95]``; drawn uniformly per image (Palette trains on ``[5, 30]``).

    Returns:
        :class:`DegradedPair` with ``source`` ``(B, 3, H, W)``, ``target`` (``images``),
        ``mask`` ``(B, 1, H, W)`` and the per-sample ``tasks``.
    """
    x = check_images("images", images)
    names = _check_tasks(tasks, x.shape[0])
    gens = check_generators(generator, x.shape[0])
    inpaint_kind = check_choice("inpainting_mask", inpainting_mask, MASK_KINDS)
    uncrop_kind = check_choice("uncropping_mask", uncropping_mask, UNCROPPING_MASK_KINDS)
    quality = check_quality_range(jpeg_quality)
    return _build(
        x,
        names,
        gens,
        inpainting_mask=inpaint_kind,
        uncropping_mask=uncrop_kind,
        quality=quality,
    )


def colorization_pair(images: Tensor) -> DegradedPair:
    """Colorization pairs: ``source`` is the BT.601 grayscale of ``images`` on 3 channels.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``; ``mask`` is all ones ``(B, 1, H, W)``.
    """
    return make_pairs(images, "colorization")


def inpainting_pair(
    images: Tensor,
    generator: Generators = None,
    *,
    mask_kind: MaskKind = "hybrid",
    mask: Tensor | None = None,
) -> DegradedPair:
    """Inpainting pairs: the hole of a ``mask_kind`` mask is filled with ``N(0, I)`` noise.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``. Give ``mask`` to use fixed masks instead (for
    evaluation): ``(1, H, W)`` or ``(1, 1, H, W)`` for every image, or ``(B, 1, H, W)``; bool, or
    integer or floating values 0/1 (checked), 1 = hole, like the masks
    :class:`~imgdiff.conditioning.KnownRegion` and the trainer take. ``source = images`` outside
    the hole (bit-exact) and noise inside; the pair's ``mask`` is ``(B, 1, H, W)`` in the images'
    dtype.
    """
    x = check_images("images", images)
    B = x.shape[0]
    gens = check_generators(generator, B)
    kind = check_choice("mask_kind", mask_kind, MASK_KINDS)
    masks = None if mask is None else _check_masks(mask, x)
    return _build(
        x,
        _repeat("inpainting", B),
        gens,
        inpainting_mask=kind,
        uncropping_mask="uncrop",
        quality=(1, 1),
        masks=masks,
    )


def uncropping_pair(
    images: Tensor, generator: Generators = None, *, mask_kind: MaskKind = "uncrop"
) -> DegradedPair:
    """Uncropping pairs: like :func:`inpainting_pair` with an uncropping mask.

    ``mask_kind`` is ``"one_direction"`` (a half of the image), ``"four_direction"`` (a border
    frame around a centred half-area rectangle) or ``"uncrop"`` (either, 50/50).
    """
    kind = check_choice("mask_kind", mask_kind, UNCROPPING_MASK_KINDS)
    return make_pairs(images, "uncropping", generator, uncropping_mask=kind)


def jpeg_pair(
    images: Tensor, generator: Generators = None, *, quality: int | tuple[int, int] = (5, 30)
) -> DegradedPair:
    """JPEG-restoration pairs: each image is JPEG-compressed at a quality drawn in ``quality``.

    ``quality`` is a fixed int or ``(low, high)`` (both included) within ``[1, 95]``; Palette
    trains on ``[5, 30]`` and evaluates at 5, 10 and 20. ``mask`` is all ones.
    """
    x = check_images("images", images)
    gens = check_generators(generator, x.shape[0])
    q = check_quality_range(quality)
    return _build(
        x,
        _repeat("jpeg", x.shape[0]),
        gens,
        inpainting_mask="hybrid",
        uncropping_mask="uncrop",
        quality=q,
    )


def sample_tasks(
    n: int, generator: Generators = None, *, choices: Sequence[Task] = TASKS
) -> tuple[Task, ...]:
    """``n`` task names drawn uniformly from ``choices`` (all four by default), one per sample.

    With a sequence of ``n`` generators, name ``b`` is drawn from ``generator[b]``.
    """
    n = check_int("n", n, min=1)
    gens = check_generators(generator, n)
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise InputTypeError(f"choices: expected a sequence of task names, got {describe(choices)}")
    options = tuple(check_choice(f"choices[{i}]", c, TASKS) for i, c in enumerate(choices))
    if not options:
        raise InputValueError("choices: expected at least one task name, got an empty sequence")
    return tuple(options[draw_int(_per_sample(gens, b), 0, len(options) - 1)] for b in range(n))
