"""CUDA-graph sampling: record a whole N-step loop, model included, once; replay it with one launch.

A sampling loop on a GPU launches hundreds of small kernels per step (the model's and the
update's); with a small network the CPU cannot issue them as fast as the GPU runs them. A CUDA
graph records the launches of a loop once and replays them as one unit, so the launch cost is
paid once per run instead of once per kernel (CUDA programming guide, "CUDA Graphs"; the
pattern and its rules are those of ``torch.cuda.graph``: warm up on a side stream, record on a
private memory pool, feed new inputs by copying them into the recorded input tensors).

imgdiff's loops can be recorded because nothing in them synchronises the host with the device
(DESIGN: "a whole loop must be capturable in a CUDA graph"): the coefficients are Python floats
computed before the loop, the timestep tensors are on the device before the first step, and the
per-step noise is drawn on the GPU. :meth:`Sampler.capture_graph
<imgdiff.samplers.Sampler.capture_graph>` builds a :class:`CUDAGraphSampling`; calling it
replays the loop on new inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

import torch
from torch import Tensor

from imgdiff._checks import check_int, describe
from imgdiff.errors import GraphCaptureError, InputTypeError, InputValueError

__all__ = [
    "CUDAGraphSampling",
    "Replayable",
    "capture_loop",
    "check_graph_generators",
    "require_cuda",
    "static_copy",
    "static_kwargs",
]

OutT = TypeVar("OutT")


class Replayable(Protocol):
    """What :class:`CUDAGraphSampling` replays: a ``torch.cuda.CUDAGraph``."""

    def replay(self) -> None: ...


class CUDAGraphSampling(Generic[OutT]):
    """A sampling run recorded as one CUDA graph; call it to run it again on new inputs.

    Made by :meth:`Sampler.capture_graph <imgdiff.samplers.Sampler.capture_graph>` (and
    :meth:`EDICT.capture_graph_pair <imgdiff.samplers.EDICT.capture_graph_pair>`). A call copies
    ``start`` (and, optionally, new per-step noise and new tensor conditions) into the tensors the
    graph reads, replays every step with one launch, and returns a copy of the result: the same
    values an eager ``sample`` call with these inputs returns (for stochastic samplers: when the
    generator is in the same state; each replay draws fresh noise, as an eager call does).

    Everything else is fixed at capture: the sampler, the plan, the model and its non-tensor
    arguments, the batch shape, device and dtypes. Tensors the model or a callback holds
    themselves (weights, a :class:`~imgdiff.conditioning.KnownRegion`'s image) are read at
    replay time, so changing them in place changes the next replay.

    Attributes:
        num_steps: steps per replay.
        start_shapes: the shapes a call's ``start`` must have (one per tensor of the start).
    """

    __slots__ = ("_graph", "_keep", "_kwargs", "_result", "_start", "_step_noise", "num_steps")

    def __init__(
        self,
        graph: Replayable,
        *,
        start: tuple[Tensor, ...],
        step_noise: Tensor | None,
        model_kwargs: Mapping[str, Tensor],
        result: OutT,
        num_steps: int,
        keep_alive: object = None,
    ) -> None:
        self._graph = graph
        # everything else the recorded kernels read (the prepared loop: timestep tensors, model,
        # callback): freed memory would be reused by later allocations and read by replays
        self._keep = keep_alive
        self._start = start
        self._step_noise = step_noise
        self._kwargs = dict(model_kwargs)
        self._result = result
        self.num_steps = num_steps

    @property
    def start_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of each tensor a call's ``start`` consists of."""
        return tuple(tuple(t.shape) for t in self._start)

    def __call__(
        self,
        start: Tensor | Sequence[Tensor],
        *,
        step_noise: Tensor | None = None,
        model_kwargs: Mapping[str, Tensor] | None = None,
    ) -> OutT:
        """Replay the recorded loop from ``start``; returns a new tensor (or pair) each call.

        Args:
            start: the starting sample ``(B, ...)`` (a pair for EDICT's pair captures), of the
                shape and dtype given at capture.
            step_noise: new injected per-step noise ``(N, B, ...)``; only when the capture was
                given a ``step_noise`` tensor (otherwise the loop draws its noise on the GPU).
            model_kwargs: new values for tensor conditions given at capture (same names, shapes
                and dtypes); conditions left out keep their last values.

        The inputs are read before the call returns (page-locked host tensors included), so
        the caller may overwrite them at once; the result is computed asynchronously, like
        any CUDA work.
        """
        with torch.no_grad():  # the copies into the graph's inputs must not record autograd
            return self._replay(start, step_noise, model_kwargs)

    def _replay(
        self,
        start: Tensor | Sequence[Tensor],
        step_noise: Tensor | None,
        model_kwargs: Mapping[str, Tensor] | None,
    ) -> OutT:
        if isinstance(start, Tensor):
            starts: tuple[object, ...] = (start,)
        elif isinstance(start, (tuple, list)):
            starts = tuple(start)
        else:
            raise InputTypeError(
                f"start: expected a torch.Tensor (or a tuple of them), got {describe(start)}"
            )
        if len(starts) != len(self._start):
            raise InputValueError(
                f"start: expected {len(self._start)} tensor(s) as at capture, got {len(starts)}"
            )
        name = "start" if len(starts) == 1 else "start[{}]"
        for k, (new, buf) in enumerate(zip(starts, self._start, strict=True)):
            _copy_into(name.format(k), new, buf)
        if step_noise is not None:
            if self._step_noise is None:
                raise InputValueError(
                    "step_noise: this loop was captured without injected noise (it draws its "
                    "noise on the GPU); capture it with a step_noise tensor to inject noise"
                )
            # as at capture, where the noise is converted to the sampler's state dtype
            _copy_into("step_noise", step_noise, self._step_noise, cast=True)
        for key, value in (model_kwargs or {}).items():
            target = self._kwargs.get(key)
            if target is None:
                raise InputValueError(
                    f"model_kwargs: expected tensor conditions given at capture "
                    f"({sorted(self._kwargs) or 'none'}), got {key!r}"
                )
            _copy_into(f"model_kwargs[{key!r}]", value, target)
        self._graph.replay()
        return _clone(self._result)


def _copy_into(name: str, value: object, buf: Tensor, *, cast: bool = False) -> None:
    """Copy ``value`` into the graph's input tensor ``buf`` (same shape and dtype, any device;
    with ``cast`` any floating dtype, converted to ``buf``'s)."""
    if not isinstance(value, Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor, got {describe(value)}")
    dtype_ok = value.dtype.is_floating_point if cast else value.dtype == buf.dtype
    if value.shape != buf.shape or not dtype_ok:
        dtype = "a floating dtype" if cast else f"dtype {buf.dtype}"
        raise InputValueError(
            f"{name}: expected shape {tuple(buf.shape)} and {dtype} as at capture, "
            f"got shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    if value.device.type == "cpu" and buf.device.type != "cpu" and value.is_pinned():
        # an asynchronous copy from page-locked memory reads it when the stream gets there, after
        # this call has returned: a write to the caller's tensor in between would leak into the
        # replay. Copied from pageable memory, the data is staged before the copy call returns
        # (CUDA runtime API, "API synchronization behavior"), without waiting for the stream.
        value = value.clone()
    buf.copy_(value, non_blocking=True)


def _clone(result: OutT) -> OutT:
    if isinstance(result, Tensor):
        return cast(OutT, result.clone())
    if isinstance(result, tuple):
        return cast(OutT, tuple(_clone(r) for r in result))
    raise TypeError(f"unexpected captured result {describe(result)}")  # internal: never reached


def static_copy(name: str, value: Tensor, device: torch.device) -> Tensor:
    """A copy of a graph input on ``device`` (the user's tensor is never written to)."""
    if value.device != device:
        raise InputValueError(
            f"{name}: expected a tensor on {device} like the sample, got one on {value.device}"
        )
    return value.clone()


def static_kwargs(
    model_kwargs: Mapping[str, Any] | None, device: torch.device
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The kwargs a recorded model call reads: tensors on ``device`` copied (replaceable at replay).

    ``model_kwargs`` is already validated (:func:`imgdiff._checks.check_kwargs`). Returns ``(all kwargs, the copied tensors by name)``; other values are passed as they are.
    """
    tensors = {
        k: v.clone()
        for k, v in (model_kwargs or {}).items()
        if isinstance(v, Tensor) and v.device == device
    }
    return {**(model_kwargs or {}), **tensors}, tensors


def check_graph_generators(
    generator: object, device: torch.device, *, name: str = "generator"
) -> list[torch.Generator]:
    """The distinct generators a recorded loop draws from; each must be on the sample's GPU."""
    gens: list[torch.Generator] = []
    if isinstance(generator, torch.Generator):
        gens = [generator]
    elif isinstance(generator, Sequence):
        gens = [g for g in generator if isinstance(g, torch.Generator)]
    for g in gens:
        if _normalized(g.device) != _normalized(device):
            raise InputValueError(
                f"{name}: a CUDA graph records noise drawn on the sample's GPU; expected "
                f"generator(s) on {_normalized(device)} (torch.Generator(device=...)) or None, "
                f"got one on {g.device}"
            )
    unique: dict[int, torch.Generator] = {id(g): g for g in gens}
    return list(unique.values())


def _normalized(device: torch.device) -> torch.device:
    """``cuda`` with its index made explicit (the current device's), other devices as they are."""
    if str(device) == "cuda":  # no index (torch types .index as int, it can be None)
        return torch.device("cuda", torch.cuda.current_device())
    return device


def require_cuda(name: str, device: torch.device) -> None:
    """Raise unless ``device`` is a CUDA device (graph recording needs one)."""
    if device.type != "cuda":
        raise InputValueError(
            f"{name}: CUDA-graph capture needs a sample on a CUDA device, got one on {device}"
        )


def capture_loop(
    run: Callable[[], OutT],
    *,
    device: torch.device,
    generators: Sequence[torch.Generator],
    warmup: int,
) -> tuple[torch.cuda.CUDAGraph, OutT]:
    """Warm ``run`` up ``warmup`` times on a side stream, then record one call of it as a graph.

    The warm-up runs lazy initialisation (cuBLAS/cuDNN workspaces, Triton compilation, autotuning)
    outside the recording, as ``torch.cuda.graph`` requires. Returns the graph and the tensors
    the recorded call returned (overwritten by every replay).
    """
    check_int("warmup", warmup, min=1)
    with torch.cuda.device(device), torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            # newer torch registers generators on first use and deprecates the call (a no-op
            # there); older torch needs it before capture for any non-default generator
            warnings.filterwarnings("ignore", message=".*register_generator_state.*")
            for g in generators:
                graph.register_generator_state(g)
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch's stub
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        caller_stream = torch.cuda.current_stream()
        caller_stream.wait_stream(side)
        # a capture stream of this device: torch.cuda.graph's default one is made once, on the
        # device current at its first use, and cannot capture on another
        capture = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch's stub
        try:
            with torch.cuda.graph(graph, stream=capture):
                result = run()
        except RuntimeError as error:
            # some torch versions leave the capture stream current when capture_end raises
            torch.cuda.set_stream(caller_stream)
            raise GraphCaptureError(
                "capture_graph: the loop could not be recorded as a CUDA graph: something in it "
                "(usually the model, or a callback) synchronises with the host, copies from CPU "
                "memory, draws noise on the CPU or changes shape between calls. Run it eagerly "
                "with sample() (some torch versions leave CUDA's random number state unusable "
                "after a failed recording: if sample() then fails, run it in a new process), or "
                f"make that part graph-safe. CUDA said: {error}"
            ) from error
    return graph, result
