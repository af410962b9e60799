"""The model contract and small adapters that make networks fit it.

A model is any callable ``model(x, t, **cond) -> Tensor`` with ``x`` of shape ``(B, C, H, W)``
(or any ``(B, ...)``) and ``t`` an int64 tensor of shape ``(B,)`` holding training timesteps
(0-based). What it outputs (``epsilon``, ``sample`` or ``v``) is declared once on the sampler as
its ``prediction``, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from imgdiff._checks import check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["BoundModel", "Model", "check_model_output", "infer_model_dtype", "without_variance"]

Model = Callable[..., Tensor]
"""``model(x: (B, ...), t: (B,) int64, **cond) -> Tensor`` of ``x``'s shape (``2C`` channels
for a learned-variance model)."""


def wrapped(model: object) -> Iterator[object]:
    """``model`` and the objects it wraps, nearest first (at most 32; networks are not entered).

    Follows the usual ways of wrapping an ``nn.Module``: imgdiff's adapters and classifier-free
    guidance (``.model``), bound methods (``unet.forward``), ``functools.partial``, closures and
    functions naming a module-level network (``lambda x, t: unet(x, t).sample`` in a notebook,
    where ``unet`` is a global).
    """
    seen: set[int] = set()
    todo: list[object] = [model]
    while todo and len(seen) < 32:
        obj = todo.pop(0)
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, torch.nn.Module):
            continue
        todo.append(getattr(obj, "model", None))
        todo.append(getattr(obj, "__self__", None))  # bound method
        todo.append(getattr(obj, "func", None))  # functools.partial
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        code, namespace = getattr(obj, "__code__", None), getattr(obj, "__globals__", None)
        if code is not None and isinstance(namespace, dict):  # a function: its global networks
            for name in getattr(code, "co_names", ()):
                value = namespace.get(name)
                if isinstance(value, torch.nn.Module):
                    todo.append(value)


def infer_model_dtype(model: object) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of the network behind ``model``, else
    ``None``; the network is found through its wrappers as :func:`imgdiff.models.wrapped` follows them."""
    for obj in wrapped(model):
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                if p.dtype.is_floating_point:
                    return p.dtype
    return None


def check_model_output(
    out: Tensor, x: Tensor, *, factor: int = 1, name: str = "model output"
) -> None:
    """Check that a model output for the sample ``x`` ``(B, C, ...)`` has shape ``(B, factor C, ...)``
    and ``x``'s device (the fused kernels read raw pointers: another device would crash them)."""
    if out.device != x.device:
        raise InputValueError(
            f"{name}: expected a tensor on the sample's device {x.device}, got {out.device}; "
            "return the output where the sample is (or sample on the model's device)"
        )
    if factor == 1 and out.shape == x.shape:  # the common case, checked cheaply (inner loops)
        return
    expected = (x.shape[0], x.shape[1] * factor, *x.shape[2:])
    if out.shape != expected:
        hint = ""
        if factor == 1 and out.shape[1:2] == (2 * x.shape[1],):
            hint = (
                "; a learned-variance model returns 2C channels: wrap it with "
                "imgdiff.without_variance(model) or use DDPM(variance='learned_range')"
            )
        raise InputValueError(
            f"{name}: expected shape {expected} for a sample of shape {tuple(x.shape)}, "
            f"got {tuple(out.shape)}{hint}"
        )


class _WithoutVariance:
    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = check_tensor("model output", self.model(x, t, **cond), min_ndim=2)
        return out[:, : x.shape[1]]

    def __repr__(self) -> str:
        return f"without_variance({self.model!r})"


def without_variance(model: Model) -> Model:
    """Adapt a learned-variance model (output ``(B, 2C, ...)``, improved DDPM) to output ``(B, C, ...)``.

    Keeps the mean half (the first ``C`` channels) so the model can drive samplers that do not
    use a learned variance, such as DDIM.
    """
    return _WithoutVariance(model)


class BoundModel:
    """The user's model bound to its keyword conditions, with the dtype boundary.

    ``bound(x, t)`` casts ``x`` (``(B, ...)``, state dtype) to ``model_dtype``, calls
    ``model(x, t, **kwargs)`` with ``t`` ``(B,)`` int64, and returns the output in
    ``state_dtype``. Samplers call this, never the raw model.
    """

    __slots__ = ("kwargs", "model", "model_dtype", "state_dtype")

    def __init__(
        self,
        model: Model,
        *,
        model_dtype: torch.dtype,
        state_dtype: torch.dtype,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.model_dtype = model_dtype
        self.state_dtype = state_dtype
        self.kwargs = dict(kwargs or {})

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The model's output at ``(x, t)``, ``(B, ...)`` in the state dtype."""
        if x.dtype != self.model_dtype:
            x = x.to(self.model_dtype)
        out = self.model(x, t, **self.kwargs)
        if not isinstance(out, Tensor):
            raise InputTypeError(
                f"model: expected the model to return a torch.Tensor, got {describe(out)}; wrap "
                "networks that return objects, e.g. lambda x, t, **c: unet(x, t, **c).sample"
            )
        if out.dtype == self.state_dtype:
            return out
        if not out.dtype.is_floating_point:
            raise InputTypeError(
                f"model: expected the model to return a floating-point tensor, got {out.dtype} "
                f"(casting it to {self.state_dtype} would hide a network or wrapper bug)"
            )
        return out.to(self.state_dtype)
