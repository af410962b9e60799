"""The sampler contract: precomputed per-step coefficients, a pure ``step``, and the loop.

A sampler is a frozen dataclass of options. A call to :meth:`Sampler.sample` (or ``invert``)

1. builds a :class:`~imgdiff.timesteps.SamplingPlan` (the list of transitions),
2. computes every per-step coefficient once, in float64 on the host (:meth:`Sampler.coefficients`),
   and splits them into one set of Python floats per step,
3. prepares, once, everything a step needs on the device (a :class:`StepContext` per step with
   its timestep tensors; injected noise moved to the device),
4. runs the loop: for each step it draws noise if the step needs it, calls the pure
   :meth:`Sampler.step` with explicit state, and passes a :class:`StepInfo` to the callback.

Nothing is stored on the sampler between calls, so one object can be reused across batch sizes,
step counts and threads. Inside the loop there is no ``.item()``, no tensor-valued ``if`` and no
indexing of host tables with device tensors: nothing synchronises the host with the device
(except drawing noise with a CPU generator for a CUDA sample, which copies it each step).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from imgdiff._checks import (
    check_choice,
    check_floating_dtype,
    check_int,
    check_kwargs,
    check_tensor,
    describe,
)
from imgdiff._warnings import warn_user
from imgdiff.buffers import reuse_buffers
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.kernels import BACKENDS, Backend
from imgdiff.models import BoundModel, Model, infer_model_dtype
from imgdiff.prediction import PREDICTION_TYPES, PredictionType, linear_prediction_coefficients
from imgdiff.randomness import Generators, check_generators, draw_normal
from imgdiff.samplers.graphs import (
    CUDAGraphSampling,
    capture_loop,
    check_graph_generators,
    require_cuda,
    static_copy,
    static_kwargs,
)
from imgdiff.samplers.step import (
    Callback,
    StepCoefficients,
    StepContext,
    StepInfo,
    StepNoise,
    StepOutput,
)
from imgdiff.schedules import NoiseSchedule
from imgdiff.timesteps import (
    FINAL_ALPHA_BARS,
    SPACINGS,
    FinalAlphaBar,
    SamplingPlan,
    Spacing,
    inference_timesteps,
    truncate_for_strength,
    validate_timesteps,
)

__all__ = ["Sampler"]

StateT = TypeVar("StateT")
CoeffT = TypeVar("CoeffT", bound=StepCoefficients)
OutT = TypeVar("OutT")


@dataclass(frozen=True)
class Sampler(ABC, Generic[StateT, CoeffT]):
    """Base class of every imgdiff sampler. Subclass it to write a new one (docs: writing-a-sampler).

    Args:
        schedule: the noise schedule the model was trained with (the only positional argument).
        prediction: what the model outputs: ``"epsilon"``, ``"sample"`` (x0) or ``"v"``.
        spacing: how inference timesteps are picked (:data:`~imgdiff.timesteps.Spacing`).
        steps_offset: added to every inference timestep (diffusers ``steps_offset``).
        final_alpha_bar: the level after the last step: ``"one"`` (clean data; diffusers
            ``set_alpha_to_one=True``) or ``"first"`` (``alpha_bar_0``; Stable Diffusion).
        dtype: the sampler's arithmetic and state dtype. ``None``: float32, or float64 when
            the input is float64. The model runs in its own dtype (see ``model_dtype``).
        backend: the updates' implementation (:mod:`imgdiff.kernels`): ``"torch"``, ``"triton"``
            (fused kernels for CUDA samples of float32/bfloat16/float16), ``"cpu"`` (compiled C
            kernels for CPU samples of float32/bfloat16) or ``"auto"`` (the C kernels on a CPU
            when they build; on CUDA torch until the Triton kernels have been checked on a GPU).

    Subclasses (decorated ``@dataclass(frozen=True, kw_only=True)``) implement
    :meth:`coefficients`, :meth:`init_state`, :meth:`final_sample` and :meth:`step`, and may
    override :meth:`needs_noise` and :attr:`default_num_steps`.
    """

    schedule: NoiseSchedule
    _: KW_ONLY
    prediction: PredictionType = "epsilon"
    spacing: Spacing = "leading"
    steps_offset: int = 0
    final_alpha_bar: FinalAlphaBar = "one"
    dtype: torch.dtype | None = None
    backend: Backend = "auto"

    steps_from_pure_noise: ClassVar[bool] = True
    """Whether a step can start at ``alpha_bar = 0`` (a zero-terminal-SNR ``t = T-1``); then a
    spacing that skips that level warns (spec 1.3). EDICT's cannot, and sets it ``False``."""

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, NoiseSchedule):
            raise InputTypeError(
                f"schedule: expected an imgdiff.NoiseSchedule, got {describe(self.schedule)}"
            )
        check_choice("prediction", self.prediction, PREDICTION_TYPES)
        check_choice("spacing", self.spacing, SPACINGS)
        check_int("steps_offset", self.steps_offset, min=0)
        check_choice("final_alpha_bar", self.final_alpha_bar, FINAL_ALPHA_BARS)
        check_floating_dtype("dtype", self.dtype, optional=True)
        check_choice("backend", self.backend, BACKENDS)

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
        self,
        model: BoundModel,
        state: StateT,
        coeffs: CoeffT,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[StateT]:
        """One step: a pure function of explicit state.

        Args:
            model: the bound model, ``model(x, t) -> output`` in the state dtype.
            state: the current state.
            coeffs: this step's coefficients (Python floats, or per-sample tensors).
            ctx: the step's index and timesteps (``ctx.t``, ``ctx.t_next``: ``(B,)`` on the
                sample's device).
            noise: standard normal noise of the sample's shape when :meth:`needs_noise`
                said so, else ``None``.
        """

    def needs_noise(self, coeffs: CoeffT) -> bool:
        """Whether the step with these coefficients consumes noise (default: never).

        ``coeffs`` are one step's coefficients as Python floats (a row of the table), in the
        loop and in ``step_at`` alike, so plain comparisons work.
        """
        return False

    def inverse_coefficients(self, plan: SamplingPlan) -> CoeffT:
        """Coefficients of the exact inverse steps, for ``plan.reversed()`` rows (optional)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact inverse step")

    def inverse_step(
        self,
        model: BoundModel,
        state: StateT,
        coeffs: CoeffT,
        ctx: StepContext,
        noise: Tensor | None,
    ) -> StepOutput[StateT]:
        """The exact inverse of :meth:`step` (optional; EDICT implements it)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact inverse step")

    @property
    def default_num_steps(self) -> int:
        """Steps used when neither ``num_steps`` nor ``timesteps`` is given."""
        return min(50, len(self.schedule))

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
            ts = inference_timesteps(
                T, n, self.spacing, self.steps_offset, offset_name="steps_offset"
            )
            if (
                self.steps_from_pure_noise
                and ts[0] != T - 1
                and strength == 1.0
                and self.schedule.zero_terminal_snr
            ):
                warn_user(
                    f"spacing: a zero-terminal-SNR schedule starts sampling from pure noise at "
                    f"t = {T - 1}, but spacing {self.spacing!r} starts at t = {ts[0]}, so the "
                    "model never sees that level; use spacing='trailing' (Lin et al. 2023, "
                    "Sec. 3.3)",
                    UserWarning,
                )
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

    def prediction_fields(self, plan: SamplingPlan) -> dict[str, Tensor]:
        """The linear coefficients recovering ``x0_hat`` and ``eps_hat`` at the level before each
        step of ``plan``, and that level's noise scale ``sqrt(1 - alpha_bar)`` (the fields of
        :class:`~imgdiff.samplers.DenoiserCoefficients`), float64 ``(N,)``."""
        lp = linear_prediction_coefficients(self.prediction, plan.alpha_bar, plan.timesteps)
        return {**lp._asdict(), "sqrt_one_minus_alpha_bar": torch.sqrt(1.0 - plan.alpha_bar)}

    def state_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the loop computes in for a starting sample ``x``."""
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if x.dtype == torch.float64 else torch.float32

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
                ``nn.Module``'s parameters, else the dtype of ``noise``).
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
            generator=generator,
            step_noise=step_noise,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc=f"{type(self).__name__} sampling",
        )

    def capture_graph(
        self,
        model: Model,
        noise: Tensor,
        *,
        num_steps: int | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        strength: float = 1.0,
        generator: Generators = None,
        step_noise: Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        warmup: int = 2,
    ) -> CUDAGraphSampling[Tensor]:
        """Record :meth:`sample` with these arguments as one CUDA graph; call the result to replay it.

        ``graphed = sampler.capture_graph(model, noise, num_steps=50)`` runs the loop ``warmup``
        times eagerly on a side stream, then records one run, model included. ``graphed(noise)``
        then replays all the steps with one launch and returns ``sample(model, noise, ...)``'s
        result (``(B, ...)``, a new tensor each call). Worth it when one capture serves many
        replays and the model is small enough for kernel launches to matter.

        Arguments as in :meth:`sample`, with these rules of graph recording:

        * ``noise`` must be on a CUDA device; later calls take a sample of the same shape and
          dtype. Nothing the caller passed is written to (the graph reads copies).
        * ``generator``: ``None`` (the default CUDA generator) or CUDA generators: per-step noise
          is drawn on the GPU at every replay. ``step_noise`` must be a tensor ``(N, B, ...)``;
          new noise can then be passed to each call.
        * Tensor ``model_kwargs`` on the sample's device can be replaced at each call; other
          arguments are fixed.
        * ``callback`` is called in the ``warmup`` runs and while recording only, after each
          step of each: its tensor operations (e.g. a
          :class:`~imgdiff.conditioning.KnownRegion` paste, drawing its noise on the GPU) are
          replayed, its Python side effects are not. There is no progress bar.
        * The model must be graph-safe: no host synchronisation (``.item()``, printing values,
          data-dependent control flow), no CPU tensors copied in per call, fixed shapes.
          Otherwise :class:`~imgdiff.errors.GraphCaptureError` says so.

        Memory: the graph keeps its own pool, about one eager run's peak, until it is deleted.
        """
        check_tensor("noise", noise, floating=True, min_ndim=2)
        plan = self.plan(num_steps, timesteps=timesteps, strength=strength)
        return self._capture(
            model,
            {"noise": noise},
            lambda start: self.init_state(start[0].to(self.state_dtype(start[0]))),
            self.final_sample,
            plan,
            inverse=False,
            generator=generator,
            step_noise=step_noise,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            warmup=warmup,
        )

    def _capture(
        self,
        model: Model,
        starts: Mapping[str, Tensor],
        make_state: Callable[[tuple[Tensor, ...]], StateT],
        finish: Callable[[StateT], OutT],
        plan: SamplingPlan,
        *,
        inverse: bool,
        generator: Generators,
        step_noise: Tensor | None,
        model_kwargs: Mapping[str, Any] | None,
        model_dtype: torch.dtype | None,
        callback: Callback | None,
        warmup: int,
    ) -> CUDAGraphSampling[OutT]:
        """Record ``finish(loop(make_state(starts)))`` over ``plan`` as a CUDA graph."""
        first = next(iter(starts.values()))
        device = first.device
        require_cuda(next(iter(starts)), device)
        if step_noise is not None and not isinstance(step_noise, Tensor):
            raise InputTypeError(
                "step_noise: expected None or a tensor (steps, *sample shape) for a captured loop "
                f"(a function would be called only while recording), got {describe(step_noise)}"
            )
        static = tuple(static_copy(name, t, device) for name, t in starts.items())
        gens = check_generators(generator, first.shape[0])
        dtype = self.state_dtype(first)
        noise_table = self._prepare_step_noise(step_noise, gens, plan, first, dtype)
        noise_buf = None if noise_table is None else noise_table.clone()
        kwargs, replaceable = static_kwargs(check_kwargs("model_kwargs", model_kwargs), device)
        loop = self._prepare_loop(
            model,
            plan,
            like=static[0],
            generator=gens,
            step_noise=noise_buf,
            model_kwargs=kwargs,
            model_dtype=model_dtype,
            callback=callback,
            inverse=inverse,
        )

        def run() -> OutT:
            return finish(loop.run(make_state(static), progress=False, desc=""))

        generators = check_graph_generators(gens, device)
        # a callback that draws noise (KnownRegion's noised paste) must draw it on this GPU too
        generators += check_graph_generators(
            getattr(callback, "generator", None), device, name="callback.generator"
        )
        graph, result = capture_loop(run, device=device, generators=generators, warmup=warmup)
        return CUDAGraphSampling(
            graph,
            start=static,
            step_noise=noise_buf,
            model_kwargs=replaceable,
            result=result,
            num_steps=len(plan),
            keep_alive=run,  # the recorded loop and everything it reads
        )

    def run(
        self,
        model: Model,
        x: Tensor,
        plan: SamplingPlan,
        *,
        generator: Generators = None,
        step_noise: StepNoise | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        desc: str = "sampling",
    ) -> Tensor:
        """Run ``plan`` from the sample ``x`` ``(B, ...)``: the loop behind ``sample`` and ``invert``.

        Arguments as in :meth:`sample`; ``desc`` labels the progress bar. Returns the final
        sample ``(B, ...)`` in the state dtype.
        """
        check_tensor("x", x, floating=True, min_ndim=2)
        state = self.init_state(x.to(self.state_dtype(x)))
        final = self.run_state(
            model,
            state,
            plan,
            like=x,
            generator=generator,
            step_noise=step_noise,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            progress=progress,
            desc=desc,
        )
        return self.final_sample(final)

    def run_state(
        self,
        model: Model,
        state: StateT,
        plan: SamplingPlan,
        *,
        like: Tensor,
        generator: Generators = None,
        step_noise: StepNoise | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        model_dtype: torch.dtype | None = None,
        callback: Callback | None = None,
        progress: bool = True,
        desc: str = "sampling",
        inverse: bool = False,
    ) -> StateT:
        """The loop from an explicit initial ``state``; returns the final state.

        ``like`` is the tensor the user passed (``(B, ...)``): noise is drawn with its shape and
        device, and it is the model's dtype unless ``model_dtype`` or the model's parameters say
        otherwise. ``inverse`` runs :meth:`inverse_coefficients` and :meth:`inverse_step`
        instead (samplers with an exact inverse, over ``plan.reversed()``). For samplers whose
        state is not one tensor (EDICT's pair).
        """
        loop = self._prepare_loop(
            model,
            plan,
            like=like,
            generator=generator,
            step_noise=step_noise,
            model_kwargs=model_kwargs,
            model_dtype=model_dtype,
            callback=callback,
            inverse=inverse,
        )
        with torch.no_grad():
            return loop.run(state, progress=progress, desc=desc)

    def _prepare_loop(
        self,
        model: Model,
        plan: SamplingPlan,
        *,
        like: Tensor,
        generator: Generators,
        step_noise: StepNoise | None,
        model_kwargs: Mapping[str, Any] | None,
        model_dtype: torch.dtype | None,
        callback: Callback | None,
        inverse: bool,
    ) -> _Loop[StateT, CoeffT]:
        """Validate the loop's arguments and precompute everything its steps need (host work)."""
        check_tensor("like", like, floating=True, min_ndim=2)
        batch, device = like.shape[0], like.device
        dtype = self.state_dtype(like)
        gens = check_generators(generator, batch)
        noise_table = self._prepare_step_noise(step_noise, gens, plan, like, dtype)
        check_kwargs("model_kwargs", model_kwargs)
        check_floating_dtype("model_dtype", model_dtype, optional=True)
        if callback is not None and not callable(callback):
            raise InputTypeError(f"callback: expected a callable, got {describe(callback)}")
        bound = BoundModel(
            model,
            model_dtype=model_dtype or infer_model_dtype(model) or like.dtype,
            state_dtype=dtype,
            kwargs=model_kwargs,
        )
        table = self.inverse_coefficients(plan) if inverse else self.coefficients(plan)
        steps = table.unbind()
        return _Loop(
            step=self.inverse_step if inverse else self.step,
            needs_noise=[self.needs_noise(c) for c in steps],
            steps=steps,
            contexts=_contexts(plan, batch, device),
            model=bound,
            callback=callback,
            inverse=inverse,
            draw=functools.partial(
                self._step_noise,
                like=like,
                step_noise=step_noise,
                noise_table=noise_table,
                gens=gens,
                dtype=dtype,
            ),
        )

    @staticmethod
    def _prepare_step_noise(
        step_noise: StepNoise | None,
        gens: Generators,
        plan: SamplingPlan,
        x: Tensor,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """Validate ``step_noise``; a tensor is moved to the sample's device once, here."""
        if step_noise is not None and gens is not None:
            raise InputValueError(
                "step_noise: expected None when a generator is given (one source of noise), "
                "got both"
            )
        if isinstance(step_noise, Tensor):
            check_tensor("step_noise", step_noise, floating=True)
            expected = (len(plan), *x.shape)
            if tuple(step_noise.shape) != expected:
                raise InputValueError(
                    f"step_noise: expected shape {expected} (steps, *sample shape), "
                    f"got {tuple(step_noise.shape)}"
                )
            return step_noise.to(device=x.device, dtype=dtype)
        if step_noise is not None and not callable(step_noise):
            raise InputTypeError(
                "step_noise: expected None, a tensor (steps, *sample shape) or a function of the "
                f"step index, got {describe(step_noise)}"
            )
        return None

    @staticmethod
    def _step_noise(
        i: int,
        *,
        like: Tensor,
        step_noise: StepNoise | None,
        noise_table: Tensor | None,
        gens: Generators,
        dtype: torch.dtype,
    ) -> Tensor:
        x = like
        if noise_table is not None:
            return noise_table[i]
        if step_noise is None:
            return draw_normal(x.shape, gens, x.device, dtype)
        z = step_noise(i) if callable(step_noise) else None
        if not isinstance(z, Tensor) or z.shape != x.shape:
            raise InputValueError(
                f"step_noise: expected a tensor of shape {tuple(x.shape)} for step {i}, "
                f"got {describe(z)}"
            )
        if not z.dtype.is_floating_point:
            raise InputTypeError(
                f"step_noise: expected a floating-point tensor for step {i}, got dtype {z.dtype}"
            )
        return z.to(device=x.device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class _Loop(Generic[StateT, CoeffT]):
    """A prepared loop: the steps' coefficients, contexts, bound model and noise source.

    Built on the host before any step runs; :meth:`run` then only launches device work (this is
    what a CUDA graph records, see :meth:`Sampler.capture_graph`).
    """

    step: Callable[[BoundModel, StateT, CoeffT, StepContext, Tensor | None], StepOutput[StateT]]
    needs_noise: list[bool]
    steps: list[CoeffT]
    contexts: list[StepContext]
    model: BoundModel
    callback: Callback | None
    draw: Callable[[int], Tensor]
    inverse: bool = False

    def run(self, state: StateT, *, progress: bool, desc: str) -> StateT:
        """Every step from ``state`` (under ``torch.no_grad()`` at the caller); the final state."""
        step, steps, callback = self.step, self.steps, self.callback
        # CPU outputs cycle through a few buffers (imgdiff.buffers); dropping each step's output
        # record (its inputs, for a lazy x0_hat) before the next step lets them be reused sooner
        with reuse_buffers():
            for ctx in tqdm(self.contexts, desc=desc, disable=not progress, leave=False):
                i = ctx.step_index
                out = step(
                    self.model, state, steps[i], ctx, self.draw(i) if self.needs_noise[i] else None
                )
                state = out.state
                if callback is not None:
                    # an inverse step (over plan.reversed()) moves its row's t_next to its t
                    reached = ctx.timestep if self.inverse else ctx.next_timestep
                    replaced = callback(StepInfo(i, ctx.num_steps, ctx.timestep, out, reached))
                    if replaced is not None:
                        state = _checked_replacement(replaced, state)
                del out
        return state


def _contexts(plan: SamplingPlan, batch: int, device: torch.device) -> list[StepContext]:
    """One :class:`StepContext` per step; the timestep tensors go to the device in one copy."""
    num = len(plan)
    both = torch.stack([plan.timesteps, plan.next_timesteps])  # (2, N) int64 on the host
    if device.type == "cuda":
        both = both.pin_memory()
    table = both.to(device, non_blocking=True).reshape(2, num, 1).expand(2, num, batch).contiguous()
    rows_t, rows_next = table[0].unbind(0), table[1].unbind(0)
    ts, nxt = plan.timesteps.tolist(), plan.next_timesteps.tolist()
    return [StepContext(i, num, ts[i], nxt[i], rows_t[i], rows_next[i]) for i in range(num)]


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
            StateT,
            tuple(_checked_replacement(r, s) for r, s in zip(replaced, state, strict=True)),
        )
    if type(replaced) is not type(state):
        raise InputTypeError(
            f"callback: expected None or a state of type {type(state).__name__}, "
            f"got {describe(replaced)}"
        )
    return replaced
