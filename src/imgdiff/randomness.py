"""Reproducible Gaussian noise with one generator per sample.

A ``generator`` argument throughout imgdiff is ``None`` (torch's global RNG), one
``torch.Generator`` for the whole batch, or a sequence with one generator per sample. With a
sequence, sample ``b``'s noise depends only on ``generator[b]``, so it is the same alone or in
any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from imgdiff._checks import check_floating_dtype, describe
from imgdiff.buffers import out_empty
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["Generators", "check_generators", "draw_normal", "randn"]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""``None`` (torch's global RNG), one generator for the batch, or one generator per sample."""


def check_generators(generator: object, batch: int) -> Generators:
    """Validate ``generator`` for a batch of ``batch`` samples and return it."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, Sequence) and not isinstance(generator, (str, bytes)):
        gens = list(generator)
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise InputTypeError(
                "generator: expected a torch.Generator or a sequence of them, got a sequence "
                f"containing {describe(next(g for g in gens if not isinstance(g, torch.Generator)))}"
            )
        if len(gens) != batch:
            raise InputValueError(
                f"generator: expected one generator per sample ({batch}), got {len(gens)}"
            )
        return gens
    raise InputTypeError(
        f"generator: expected None, a torch.Generator or a sequence of them, got {describe(generator)}"
    )


def randn(
    shape: Sequence[int],
    *,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise of ``shape = (B, ...)``, drawn per sample when given a generator list.

    Each generator draws on its own device; the result is moved to ``device``.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InputTypeError(f"shape: expected a sequence of ints, got {describe(shape)}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise InputTypeError(f"shape: expected ints, got {describe(dim)} in {tuple(shape)}")
        if dim < 0:
            raise InputValueError(f"shape: expected sizes >= 0, got {dim} in {tuple(shape)}")
    shape = tuple(shape)
    if not shape:
        raise InputValueError("shape: expected at least a batch dimension, got ()")
    check_floating_dtype("dtype", dtype)
    gens = check_generators(generator, shape[0])
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return draw_normal(shape, gens, dev, dtype)


def draw_normal(
    shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """:func:`randn` without validation, for loops whose arguments were checked once (on a CPU,
    into a recycled buffer inside :func:`~imgdiff.buffers.reuse_buffers`)."""
    out = out_empty(shape, dtype, device)  # None outside a loop's pool
    if generator is None:
        if out is not None:
            return torch.randn(tuple(shape), dtype=dtype, out=out)
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        if out is not None and generator.device.type == "cpu":
            return torch.randn(tuple(shape), generator=generator, dtype=dtype, out=out)
        return torch.randn(
            tuple(shape), generator=generator, device=generator.device, dtype=dtype
        ).to(device)
    item = tuple(shape[1:])
    parts = [
        torch.randn(item, generator=g, device=g.device, dtype=dtype).to(device) for g in generator
    ]
    if out is not None:
        return torch.stack(parts, out=out)
    return torch.stack(parts)
