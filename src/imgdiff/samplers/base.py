"""The sampler contract: precomputed per-step coefficients, a pure ``step``, and the loop.

A sampler is a frozen dataclass of options. A call to :meth:`Sampler.sample` (or ``invert``)

1. builds a :class:`~imgdiff.timesteps.SamplingPlan` (the list of transitions),
2. computes every per-step coefficient once, in float64 on the host (:meth:`Sampler.coefficients`),
   and splits them into one set of Python floats per step,
3. runs the loop: for each step it draws noise if the step needs it, calls the pure
   :meth:`Sampler.step` with explicit state, and passes a :class:`StepInfo` to the callback.

Nothing is stored on the sampler between calls, so one object can be reused across batch sizes,
step counts and threads. Inside the loop there is no ``.item()``, no tensor-valued ``if`` and no
indexing of host tables with device tensors: nothing synchronises the host with the device.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Generic, Self, TypeVar, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from imgdiff._checks import (
    check_choice,
    check_floating_dtype,
    check_int,
    check_tensor,
    describe,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model, infer_model_dtype
from imgdiff.prediction import PREDICTION_TYPES, PredictionType
from imgdiff.randomness import Generators, check_generators, randn
from imgdiff.schedules import NoiseSchedule
from imgdiff.timesteps import (
    SPACINGS,
    FinalAlphaBar,
    SamplingPlan,
    Spacing,
    inference_timesteps,
    truncate_for_strength,
    validate_timesteps,
)

__all__ = [
    "BoundModel",
    "Callback",
    "Sampler",
    "StepCoefficients",
    "StepInfo",
    "StepNoise",
    "StepOutput",
]

StateT = TypeVar("StateT")
CoeffT = TypeVar("CoeffT", bound="StepCoefficients")


@dataclass(frozen=True)
class StepCoefficients:
    """Base class of a sampler's per-step coefficients; subclasses add ``Scalar`` fields.

    The same class holds three forms: a *table* (every field a float64 tensor of shape
    ``(N,)``, one entry per step), one *step* (every field a Python float, from
    :meth:`unbind`), or *per-sample* coefficients (every field a tensor ``(B, 1, ..., 1)``,
    from :meth:`per_sample`). Update formulas are written once and work with each form.
    """

    def unbind(self) -> list[Self]:
        """Split a table into one set of Python-float coefficients per step."""
        names = [f.name for f in dataclasses.fields(self)]
        columns = [cast(Tensor, getattr(self, n)).to(torch.float64).tolist() for n in names]
        steps = []
        for row in zip(*columns, strict=True):
            # Bypass the frozen __init__ (one object.__setattr__ per field): this runs once per
            # step of every run, and the values are already validated floats.
            step = object.__new__(type(self))
            step.__dict__.update(zip(names, row, strict=True))
            steps.append(step)
        return steps

    def per_sample(self, ndim: int, dtype: torch.dtype) -> Self:
        """Reshape a table of ``(B,)`` entries to ``(B, 1, ..., 1)`` tensors of ``dtype``."""
        shape = (-1,) + (1,) * (ndim - 1)
        return type(self)(
            **{
                f.name: cast(Tensor, getattr(self, f.name)).to(dtype).reshape(shape)
                for f in dataclasses.fields(self)
            }
        )


class StepOutput(Generic[StateT]):
    """What one step returns: the new ``state`` and the step's clean-sample estimate ``x0_hat``.

    ``x0_hat`` (shape of the sample) may be computed lazily: a sampler whose fast path never
    forms it passes a function, evaluated at most once, when someone reads the attribute.
    """

    __slots__ = ("_x0_hat", "state")

    def __init__(self, state: StateT, x0_hat: Tensor | Callable[[], Tensor]) -> None:
        self.state = state
        self._x0_hat = x0_hat

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
    """

    index: int
    num_steps: int
    timestep: int
    output: StepOutput[StateT]

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


class BoundModel:
    """The user's model bound to its keyword conditions, with the dtype boundary.

    ``bound(x, t)`` casts ``x`` to ``model_dtype``, calls ``model(x, t, **model_kwargs)`` and
    casts the output to the sampler's ``state_dtype``. Samplers call this, never the raw model.
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
        if x.dtype != self.model_dtype:
            x = x.to(self.model_dtype)
        out = self.model(x, t, **self.kwargs)
        if not isinstance(out, Tensor):
            raise InputTypeError(
                f"model: expected the model to return a torch.Tensor, got {describe(out)}; wrap "
                "networks that return objects, e.g. lambda x, t, **c: unet(x, t, **c).sample"
            )
        return out if out.dtype == self.state_dtype else out.to(self.state_dtype)


@dataclass(frozen=True)
class Sampler(ABC, Generic[StateT, CoeffT]):
    """Base class of every imgdiff sampler. Subclass it to write a new one (docs: writing-a-sampler).

    Args:
        schedule: the noise schedule the model was trained with.
        prediction: what the model outputs: ``"epsilon"``, ``"sample"`` (x0) or ``"v"``.
        spacing: how inference timesteps are picked (:data:`~imgdiff.timesteps.Spacing`).
        steps_offset: added to every inference timestep (diffusers ``steps_offset``).
        dtype: the sampler's arithmetic and state dtype. ``None``: float32, or float64 when
            the input is float64. The model runs in its own dtype (see ``model_dtype``).

    Subclasses implement :meth:`coefficients`, :meth:`init_state`, :meth:`final_sample` and
    :meth:`step`, and may override :meth:`needs_noise` and :attr:`default_num_steps`.
    """

    schedule: NoiseSchedule
    _: KW_ONLY
    prediction: PredictionType = "epsilon"
    spacing: Spacing = "leading"
    steps_offset: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, NoiseSchedule):
            raise InputTypeError(
                f"schedule: expected an imgdiff.NoiseSchedule, got {describe(self.schedule)}"
            )
        check_choice("prediction", self.prediction, PREDICTION_TYPES)
        check_choice("spacing", self.spacing, SPACINGS)
        check_int("steps_offset", self.steps_offset, min=0)
        check_floating_dtype("dtype", self.dtype, optional=True)

    # ------------------------------------------------------------------ to implement

    @abstractmethod
    def coefficients(self, plan: SamplingPlan) -> CoeffT:
        """All per-step coefficients of ``plan`` as a table: float64 tensors of shape ``(N,)``.

        Must be a pure function of the plan's float64 tensors (it is also called with
        per-sample tensors of shape ``(B,)``, possibly on a device).
        """

    @abstractmethod
    def init_state(self, x: Tensor) -> StateT:
        """The loop's initial state from the starting sample ``x`` (already in the state dtype)."""

    @abstractmethod
    def final_sample(self, state: StateT) -> Tensor:
        """The tensor a run returns from its final state."""

    @abstractmethod
    def step(
        self, model: BoundModel, state: StateT, coeffs: CoeffT, t: Tensor, noise: Tensor | None
    ) -> StepOutput[StateT]:
        """One step: a pure function of explicit state.

        Args:
            model: the bound model, ``model(x, t) -> output`` in the state dtype.
            state: the current state.
            coeffs: this step's coefficients (Python floats, or per-sample tensors).
            t: ``(B,)`` int64 training timesteps on the sample's device.
            noise: standard normal noise of the sample's shape when :meth:`needs_noise`
                said so, else ``None``.
        """

    def needs_noise(self, coeffs: CoeffT) -> bool:
        """Whether the step with these coefficients consumes noise (default: never)."""
        return False

    @property
    def default_num_steps(self) -> int:
        """Steps used when neither ``num_steps`` nor ``timesteps`` is given."""
        return min(50, len(self.schedule))

    @property
    def final_alpha_bar(self) -> FinalAlphaBar:
        """The level after the last step (``"one"``: clean data); DDIM and EDICT make it an option."""
        return "one"

    # ------------------------------------------------------------------ planning

    def timesteps(
        self,
        num_steps: int | None = None,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
    ) -> tuple[int, ...]:
        """The descending training timesteps a run visits.

        Either ``num_steps`` (picked with this sampler's ``spacing`` and ``steps_offset``) or an
        explicit ``timesteps`` list (strictly descending, in ``[0, T-1]``); ``strength < 1``
        keeps only the last ``int(N * strength)`` of them (start from a less noisy level).
        """
        T = len(self.schedule)
        if timesteps is not None:
            if num_steps is not None:
                raise InputValueError(
                    f"num_steps: expected None when timesteps are given explicitly, got {num_steps}"
                )
            ts = validate_timesteps(timesteps, T)
        else:
            n = self.default_num_steps if num_steps is None else num_steps
            n = check_int("num_steps", n, min=1, max=T)
            ts = inference_timesteps(T, n, self.spacing)
            if ts[0] + self.steps_offset > T - 1:
                raise InputValueError(
                    f"steps_offset: expected an offset that keeps every timestep <= {T - 1}, got "
                    f"{self.steps_offset} ({self.spacing} spacing with {n} steps starts at {ts[0]})"
                )
            ts = tuple(t + self.steps_offset for t in ts)
        return truncate_for_strength(ts, strength)

    def plan(
        self,
        num_steps: int | None = None,
        *,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
    ) -> SamplingPlan:
        """The :class:`SamplingPlan` that :meth:`sample` runs (arguments as :meth:`timesteps`)."""
        ts = self.timesteps(num_steps, timesteps=timesteps, strength=strength)
        return SamplingPlan.denoising(self.schedule, ts, self.final_alpha_bar)

    # ------------------------------------------------------------------ the loop

    def sample(
        self,
        model: Model,
        noise: Tensor,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        generator: Generators = None,
        step_noise: StepNoise | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
    ) -> Tensor:
        """Generate: run the plan from ``noise`` (the sample at the plan's first level) to the end.

        Args:
            model: ``model(x, t, **model_kwargs)``, see :data:`imgdiff.models.Model`.
            noise: ``(B, ...)`` floating tensor, the starting sample ``x_T`` (or, with
                ``strength < 1``, a sample noised to the first kept timestep).
            num_steps / timesteps / strength: the plan, as in :meth:`timesteps`.
            generator: for the per-step noise of stochastic samplers: one generator, or one per
                sample (then each sample is reproducible alone or in any batch).
            step_noise: inject the per-step noise instead (``(N, B, ...)`` or ``fn(i)``).
            model_kwargs: conditioning passed to every model call.
            model_dtype: dtype the model input is cast to (default: the dtype of an
                ``nn.Module``'s parameters, else the state dtype).
            callback: called with a :class:`StepInfo` after each step; may return a new state.
            progress: show a tqdm progress bar.

        Returns:
            The final sample, ``(B, ...)`` in the sampler's state dtype.
        """
        check_tensor("noise", noise, floating=True, min_ndim=2)
        plan = self.plan(num_steps, timesteps=timesteps, strength=strength)
        return self.run(
            model,
            noise,
            plan,
            self.coefficients(plan),
            generator=generator,
            step_noise=step_noise,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc=f"{type(self).__name__} sampling",
        )

    def state_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the loop computes in for a starting sample ``x``."""
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def run(
        self,
        model: Model,
        x: Tensor,
        plan: SamplingPlan,
        table: CoeffT,
        *,
        generator: Generators = None,
        step_noise: StepNoise | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        desc: str = "sampling",
    ) -> Tensor:
        """Run ``plan`` with coefficient ``table`` from ``x``: the loop behind ``sample``/``invert``."""
        check_tensor("x", x, floating=True, min_ndim=2)
        batch = x.shape[0]
        gens = check_generators(generator, batch)
        if step_noise is not None and gens is not None:
            raise InputValueError(
                "step_noise: expected None when a generator is given (one source of noise), "
                "got both"
            )
        if isinstance(step_noise, Tensor):
            expected = (len(plan), *x.shape)
            check_tensor("step_noise", step_noise, floating=True)
            if tuple(step_noise.shape) != expected:
                raise InputValueError(
                    f"step_noise: expected shape {expected} (steps, *sample shape), "
                    f"got {tuple(step_noise.shape)}"
                )
        elif step_noise is not None and not callable(step_noise):
            raise InputTypeError(
                "step_noise: expected None, a tensor (steps, *sample shape) or a function of the "
                f"step index, got {describe(step_noise)}"
            )
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise InputTypeError(
                f"model_kwargs: expected a mapping of keyword arguments, got {describe(model_kwargs)}"
            )
        check_floating_dtype("model_dtype", model_dtype, optional=True)
        if callback is not None and not callable(callback):
            raise InputTypeError(f"callback: expected a callable, got {describe(callback)}")
        dtype = self.state_dtype(x)
        device = x.device
        bound = BoundModel(
            model,
            model_dtype=model_dtype or infer_model_dtype(model) or dtype,
            state_dtype=dtype,
            kwargs=model_kwargs,
        )
        steps = table.unbind()
        num = len(steps)
        t_all = plan.timesteps.to(device).reshape(-1, 1).expand(num, batch).contiguous()
        timesteps = plan.timesteps.tolist()

        state = self.init_state(x.to(dtype))
        with torch.no_grad():
            for i in tqdm(range(num), desc=desc, disable=not progress, leave=False):
                c = steps[i]
                noise = None
                if self.needs_noise(c):
                    noise = self._step_noise(i, x, step_noise, gens, device, dtype)
                out = self.step(bound, state, c, t_all[i], noise)
                state = out.state
                if callback is not None:
                    replaced = callback(StepInfo(i, num, int(timesteps[i]), out))
                    if replaced is not None:
                        state = _checked_replacement(replaced, state)
        return self.final_sample(state)

    @staticmethod
    def _step_noise(
        i: int,
        x: Tensor,
        step_noise: StepNoise | None,
        gens: Generators,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        if step_noise is None:
            return randn(x.shape, generator=gens, device=device, dtype=dtype)
        z = step_noise[i] if isinstance(step_noise, Tensor) else step_noise(i)
        if not isinstance(z, Tensor) or z.shape != x.shape:
            raise InputValueError(
                f"step_noise: expected a tensor of shape {tuple(x.shape)} for step {i}, "
                f"got {describe(z)}"
            )
        if not z.dtype.is_floating_point:
            raise InputTypeError(
                f"step_noise: expected a floating-point tensor for step {i}, got dtype {z.dtype}"
            )
        return z.to(device=device, dtype=dtype)


def _checked_replacement(replaced: object, state: StateT) -> StateT:
    """Validate a state returned by a callback against the current state and cast it alike."""
    if isinstance(state, Tensor):
        if not isinstance(replaced, Tensor):
            raise InputTypeError(
                "callback: expected the callback to return None or a tensor of shape "
                f"{tuple(state.shape)}, got {describe(replaced)}"
            )
        if replaced.shape != state.shape:
            raise InputValueError(
                f"callback: expected a returned state of shape {tuple(state.shape)}, "
                f"got {tuple(replaced.shape)}"
            )
        return cast(StateT, replaced.to(device=state.device, dtype=state.dtype))
    if isinstance(state, tuple):
        if not isinstance(replaced, tuple) or len(replaced) != len(state):
            raise InputTypeError(
                f"callback: expected None or a tuple of {len(state)} tensors like the state, "
                f"got {describe(replaced)}"
            )
        return cast(
            StateT, tuple(_checked_replacement(r, s) for r, s in zip(replaced, state, strict=True))
        )
    if type(replaced) is not type(state):
        raise InputTypeError(
            f"callback: expected None or a state of type {type(state).__name__}, "
            f"got {describe(replaced)}"
        )
    return replaced
