"""The records a sampling step works with: coefficients, context, output, and what callbacks see."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Self, TypeVar

import torch
from torch import Tensor

from imgdiff._ops import Scalar, per_sample

__all__ = [
    "Callback",
    "Scalar",
    "StepCoefficients",
    "StepContext",
    "StepInfo",
    "StepNoise",
    "StepOutput",
]

StateT = TypeVar("StateT")


@dataclass(frozen=True, eq=False)
class StepCoefficients:
    """Base class of a sampler's per-step coefficients; subclasses add :data:`Scalar` fields.

    The same class holds three forms: a *table* (every field a float64 tensor of shape
    ``(N,)``, one entry per step), one *step* (every field a Python float, from
    :meth:`unbind`), or *per-sample* coefficients (every field a tensor ``(B, 1, ..., 1)``,
    from :meth:`per_sample`). Update formulas are written once and work with each form.
    Fields that are not tensors in the table are passed through unchanged.
    """

    def unbind(self) -> list[Self]:
        """Split a table into one set of Python-float coefficients per step."""
        names = [f.name for f in dataclasses.fields(self)]
        values = [getattr(self, n) for n in names]
        count = next((len(v) for v in values if isinstance(v, Tensor)), 0)
        columns = [
            v.to(torch.float64).tolist() if isinstance(v, Tensor) else [v] * count for v in values
        ]
        return [
            type(self)(**dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)
        ]

    def per_sample(self, ndim: int, dtype: torch.dtype) -> Self:
        """Reshape a table of ``(B,)`` entries to ``(B, 1, ..., 1)`` tensors of ``dtype``."""
        like = torch.empty((0,) * ndim)
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            fields[f.name] = per_sample(v, like.to(v.device), dtype) if isinstance(v, Tensor) else v
        return type(self)(**fields)


class StepContext(NamedTuple):
    """Where a step is in its run, built once per run before the loop (immutable).

    Attributes:
        step_index: step index, 0 for the first step.
        num_steps: number of steps in the run.
        timestep: the training timestep the model sees at this step (a Python int).
        next_timestep: the timestep of the level after the step (``-1``: the final level).
        t: ``(B,)`` int64 tensor of ``timestep`` on the sample's device.
        t_next: ``(B,)`` int64 tensor of ``next_timestep`` on the sample's device.
    """

    step_index: int
    num_steps: int
    timestep: int
    next_timestep: int
    t: Tensor
    t_next: Tensor


class StepOutput(Generic[StateT]):
    """What one step returns: the new ``state`` and the step's clean-sample estimate ``x0_hat``.

    ``x0_hat`` (shape of the sample) may be computed lazily: a sampler whose fast path never
    forms it passes a function, evaluated at most once, when someone reads the attribute. It is
    computed from the step's input and model output, so read it inside the callback when the
    model reuses its output buffers (CUDA graphs). Both attributes are read-only.
    """

    __slots__ = ("_state", "_x0_hat")

    def __init__(self, state: StateT, x0_hat: Tensor | Callable[[], Tensor]) -> None:
        self._state = state
        self._x0_hat = x0_hat

    @property
    def state(self) -> StateT:
        """The state after the step."""
        return self._state

    @property
    def x0_hat(self) -> Tensor:
        """The prediction of the clean sample at this step, ``(B, ...)``."""
        if not isinstance(self._x0_hat, Tensor):
            self._x0_hat = self._x0_hat()
        return self._x0_hat


@dataclass(frozen=True)
class StepInfo(Generic[StateT]):
    """Passed to a loop callback after each step.

    Attributes:
        index: step index, 0 for the first (noisiest when generating).
        num_steps: number of steps in this run.
        timestep: training timestep the model saw at this step (a Python int).
        output: the step's :class:`StepOutput` (``output.state``, ``output.x0_hat``).
        next_timestep: the timestep of the level the step moved to (``-1``: the final level; in
            an inversion, the step's ``timestep``).
    """

    index: int
    num_steps: int
    timestep: int
    output: StepOutput[StateT]
    next_timestep: int

    @property
    def state(self) -> StateT:
        """The state after this step."""
        return self.output.state

    @property
    def x0_hat(self) -> Tensor:
        """The step's clean-sample estimate."""
        return self.output.x0_hat


Callback = Callable[[StepInfo[Any]], Any]
"""``callback(info)`` after every step; returning a new state replaces it, ``None`` keeps it."""

StepNoise = Tensor | Callable[[int], Tensor]
"""Injected per-step noise: a tensor ``(N, B, ...)`` indexed by step, or ``fn(step_index)``."""
