"""Argument validation shared by the public entry points (internal).

Each helper raises an :mod:`imgdiff.errors` exception whose message names the argument, what was
expected and what came. None of these helpers is meant to run inside a sampling loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from imgdiff.errors import InputTypeError, InputValueError

__all__ = [
    "check_choice",
    "check_float",
    "check_floating_dtype",
    "check_int",
    "check_kwargs",
    "check_same_shape",
    "check_tensor",
    "check_timestep_tensor",
    "describe",
]

_S = TypeVar("_S", bound=str)


def describe(value: object) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    return f"object of type {type(value).__name__}"


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    floating: bool = False,
    nonempty: bool = False,
) -> Tensor:
    """Check that ``value`` is a tensor with the given rank and, if asked, a floating dtype and
    at least one element (``nonempty``: no dimension of size 0)."""
    if not isinstance(value, Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor, got {describe(value)}")
    if ndim is not None and value.ndim != ndim:
        raise InputValueError(
            f"{name}: expected a tensor with {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if min_ndim is not None and value.ndim < min_ndim:
        raise InputValueError(
            f"{name}: expected a tensor with at least {min_ndim} dimensions (batch first), "
            f"got shape {tuple(value.shape)}"
        )
    if floating and not value.dtype.is_floating_point:
        raise InputTypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if nonempty and value.numel() == 0:
        raise InputValueError(
            f"{name}: expected a non-empty tensor (no dimension of size 0), "
            f"got shape {tuple(value.shape)}"
        )
    return value


def check_kwargs(name: str, value: object) -> Mapping[str, Any] | None:
    """Check that ``value`` is ``None`` or a mapping of keyword arguments and return it."""
    if value is not None and not isinstance(value, Mapping):
        raise InputTypeError(
            f"{name}: expected a mapping of keyword arguments, got {describe(value)}"
        )
    return value


def check_same_shape(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """Check that ``value`` has exactly the shape of ``ref`` (no broadcasting) and is on its
    device (the two are combined elementwise; torch's own error would not name them)."""
    if value.shape != ref.shape:
        raise InputValueError(
            f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), "
            f"got {tuple(value.shape)}"
        )
    check_device(name, value, ref_name, ref)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (not floating, complex or bool): labels, timesteps."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds ``torch.Generator.manual_seed`` takes (negative ones wrap around)."""


def check_seed(name: str, value: object) -> int:
    """A seed for ``torch.Generator.manual_seed``: an int in :data:`SEED_RANGE`."""
    return check_int(name, value, min=SEED_RANGE[0], max=SEED_RANGE[1])


def check_batch_timesteps(t: object, x: Tensor, name: str = "t") -> Tensor:
    """``t`` as a ``(B,)`` tensor for the batch of ``x`` ``(B, ...)``; its values are not read."""
    t = check_tensor(name, t, ndim=1)
    if t.shape[0] != x.shape[0]:
        raise InputValueError(
            f"{name}: expected shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}"
        )
    return t


def check_input_dtype(name: str, value: Tensor, dtype: torch.dtype) -> None:
    """Refuse a network input of another dtype than its weights' ``dtype``, outside autocast
    (where torch casts both; imgdiff's samplers cast the sample to the network's dtype)."""
    if value.dtype != dtype and not torch.is_autocast_enabled(value.device.type):
        raise InputTypeError(
            f"{name}: expected dtype {dtype}, that of the network's weights (cast it, or the "
            f"network, or run under torch.autocast), got {value.dtype}"
        )


def set_checked(obj: object, **values: object) -> None:
    """Store checked values on a frozen dataclass from its ``__post_init__``: the checks' results
    (plain ``int``/``float`` for numpy scalars, tuples for lists) replace what was passed."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def check_bool(name: str, value: object) -> bool:
    """A Python bool (not a truthy stand-in such as ``"no"`` or ``1``)."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name}: expected a bool, got {describe(value)}")
    return value


def check_generator(generator: object, name: str = "generator") -> torch.Generator | None:
    """``None`` (torch's global generator) or one ``torch.Generator``."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    raise InputTypeError(f"{name}: expected None or a torch.Generator, got {describe(generator)}")


def check_unit_range(name: str, values: Tensor, given: object) -> None:
    """Refuse ``values`` (``given`` as a tensor) outside ``[0, 1]`` or NaN (reads the device)."""
    nan = torch.isnan(values)
    if bool(((values < 0) | (values > 1) | nan).any()):
        if not isinstance(given, Tensor) or given.ndim == 0:
            got = f"{given}"
        else:
            seen = values[~nan]
            got = f"{int(nan.sum())} NaN" if bool(nan.any()) else ""
            if seen.numel():
                got += (" and " if got else "") + (
                    f"values from {float(seen.min())} to {float(seen.max())}"
                )
        raise InputValueError(f"{name}: expected values in [0, 1], got {got}")


def check_finite(name: str, value: Tensor) -> None:
    """Refuse NaN or infinite entries, naming how many and the first (reads the device: not for
    sampling loops)."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = value[~finite]
        raise InputValueError(
            f"{name}: expected finite values, got {bad.numel()} NaN or infinite values "
            f"(first: {float(bad[0])}) in a tensor of shape {tuple(value.shape)}"
        )


def check_device(name: str, value: Tensor, ref_name: str, ref: Tensor) -> None:
    """Refuse ``value`` on another device than ``ref`` (the fused kernels read raw pointers)."""
    if value.device != ref.device:
        raise InputValueError(
            f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {value.device}"
        )


def check_pair(name: str, value: Tensor, ref_name: str, ref: Tensor) -> Tensor:
    """``value`` on ``ref``'s device (else a named error) and in ``ref``'s dtype (cast)."""
    check_device(name, value, ref_name, ref)
    return value if value.dtype == ref.dtype else value.to(ref.dtype)


def check_choice(name: str, value: object, choices: Sequence[_S]) -> _S:
    """Check that ``value`` is one of the string ``choices`` and return it."""
    for choice in choices:
        if value == choice:
            return choice
    allowed = ", ".join(repr(c) for c in choices)
    raise InputValueError(f"{name}: expected one of {allowed}, got {describe(value)}")


def check_floating_dtype(name: str, value: object, *, optional: bool = False) -> torch.dtype | None:
    """Check that ``value`` is a floating ``torch.dtype`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        what = "None or a floating torch.dtype" if optional else "a floating torch.dtype"
        raise InputTypeError(f"{name}: expected {what}, got {describe(value)}")
    return value


def check_int(name: str, value: object, *, min: int | None = None, max: int | None = None) -> int:
    """Check that ``value`` is an int (not a bool; numpy integers too) within ``[min, max]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name}: expected an int, got {describe(value)}")
    value = int(value)
    if min is not None and value < min:
        raise InputValueError(f"{name}: expected an int >= {min}, got {value}")
    if max is not None and value > max:
        raise InputValueError(f"{name}: expected an int <= {max}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number (numpy's too) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name}: expected a float, got {describe(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise InputValueError(f"{name}: expected a finite float, got {v}")
    if min is not None and (v < min or (min_open and v == min)):
        raise InputValueError(
            f"{name}: expected a float {'>' if min_open else '>='} {min}, got {v}"
        )
    if max is not None and (v > max or (max_open and v == max)):
        raise InputValueError(
            f"{name}: expected a float {'<' if max_open else '<='} {max}, got {v}"
        )
    return v


def check_timestep_tensor(
    name: str,
    t: object,
    *,
    batch: int,
    num_train_timesteps: int,
    device: torch.device,
    allow_final: bool = False,
) -> Tensor:
    """Return ``t`` as a ``(batch,)`` int64 tensor of training timesteps on ``device``.

    ``t`` may be a Python int (used for every sample), a 0-d tensor, or a ``(batch,)`` tensor of
    integers. With ``allow_final`` the value ``-1`` (the clean level after the last step) is
    accepted too. This check reads the values, so it synchronises with the device: it is for
    entry points outside sampling loops.
    """
    low = -1 if allow_final else 0
    if isinstance(t, bool):
        raise InputTypeError(f"{name}: expected an int or an integer tensor, got {describe(t)}")
    if isinstance(t, numbers.Integral):
        t = int(t)
        if not low <= t < num_train_timesteps:
            raise InputValueError(
                f"{name}: expected a timestep in [{low}, {num_train_timesteps - 1}], got {t}"
            )
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{name}: expected an int or an integer tensor, got {describe(t)}")
    if not is_integer_dtype(t.dtype):
        raise InputTypeError(
            f"{name}: expected an integer tensor of timesteps, got dtype {t.dtype}"
        )
    if t.ndim == 0:
        t = t.reshape(1).expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise InputValueError(
            f"{name}: expected shape ({batch},) to match the batch size {batch}, "
            f"got shape {tuple(t.shape)}"
        )
    t = t.to(device=device, dtype=torch.int64)
    if t.numel() and (int(t.min()) < low or int(t.max()) >= num_train_timesteps):
        raise InputValueError(
            f"{name}: expected timesteps in [{low}, {num_train_timesteps - 1}], "
            f"got values from {int(t.min())} to {int(t.max())}"
        )
    return t
