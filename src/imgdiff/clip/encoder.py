"""Both CLIP towers for losses: differentiable image preprocessing and template-averaged text."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from torch import Tensor, nn

from imgdiff._checks import check_choice, check_tensor, describe
from imgdiff.clip.model import LoadedCLIP, as_prompts, load_clip
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["IMAGENET_TEMPLATES", "CLIPEncoder", "Resize"]

Resize = Literal["resize", "pool"]
_RESIZES: tuple[Resize, ...] = ("resize", "pool")

# Prompt-ensembling templates of CLIP's ImageNet zero-shot protocol (Radford et al. 2021,
# Sec. 3.1.4), a subset; StyleGAN-NADA averages text directions over such templates (spec 7.3).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "a painting of the {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a pixelated photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendition of the {}.",
    "a photo of a large {}.",
    "a photo of a small {}.",
    "itap of a {}.",
    "a origami {}.",
    "a sketch of a {}.",
    "a toy {}.",
)

# CLIP's normalisation (spec 7.1), used when the model does not carry its own.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, eq=False)
class CLIPEncoder:
    """A frozen CLIP model as a differentiable image encoder and a text encoder (spec 7.1).

    Args:
        clip: a :class:`LoadedCLIP` (see :func:`load_clip`, or :meth:`load`).
        resize: how images reach the model's input size ``S``: ``"resize"`` resizes the short
            side to ``S`` (bicubic, antialiased; the long side to ``int(S * long / short)``) and
            centre-crops (offset ``int(round((side - S) / 2))``), exactly as torchvision's
            ``Resize(S)`` + ``CenterCrop(S)`` in CLIP's and open_clip's eval preprocessing
            (StyleGAN-NADA); ``"pool"`` adaptive-average-pools to ``S x S`` (ZeCon), cheaper,
            and right for inputs already augmented to a square.

    Images are ``(B, 3, H, W)`` in ``[-1, 1]``; they are mapped to ``[0, 1]``, resized and
    normalised with the model's mean and std inside, all differentiable, so gradients reach
    the pixels. Embeddings are float32 and not normalised (losses normalise as they need).
    """

    clip: LoadedCLIP
    resize: Resize = "resize"
    _placed_stats: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _dims: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.clip, LoadedCLIP):
            raise InputTypeError(
                f"clip: expected a LoadedCLIP (see imgdiff.clip.load_clip), got {describe(self.clip)}"
            )
        check_choice("resize", self.resize, _RESIZES)

    @classmethod
    def load(
        cls,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike[str] | None = None,
        *,
        resize: Resize = "resize",
        **kwargs: Any,
    ) -> CLIPEncoder:
        """``CLIPEncoder(load_clip(model_name, pretrained, **kwargs), resize=resize)``.

        Raises :class:`~imgdiff.WeightsUnavailableError` when the weights cannot be had.
        """
        return cls(load_clip(model_name, pretrained, **kwargs), resize=resize)

    @property
    def image_size(self) -> int:
        """``S``, the model's input side (224 for ViT-B/32, ViT-B/16, ViT-L/14)."""
        size = getattr(self.clip.model.visual, "image_size", 224)
        if isinstance(size, (tuple, list)):
            if (
                len(size) != 2 or size[0] != size[1]
            ):  # pragma: no cover - open_clip models are square
                raise InputValueError(f"clip: expected a square image size, got {size}")
            size = size[0]
        return int(size)

    @property
    def embed_dim(self) -> int:
        """``D``, the width of the image and text embeddings (512 for ViT-B/32, 768 for ViT-L/14)."""
        dim = self._dims.get("embed")
        if dim is None:
            out = getattr(self.clip.model.visual, "output_dim", None)
            if isinstance(out, int) and not isinstance(out, bool) and out > 0:
                dim = out
            else:  # towers without the attribute: measure it once
                dim = int(self.encode_text([""]).shape[-1])
            self._dims["embed"] = dim
        return dim

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The normalisation ``(1, 3, 1, 1)`` mean and std, placed once per device and dtype."""
        key = (x.device, x.dtype)
        stats = self._placed_stats.get(key)
        if stats is None:
            cfg = getattr(self.clip.model.visual, "preprocess_cfg", None) or {}
            mean = torch.tensor(cfg.get("mean", _CLIP_MEAN), device=x.device, dtype=x.dtype)
            std = torch.tensor(cfg.get("std", _CLIP_STD), device=x.device, dtype=x.dtype)
            stats = self._placed_stats[key] = (mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1))
        return stats

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 3, S, S)`` normalised model input (differentiable)."""
        x = check_tensor("images", images, ndim=4, floating=True, nonempty=True)
        if x.shape[1] != 3:
            raise InputValueError(f"images: expected 3 (RGB) channels, got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        S = self.image_size
        x = (x + 1.0) / 2.0
        if self.resize == "pool":
            x = F.adaptive_avg_pool2d(x, (S, S))
        elif x.shape[-2:] != (S, S):
            x = _resize_center_crop(x, S)
        mean, std = self._stats(x)
        return (x - mean) / std

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, D)`` float32 image embeddings, differentiable."""
        x = self.preprocess(images)
        emb = self.clip.model.encode_image(x.to(self._visual_dtype()))  # type: ignore[operator]
        return emb.float()  # type: ignore[no-any-return]

    def _visual_dtype(self) -> torch.dtype:
        """The dtype the image tower computes in: that of its first convolution's weight (the
        patch embedding or the ResNet stem). open_clip keeps some parameters, such as positional
        embeddings, in float32 when it casts a model to half precision."""
        visual: nn.Module = self.clip.model.visual  # type: ignore[assignment]
        conv = next((p for p in visual.parameters() if p.ndim == 4), None)
        return (conv if conv is not None else next(visual.parameters())).dtype

    def encode_text(self, prompts: str | Sequence[str]) -> Tensor:
        """``B`` prompts -> ``(B, D)`` float32 text embeddings (no gradients)."""
        with torch.no_grad():
            emb = self.clip.model.encode_text(self.clip.tokenize(prompts))  # type: ignore[operator]
        return emb.float()  # type: ignore[no-any-return]

    def text_embedding(
        self, text: str, templates: Sequence[str] | None = None, *, normalize: bool = True
    ) -> Tensor:
        """``(D,)`` embedding of ``text``, averaged over prompt ``templates`` (each with one ``{}``).

        With ``normalize`` each template's embedding is unit-normalised before averaging (and the
        mean is not renormalised), as StyleGAN-NADA does; ``templates=None`` encodes ``text``
        alone.
        """
        if not isinstance(text, str):
            raise InputTypeError(f"text: expected a string, got {describe(text)}")
        if templates is None:
            prompts = [text]
        else:
            tmpl = as_prompts("templates", templates)
            for i, t in enumerate(tmpl):
                if t.count("{}") != 1:
                    raise InputValueError(
                        f"templates[{i}]: expected exactly one '{{}}' placeholder, got {t!r}"
                    )
            prompts = []
            for i, t in enumerate(tmpl):
                try:
                    prompts.append(t.format(text))
                except (ValueError, KeyError, IndexError) as exc:
                    raise InputValueError(
                        f"templates[{i}]: expected a template with one '{{}}' placeholder and "
                        f"no other format fields (write a literal brace as '{{{{' or '}}}}'), got "
                        f"{t!r} ({exc})"
                    ) from None
        emb = self.encode_text(prompts)
        if normalize:
            emb = F.normalize(emb, dim=-1)
        return emb.mean(dim=0)


def _resize_center_crop(x: Tensor, S: int) -> Tensor:
    """torchvision's ``Resize(S, bicubic, antialias=True)`` then ``CenterCrop(S)``: ``(B, C, S, S)``.

    Integer arithmetic as torchvision's (CLIP's and open_clip's eval transform): the long side
    becomes ``int(S * long / short)`` (truncated), the crop offset is
    ``int(round((side - S) / 2))`` (Python's round), and an image whose size does not change is
    not resampled.
    """
    H, W = int(x.shape[-2]), int(x.shape[-1])
    short, long = (W, H) if W <= H else (H, W)
    new_long = int(S * long / short)
    size = (new_long, S) if W <= H else (S, new_long)
    if size != (H, W):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    top = round((size[0] - S) / 2.0)  # Python rounding, as torchvision
    left = round((size[1] - S) / 2.0)
    return x[..., top : top + S, left : left + S]
