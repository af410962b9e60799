"""Train-time condition dropout for classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_float, check_int, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.randomness import Generators, check_generators

__all__ = ["drop_conditions"]


def drop_conditions(
    cond: Mapping[str, Tensor],
    null: Mapping[str, Tensor],
    p_uncond: float,
    *,
    batch: int,
    generator: Generators = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Replace each sample's conditions by the null ones with probability ``p_uncond`` (spec 8.2).

    Args:
        cond: keyword conditions, each a tensor of batch ``batch``.
        null: the null value of every key of ``cond`` (batch 1, broadcast; or ``batch``): the
            empty prompt's embedding, the null class label, zeros for an image condition.
        p_uncond: drop probability in [0, 1] (typically 0.1).
        generator: one generator, or one per sample.

    Returns the new conditions and the ``(batch,)`` bool mask of dropped samples. Dropped samples
    carry the null value exactly; the inputs are not modified.
    """
    p = check_float("p_uncond", p_uncond, min=0.0, max=1.0)
    batch = check_int("batch", batch, min=1)
    for name, mapping in (("cond", cond), ("null", null)):
        if not isinstance(mapping, Mapping):
            raise InputTypeError(
                f"{name}: expected a mapping of keyword tensors, got {describe(mapping)}"
            )
    gens = check_generators(generator, batch)
    if set(null) != set(cond):
        raise InputValueError(f"null: expected the keys of cond {sorted(cond)}, got {sorted(null)}")
    if gens is None or isinstance(gens, torch.Generator):
        u = torch.rand(batch, generator=gens)
    else:
        u = torch.stack([torch.rand((), generator=g) for g in gens])
    dropped = u < p
    out: dict[str, Any] = {}
    for key, value in cond.items():
        v = check_tensor(f"cond[{key!r}]", value)
        if v.ndim == 0 or v.shape[0] != batch:
            raise InputValueError(
                f"cond[{key!r}]: expected batch {batch} first, got shape {tuple(v.shape)}"
            )
        n = null[key]
        if not isinstance(n, Tensor):
            raise InputTypeError(f"null[{key!r}]: expected a tensor, got {describe(n)}")
        if n.shape[1:] != v.shape[1:] or n.shape[0] not in (1, batch):
            raise InputValueError(
                f"null[{key!r}]: expected shape (1 or {batch}, {', '.join(map(str, v.shape[1:]))}) like "
                f"cond[{key!r}], got {tuple(n.shape)}"
            )
        if not torch.can_cast(n.dtype, v.dtype):
            raise InputTypeError(
                f"null[{key!r}]: expected a dtype that casts to cond[{key!r}]'s {v.dtype} without "
                f"changing its values, got {n.dtype}"
            )
        where = dropped.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
        out[key] = torch.where(where, n.to(device=v.device, dtype=v.dtype).expand_as(v), v)
    return out, dropped
