"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper.

``ClassifierFreeGuidance(model, scale, null)`` is itself a model in imgdiff's contract: called as
``guided(x, t, **cond)`` it runs the network once on the doubled batch ``[x, x]`` with the null
condition for the first half and ``cond`` for the second, and returns
``out_u + scale (out_c - out_u)`` (over the mean half only for a learned-variance model's ``2C``
output). The combination is linear in the model output, so it is the same guidance for epsilon,
x0 and v models. Because it is a deterministic function of
``(x, t, cond)``, EDICT inverts through it exactly when both passes use the same wrapper.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import (
    check_batch_timesteps,
    check_float,
    check_int,
    check_same_shape,
    check_tensor,
    describe,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model

__all__ = ["ClassifierFreeGuidance", "rescale_guidance"]


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, Sec. 3.4: ``phi guided std(cond)/std(guided) + (1 - phi) guided``.

    Standard deviations (unbiased, as Lin et al.) over all non-batch dimensions; ``guided`` and
    ``cond`` have the same shape ``(B, ...)`` with at least two elements per sample. A sample
    whose ``guided`` is constant (standard deviation 0, the ratio undefined) is left as it is.
    """
    check_float("phi", phi, min=0.0, max=1.0)
    check_tensor("guided", guided, floating=True)
    check_same_shape("cond", check_tensor("cond", cond, floating=True), "guided", guided)
    if guided.ndim < 2 or guided[0].numel() < 2:
        raise InputValueError(
            "guided: expected shape (B, ...) with at least two elements per sample (a standard "
            f"deviation per sample), got {tuple(guided.shape)}"
        )
    dims = tuple(range(1, guided.ndim))
    std_guided = guided.std(dim=dims, keepdim=True)
    flat = std_guided == 0
    ratio = torch.where(
        flat, 1.0, cond.std(dim=dims, keepdim=True) / torch.where(flat, 1.0, std_guided)
    )
    return phi * guided * ratio + (1.0 - phi) * guided


@dataclass(frozen=True, eq=False)
class ClassifierFreeGuidance:
    """Wrap a conditional model into a guided one: ``out_u + scale (out_c - out_u)``.

    Args:
        model: ``model(x, t, **cond)``, trained with condition dropout.
        scale: guidance weight ``w`` (1 = the conditional model, 0 = the unconditional one).
        null: the unconditional keyword arguments, e.g. ``{"context": empty_text_embedding}``;
            at least one. Each tensor has batch size 1 (broadcast) or ``B``.
        rescale: Lin et al.'s guidance rescale ``phi`` in ``[0, 1]`` (0 = off).
        shared: names of keyword arguments passed unchanged to the doubled batch (e.g. a
            scalar-like tensor whose first dimension is not the batch); any collection of
            strings, not a bare string.
        guided_channels: guide only the first ``k`` output channels and take the rest from the
            conditional output. ``None`` (default): all channels of an output shaped like ``x``,
            and the mean half (``k = C``) of a learned-variance model's ``2C`` output, since
            extrapolating the variance half breaks sampling (improved DDPM; spec 8.2).

    Other keyword arguments of a call are per-sample and shared by both halves: tensors with
    batch ``B`` (or 1) are doubled, as are tensors inside mappings and sequences; anything else
    is passed through. Shapes: ``x`` ``(B, ...)``, ``t`` ``(B,)``; the output has the model
    output's shape.
    """

    model: Model
    scale: float
    null: Mapping[str, Tensor] = field(default_factory=dict)
    rescale: float = 0.0
    shared: frozenset[str] = frozenset()
    guided_channels: int | None = None
    _null_cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise InputTypeError(f"model: expected a callable, got {describe(self.model)}")
        check_float("scale", self.scale)
        check_float("rescale", self.rescale, min=0.0, max=1.0)
        if not isinstance(self.null, Mapping):
            raise InputTypeError(
                f"null: expected a mapping of keyword tensors, got {describe(self.null)}"
            )
        if not self.null:
            raise InputValueError(
                "null: expected at least one unconditional keyword tensor (e.g. the empty "
                "prompt's embedding), got an empty mapping"
            )
        for key, value in self.null.items():
            if not isinstance(value, Tensor) or value.ndim == 0:
                raise InputTypeError(
                    f"null[{key!r}]: expected a tensor with a batch dimension, got {describe(value)}"
                )
        shared: object = self.shared  # annotated frozenset, but users pass sets, lists, strings
        if isinstance(shared, str) or not isinstance(shared, Collection):
            raise InputTypeError(
                "shared: expected a collection of keyword names such as frozenset({'mask'}), "
                f"got {describe(shared)}"
            )
        for name in shared:
            if not isinstance(name, str):
                raise InputTypeError(f"shared: expected keyword names (str), got {describe(name)}")
        object.__setattr__(self, "shared", frozenset(shared))
        if self.guided_channels is not None:
            check_int("guided_channels", self.guided_channels, min=1)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """One batched forward of ``[null, cond]``; returns the guided output ``(B, ...)``."""
        x = check_tensor("x", x, min_ndim=1, floating=True)
        B = x.shape[0]
        t = check_batch_timesteps(t, x)
        self.check_conditions("cond", cond)
        doubled: dict[str, Any] = {}
        for key, value in cond.items():
            if key in self.null:
                c = self._batched(key, value, B)
                doubled[key] = torch.cat([self._null(key, c), c], dim=0)
            elif key in self.shared:
                doubled[key] = value
            else:
                doubled[key] = _double(value, B)
        out = self.model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **doubled)
        if not isinstance(out, Tensor) or out.shape[0] != 2 * B:
            raise InputValueError(
                f"model output: expected a tensor with batch {2 * B} (the doubled batch), got {describe(out)}"
            )
        out_u, out_c = out.chunk(2, dim=0)
        k = self._guided(x, out)
        u, c = (out_u, out_c) if k is None else (out_u[:, :k], out_c[:, :k])
        guided = u + self.scale * (c - u)
        if self.rescale > 0:
            guided = rescale_guidance(guided, c, self.rescale)
        return guided if k is None else torch.cat([guided, out_c[:, k:]], dim=1)

    def check_conditions(self, name: str, cond: Mapping[str, Any]) -> None:
        """Refuse keyword conditions ``cond`` (named ``name`` in the error) lacking a key of ``null``."""
        missing = set(self.null) - set(cond)
        if missing:
            raise InputValueError(
                f"{name}: expected a conditional value for every key of null {sorted(self.null)}, "
                f"missing {sorted(missing)}"
            )

    def _guided(self, x: Tensor, out: Tensor) -> int | None:
        """How many leading output channels to guide (``None``: all of them)."""
        k = self.guided_channels
        C = out.shape[1] if out.ndim > 1 else 0
        if k is None:
            # a learned-variance output (B, 2C, ...): guide the mean half only
            if x.ndim > 1 and out.ndim == x.ndim and 2 * x.shape[1] == C:
                return x.shape[1]
            return None
        if k > C:
            raise InputValueError(
                f"guided_channels: expected at most the model output's {C} channels, got {k}"
            )
        return k

    def _batched(self, key: str, value: object, batch: int) -> Tensor:
        null = self.null[key]
        if not isinstance(value, Tensor):
            raise InputTypeError(
                f"cond[{key!r}]: expected a tensor like null[{key!r}], got {describe(value)}"
            )
        if null.shape[1:] != value.shape[1:] or value.shape[0] not in (1, batch):
            expected = (batch, *null.shape[1:])
            raise InputValueError(
                f"cond[{key!r}]: expected shape {expected} (or batch 1) to match null[{key!r}] "
                f"{tuple(null.shape)} and the batch, got {tuple(value.shape)}"
            )
        return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value

    def _null(self, key: str, like: Tensor) -> Tensor:
        """``null[key]`` on ``like``'s device and dtype, expanded to its batch (copied once; a
        null that requires grad, a learned null embedding, is converted on every call so that
        the copy follows its updates and each call has its own autograd graph)."""
        cache_key = (key, like.device, like.dtype)
        null = self._null_cache.get(cache_key)
        if null is None:
            source = self.null[key]
            null = source.to(device=like.device, dtype=like.dtype)
            if not source.requires_grad:
                self._null_cache[cache_key] = null
        if null.shape[0] == 1:
            return null.expand(like.shape[0], *null.shape[1:])
        if null.shape[0] != like.shape[0]:
            raise InputValueError(
                f"null[{key!r}]: expected batch 1 or {like.shape[0]}, got shape {tuple(null.shape)}"
            )
        return null


def _double(value: object, batch: int) -> object:
    """Duplicate the per-sample tensors in ``value`` (recursively) for the doubled batch."""
    if isinstance(value, Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return torch.cat([value, value], dim=0)
        if value.ndim > 0 and value.shape[0] == 1:
            return value.expand(2 * batch, *value.shape[1:])
        return value
    if isinstance(value, Mapping):
        return {k: _double(v, batch) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*[_double(v, batch) for v in value])  # type: ignore[arg-type]
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v, batch) for v in value)
    return value
