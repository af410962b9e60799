"""CLIP losses: global (cosine, spherical), directional (StyleGAN-NADA, ZeCon), DiffusionCLIP's transform.

The distances are plain functions of embeddings; :class:`CLIPGlobalLoss` and
:class:`CLIPDirectionalLoss` apply them to images through a :class:`~imgdiff.clip.CLIPEncoder`,
optionally over ZeCon's augmented copies or patches (:class:`~imgdiff.losses.CLIPAugment`).
With augmentation each image's loss is the mean over its copies (rows ``b::B``, spec 7.2);
the batch is then summed (``reduction="sum"``, ZeCon, so a sample's guidance does not depend on
the batch size) or averaged (``"mean"``, StyleGAN-NADA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from torch import Tensor

from imgdiff._checks import check_choice, check_same_shape, check_tensor, describe
from imgdiff.clip.encoder import IMAGENET_TEMPLATES, CLIPEncoder
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.losses.augment import CLIPAugment

__all__ = [
    "CLIPDirectionalLoss",
    "CLIPGlobalLoss",
    "ClipMetric",
    "DirectionalVariant",
    "Reduction",
    "cosine_distance",
    "diffusionclip_transform",
    "directional_loss",
    "spherical_distance",
]

ClipMetric = Literal["cosine", "spherical"]
DirectionalVariant = Literal["nada", "zecon"]
Reduction = Literal["sum", "mean", "none"]
_METRICS: tuple[ClipMetric, ...] = ("cosine", "spherical")
_VARIANTS: tuple[DirectionalVariant, ...] = ("nada", "zecon")
_REDUCTIONS: tuple[Reduction, ...] = ("sum", "mean", "none")


def _pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    check_tensor(name_a, a, min_ndim=1, floating=True)
    check_tensor(name_b, b, min_ndim=1, floating=True)
    if a.shape[-1] != b.shape[-1]:
        raise InputValueError(
            f"{name_b}: expected embeddings of width {a.shape[-1]} (that of {name_a}), "
            f"got shape {tuple(b.shape)}"
        )
    if b.ndim > a.ndim or b.shape != a.shape[a.ndim - b.ndim :]:
        raise InputValueError(
            f"{name_b}: expected shape {tuple(a.shape)} or a trailing part of it (one embedding "
            f"for all rows), got {tuple(b.shape)}"
        )
    return a, b


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` along the last axis: ``(..., D), (..., D) or (D,) -> (...)``.

    StyleGAN-NADA's global loss ``1 - logits_per_image / 100`` (Gal et al. 2022), in ``[0, 2]``.
    """
    a, b = _pair(a, b, "a", "b")
    return 1.0 - F.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-12)


def spherical_distance(a: Tensor, b: Tensor) -> Tensor:
    """Crowson's spherical distance ``2 arcsin(|a^ - b^| / 2)^2`` of unit vectors: ``(...)``.

    Equals ``theta^2 / 2`` for the angle ``theta`` between ``a`` and ``b``: 0 for equal
    directions, ``pi^2 / 8`` for orthogonal, ``pi^2 / 2`` for opposite ones (spec 7.2). The
    gradient is finite everywhere: 0 at equal directions, and also at (numerically) opposite
    ones, where ``arcsin``'s argument is clamped at 1 (within ~1e-4 of opposite in float32) with
    no gradient at the clamp.
    """
    a, b = _pair(a, b, "a", "b")
    chord2 = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(dim=-1)
    tiny = torch.finfo(chord2.dtype).tiny
    half_chord = chord2.clamp_min(tiny).sqrt().mul(0.5)
    # min(half_chord, 1) whose gradient is 0 at 1 itself, where arcsin's is infinite: clamp_max
    # passes the gradient at its bound in torch 2.11 and earlier (inf there, NaN upstream)
    half_chord = torch.where(half_chord < 1.0, half_chord, 1.0)
    return half_chord.arcsin().pow(2).mul(2.0)


def directional_loss(image_direction: Tensor, text_direction: Tensor) -> Tensor:
    """``1 - cos(Delta_I, Delta_T)``: ``(B, D), (B, D) or (D,) -> (B,)``, in ``[0, 2]``.

    StyleGAN-NADA's directional loss (Gal et al. 2022, Eq. 2); invariant to positive scaling of
    either direction.
    """
    image_direction, text_direction = _pair(
        image_direction, text_direction, "image_direction", "text_direction"
    )
    return cosine_distance(image_direction, text_direction)


def diffusionclip_transform(loss: Tensor) -> Tensor:
    """DiffusionCLIP's ``-log((2 - L_dir) / 2)`` (Kim et al. 2022): 0 when aligned, log 2 at 1.

    ``loss`` is a cosine distance, in ``[0, 2]``; it is clamped to that range first (float
    rounding can leave ``1 - cos`` just outside it, which would give NaN), so opposite
    directions give ``inf``.
    """
    check_tensor("loss", loss, floating=True)
    return -torch.log((2.0 - loss.clamp(0.0, 2.0)) / 2.0)


def _reduce(per_image: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "sum":
        return per_image.sum()
    if reduction == "mean":
        return per_image.mean()
    return per_image


def _per_image(values: Tensor, batch: int) -> Tensor:
    """Mean over each image's copies: ``(n B,)`` copy-major -> ``(B,)``."""
    return values.reshape(-1, batch).mean(dim=0)


def _check_images(name: str, x: Tensor) -> Tensor:
    check_tensor(name, x, ndim=4, floating=True)
    if x.shape[1] != 3:
        raise InputValueError(f"{name}: expected (B, 3, H, W) RGB images, got {tuple(x.shape)}")
    return check_tensor(name, x, nonempty=True)  # B >= 1 images of at least 1x1 pixels


@dataclass(frozen=True, eq=False)
class CLIPGlobalLoss:
    """Distance between CLIP embeddings of images and a target text (spec 7.2, 7.4).

    Args:
        encoder: a :class:`~imgdiff.clip.CLIPEncoder`.
        target: the target text (e.g. ``"a painting by Van Gogh"``), or its ``(D,)`` embedding
            (``D`` = ``encoder.embed_dim``; used as given, scale does not matter).
        metric: ``"spherical"`` (ZeCon, Crowson) or ``"cosine"`` (StyleGAN-NADA).
        augment: ZeCon's augmenter (copies or patches, :class:`CLIPAugment`); ``None`` encodes
            each image once.
        templates: prompt templates averaged for the text embedding (``None``: the text alone,
            as ZeCon; NADA's global loss uses ``"a {}"``); must be ``None`` when ``target`` is
            an embedding.
        reduction: ``"sum"`` over the batch (ZeCon), ``"mean"`` or ``"none"`` (``(B,)``).

    ``loss(x)``: ``x`` ``(B, 3, H, W)`` in ``[-1, 1]`` -> scalar (or ``(B,)``); ``generator``
    draws the augmentations.
    """

    encoder: CLIPEncoder
    target: str | Tensor
    metric: ClipMetric = "spherical"
    augment: CLIPAugment | None = None
    templates: Sequence[str] | None = None
    reduction: Reduction = "sum"
    target_embedding: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_encoder(self.encoder)
        check_choice("metric", self.metric, _METRICS)
        check_choice("reduction", self.reduction, _REDUCTIONS)
        _check_augment(self.augment)
        _check_templates_for_texts(self.templates, target=self.target)
        emb = _text_or_embedding("target", self.target, self.encoder, self.templates)
        if float(emb.norm()) == 0.0:
            raise InputValueError(
                "target: expected a non-zero embedding (every image is equally far from zero: "
                "the loss would be a constant with no gradient), got all zeros"
            )
        object.__setattr__(self, "target_embedding", emb)

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        x = _check_images("x", x)
        B = x.shape[0]
        views = x if self.augment is None else self.augment(x, generator=generator)
        emb = self.encoder.encode_image(views)
        target = self.target_embedding.to(emb.device)
        dist = spherical_distance if self.metric == "spherical" else cosine_distance
        return _reduce(_per_image(dist(emb, target), B), self.reduction)


@dataclass(frozen=True, eq=False)
class CLIPDirectionalLoss:
    """Align the image edit direction with a text direction: ``1 - cos(Delta_I, Delta_T)`` (spec 7.3).

    Args:
        encoder: a :class:`~imgdiff.clip.CLIPEncoder`.
        source_text / target_text: describe the source image and the edit (``"photo"`` ->
            ``"sketch"``), or give their ``(D,)`` embeddings (``D`` = ``encoder.embed_dim``),
            used as given: for ``"zecon"`` raw embeddings (``encoder.encode_text([text])[0]``);
            for ``"nada"`` what a text gives, the mean of the unit-normalised template
            embeddings (``encoder.text_embedding(text, templates)``); its norm is at most 1, and
            a larger one (a raw embedding) is refused.
        variant: ``"nada"`` (StyleGAN-NADA: unit-normalised embeddings differenced, text
            direction averaged over ``templates``, zero-direction guard) or ``"zecon"`` (raw
            embeddings differenced, no templates).
        augment: ZeCon's augmenter. With ``augment.patch`` the source side is the whole source
            image repeated (``is_global``), as in ZeCon's patch directional loss: the direction
            is patch(x) minus whole(y). Without patches both sides get the same warps
            (:meth:`CLIPAugment.paired`), so the direction measures the edit.
        templates: NADA's prompt templates (default :data:`~imgdiff.clip.IMAGENET_TEMPLATES`);
            must be ``None`` for ``"zecon"`` and when a text is given as an embedding.
        zero_direction_guard: NADA's guard, for copies whose edited and source views are
            equal (``x == y``, as at initialisation; never with patches, whose source side is
            the whole image): there ``Delta_I = e^(x + 1e-6) - e^(x)``, ``e^(x)`` held constant,
            as NADA's ``e^(x + 1e-6) - e^(y)`` with ``e^(y) = e^(x)``. The views are compared,
            not the embeddings: ``e(y)`` is computed without autograd, where torch's attention
            takes another kernel, so ``e^(x) - e^(y)`` is float noise (1e-7 to 1e-6), not
            zero, when ``x == y``. The loss is finite, its gradient large (``Delta_I`` is tiny).
            One flag is read on the host per call (a device synchronisation); ``False`` skips
            the guard.
        reduction: ``"sum"`` over the batch (ZeCon), ``"mean"`` (NADA) or ``"none"``.

    ``loss(x, y)``: edited ``x`` and source ``y``, both ``(B, 3, H, W)`` in ``[-1, 1]``; the
    gradient flows to ``x`` only. Compose with :func:`diffusionclip_transform` for DiffusionCLIP.
    """

    encoder: CLIPEncoder
    source_text: str | Tensor
    target_text: str | Tensor
    variant: DirectionalVariant = "nada"
    augment: CLIPAugment | None = None
    templates: Sequence[str] | None = None
    zero_direction_guard: bool = True
    reduction: Reduction = "sum"
    text_direction: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_encoder(self.encoder)
        check_choice("variant", self.variant, _VARIANTS)
        check_choice("reduction", self.reduction, _REDUCTIONS)
        _check_augment(self.augment)
        if not isinstance(self.zero_direction_guard, bool):
            raise InputTypeError(
                f"zero_direction_guard: expected a bool, got {describe(self.zero_direction_guard)}"
            )
        nada = self.variant == "nada"
        if not nada and self.templates is not None:
            raise InputValueError(
                "templates: the 'zecon' variant encodes the texts alone; expected None, got "
                f"{describe(self.templates)}"
            )
        _check_templates_for_texts(
            self.templates, source_text=self.source_text, target_text=self.target_text
        )
        templates = (
            (IMAGENET_TEMPLATES if self.templates is None else self.templates) if nada else None
        )
        src = _text_or_embedding("source_text", self.source_text, self.encoder, templates, nada)
        tgt = _text_or_embedding("target_text", self.target_text, self.encoder, templates, nada)
        if nada:
            for name, value, emb in (
                ("source_text", self.source_text, src),
                ("target_text", self.target_text, tgt),
            ):
                norm = float(emb.norm())
                if isinstance(value, Tensor) and norm > 1.0 + 1e-3:
                    raise InputValueError(
                        f"{name}: for variant='nada' expected the mean of unit-normalised "
                        "template embeddings (norm <= 1, as encoder.text_embedding(text, "
                        f"templates) gives), got an embedding of norm {norm:.4g}; pass the "
                        "text, or unit-normalise a raw embedding"
                    )
        direction = tgt - src
        if float(direction.norm()) <= 1e-6 * max(float(src.norm()), float(tgt.norm())):
            raise InputValueError(
                "target_text: expected another text (or embedding) than source_text, got one "
                "with the same embedding: the text direction is zero, so the loss would be a "
                "constant with no gradient"
            )
        object.__setattr__(
            self, "text_direction", F.normalize(direction, dim=-1) if nada else direction
        )

    def __call__(self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        x = _check_images("x", x)
        y = _check_images("y", y)
        if x.shape[0] != y.shape[0]:
            raise InputValueError(
                f"y: expected one source image per edited image ({x.shape[0]}), got {tuple(y.shape)}"
            )
        if self.augment is None or not self.augment.patch:
            check_same_shape("y", y, "x", x)
        B = x.shape[0]
        if self.augment is None:
            x_views, y_views = x, y
        elif self.augment.patch:
            x_views = self.augment(x, generator=generator)
            y_views = self.augment(y, is_global=True)
        else:
            x_views, y_views = self.augment.paired(x, y, generator=generator)
        with torch.no_grad():
            e_y = self.encoder.encode_image(y_views)
        e_x = self.encoder.encode_image(x_views)
        direction = self._image_direction(e_x, e_y, x_views, y_views)
        per_copy = directional_loss(direction, self.text_direction.to(direction.device))
        return _reduce(_per_image(per_copy, B), self.reduction)

    def _image_direction(
        self, e_x: Tensor, e_y: Tensor, x_views: Tensor, y_views: Tensor
    ) -> Tensor:
        """``(N, D)`` image directions of the ``N`` copies; NADA's guard where views are equal."""
        if self.variant == "zecon":
            return e_x - e_y
        u_x = F.normalize(e_x, dim=-1)
        direction = u_x - F.normalize(e_y, dim=-1)
        if self.zero_direction_guard and x_views.shape == y_views.shape:
            same = (x_views == y_views).flatten(1).all(dim=1)  # (N,): Delta_I should be 0
            if bool(same.any()):  # one host read per call; see zero_direction_guard
                # e(y) = e(x) there, taken from the same (autograd) evaluation as e(x): the
                # no-grad e(y) differs from it by float noise, which would be the direction
                nudged = F.normalize(self.encoder.encode_image(x_views + 1e-6), dim=-1)
                direction = torch.where(same[:, None], nudged - u_x.detach(), direction)
        return direction


def _check_encoder(encoder: object) -> None:
    if not isinstance(encoder, CLIPEncoder):
        raise InputTypeError(
            f"encoder: expected an imgdiff.clip.CLIPEncoder, got {describe(encoder)}"
        )


def _check_augment(augment: object) -> None:
    if augment is not None and not isinstance(augment, CLIPAugment):
        raise InputTypeError(
            f"augment: expected None or an imgdiff.losses.CLIPAugment, got {describe(augment)}"
        )


def _check_templates_for_texts(templates: object, **texts: object) -> None:
    """Templates apply to texts only: refuse them when a text is given as an embedding."""
    if templates is None:
        return
    for name, value in texts.items():
        if isinstance(value, Tensor):
            raise InputValueError(
                f"templates: prompt templates apply to texts, but {name} is a given embedding; "
                f"expected None (or pass the text), got {describe(templates)}"
            )


def _text_or_embedding(
    name: str,
    value: object,
    encoder: CLIPEncoder,
    templates: Sequence[str] | None,
    normalize: bool = True,
) -> Tensor:
    """A ``(D,)`` float32 text embedding from a prompt, or a copy of a given embedding."""
    if isinstance(value, str):
        return encoder.text_embedding(value, templates, normalize=normalize).detach()
    if isinstance(value, Tensor):
        D = encoder.embed_dim
        if value.ndim != 1 or not value.dtype.is_floating_point or value.shape[0] != D:
            raise InputValueError(
                f"{name}: expected a text or a ({D},) floating embedding ({D} = the encoder's "
                f"embedding width), got {describe(value)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise InputValueError(f"{name}: expected a finite embedding, got non-finite values")
        return value.detach().to(dtype=torch.float32, copy=True)
    raise InputTypeError(f"{name}: expected a string or a (D,) embedding, got {describe(value)}")
