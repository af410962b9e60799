"""Palette's image-to-image tasks: masks, degradation operators and (source, target, mask) pairs.

* :mod:`~imgdiff.degradations.masks`: inpainting and uncropping masks ``(1, H, W)``, 1 = hole,
  and :func:`make_mask`;
* :mod:`~imgdiff.degradations.strokes`: the free-form brush-stroke and irregular masks;
* :mod:`~imgdiff.degradations.operators`: BT.601 grayscale and the JPEG round trip;
* :mod:`~imgdiff.degradations.tasks`: colorization, inpainting, uncropping and JPEG pairs, and
  :func:`make_pairs` for batches of mixed tasks.

See ``docs/degradations.md``.
"""

from imgdiff.degradations.masks import (
    MASK_KINDS,
    MaskKind,
    Side,
    bbox_mask,
    center_mask,
    four_direction_mask,
    hybrid_mask,
    make_mask,
    one_direction_mask,
    uncropping_mask,
)
from imgdiff.degradations.operators import (
    BT601_LUMA,
    JPEG_QUALITY_RANGE,
    jpeg_compress,
    to_grayscale,
    with_luma,
)
from imgdiff.degradations.strokes import brush_stroke_mask, irregular_mask
from imgdiff.degradations.tasks import (
    TASKS,
    UNCROPPING_MASK_KINDS,
    DegradedPair,
    Task,
    colorization_pair,
    inpainting_pair,
    jpeg_pair,
    make_pairs,
    sample_tasks,
    uncropping_pair,
)

__all__ = [
    "BT601_LUMA",
    "JPEG_QUALITY_RANGE",
    "MASK_KINDS",
    "TASKS",
    "UNCROPPING_MASK_KINDS",
    "DegradedPair",
    "MaskKind",
    "Side",
    "Task",
    "bbox_mask",
    "brush_stroke_mask",
    "center_mask",
    "colorization_pair",
    "four_direction_mask",
    "hybrid_mask",
    "inpainting_pair",
    "irregular_mask",
    "jpeg_compress",
    "jpeg_pair",
    "make_mask",
    "make_pairs",
    "one_direction_mask",
    "sample_tasks",
    "to_grayscale",
    "uncropping_mask",
    "uncropping_pair",
    "with_luma",
]
