"""Buffer reuse in sampling loops (imgdiff.buffers): a buffer is handed out again only when
nothing outside the pool refers to it, and loops give the same results with and without it."""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import imgdiff
from imgdiff import buffers, kernels
from imgdiff.buffers import BufferPool, active_pool, reuse_buffers
from imgdiff.randomness import draw_normal

SHAPE = (4, 4, 128, 128)  # 1 MiB in float32: MIN_BYTES
pytestmark = pytest.mark.skipif(not buffers._SUPPORTED, reason="no exact reference counts here")


def test_shape_is_above_the_threshold() -> None:
    assert torch.empty(SHAPE).nbytes >= buffers.MIN_BYTES


def test_a_released_buffer_is_handed_out_again() -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    a = pool.empty_like(x)
    ptr = a.data_ptr()
    del a
    b = pool.empty_like(x)
    assert b.data_ptr() == ptr
    assert len(pool) == 1
    c = pool.empty_like(x)  # b is held: a second buffer
    assert c.data_ptr() != ptr
    assert len(pool) == 2


HOLDERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "reference": lambda t: t,
    "container": lambda t: [{"state": t}],
    "view": lambda t: t[0],
    "reshape": lambda t: t.reshape(-1),
    "detach": lambda t: t.detach(),
    "numpy": lambda t: t.numpy(),
    "storage": lambda t: t.untyped_storage(),
    "tensor on the storage": lambda t: torch.empty(0).set_(t.untyped_storage()),
    "dlpack": lambda t: torch.utils.dlpack.to_dlpack(t),
    "saved for backward": lambda t: t * torch.ones(1, requires_grad=True),
    "closure": lambda t: lambda: t,
    "step output": lambda t: imgdiff.samplers.StepOutput(t, lambda: t),
}


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_a_held_buffer_is_never_handed_out(holder: str) -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    a = pool.empty_like(x)
    a.copy_(x)
    ptr = a.data_ptr()
    held = HOLDERS[holder](a)
    del a
    b = pool.empty_like(x)
    assert b.data_ptr() != ptr
    b.fill_(7.0)
    # the held memory is untouched
    seen = torch.from_numpy(held) if holder == "numpy" else None
    pool.clear()
    assert seen is None or torch.equal(seen, x)
    del held
    # once the holder is gone the first buffer is free again (the pool was cleared: new pool)
    again = BufferPool()
    t = again.empty_like(x)
    del t
    assert len(again) == 1


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_exclusive_sees_every_other_holder_of_the_memory(holder: str) -> None:
    """A tensor lent out as ``detach()`` may be overwritten afterwards only if the borrower kept
    nothing: every holder of the lent tensor is seen, in and out of a pool."""
    for pool in (None, BufferPool()):
        with reuse_buffers() if pool is None else _entered(pool):
            x = torch.randn(SHAPE) if pool is None else pool.empty_like(torch.empty(SHAPE))
            assert buffers.exclusive(x)
            held = HOLDERS[holder](x.detach())
            assert not buffers.exclusive(x)
            del held
            assert buffers.exclusive(x)


@contextmanager
def _entered(pool: BufferPool) -> Iterator[None]:
    """``pool`` as the thread's active pool (what :func:`reuse_buffers` does with a new one)."""
    buffers._ACTIVE.pools.append(pool)
    try:
        yield
    finally:
        buffers._ACTIVE.pools.remove(pool)


def test_exclusive_refuses_a_storage_held_by_no_active_pool() -> None:
    pool = BufferPool()
    x = pool.empty_like(torch.empty(SHAPE))
    assert not buffers.exclusive(x)  # the pool's reference, and the pool is not active
    with _entered(pool):
        assert buffers.exclusive(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_is_never_exclusive() -> None:  # pragma: no cover - GPU only
    """torch reports every CUDA storage as shared (CUDA IPC may have handed it to another
    process), so on the GPU EDICT's steps never write into a tensor they lent out."""
    assert buffers.exclusive(torch.randn(SHAPE))
    assert not buffers.exclusive(torch.randn(SHAPE, device="cuda"))


def test_exclusive_refuses_shared_memory_and_holds_under_a_tracer() -> None:
    """Memory another process may read is never exclusive; a tracer that holds the frames'
    locals (a debugger) changes no answer."""
    t = torch.randn(SHAPE)
    t.detach().share_memory_()  # as a torch.multiprocessing queue does to what it sends
    assert not buffers.exclusive(t)
    x, y = torch.randn(8), torch.randn(8)
    kept = y.untyped_storage()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_locals  # noqa: B018 (takes references to the frame's locals)
        return tracer

    sys.settrace(tracer)
    try:
        answers = (buffers.exclusive(x), buffers.exclusive(y))
    finally:
        sys.settrace(None)
    assert answers == (True, False)
    del kept
    assert buffers.exclusive(y)


def test_each_output_is_a_new_tensor_object() -> None:
    """Reused memory comes as a new tensor: no autograd flag, gradient, attribute or weak
    reference of the previous one carries over."""
    pool = BufferPool()
    x = torch.randn(SHAPE)
    a = pool.empty_like(x)
    ptr = a.data_ptr()
    a.requires_grad_(True)
    a.grad = torch.ones_like(x)
    a.tag = "mine"  # type: ignore[attr-defined]
    ref = weakref.ref(a)
    del a
    assert ref() is None
    b = pool.empty_like(x)
    assert b.data_ptr() == ptr  # the memory is reused...
    assert not b.requires_grad  # ...the tensor is not
    assert b.grad is None
    assert not hasattr(b, "tag")


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.share_memory_(),  # another process may read it
        lambda t: t.untyped_storage().resize_(0),  # too small now
    ],
)
def test_memory_shared_or_shrunk_leaves_the_pool(change: Callable[[torch.Tensor], Any]) -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    kept = pool.empty_like(x)  # a first entry, held
    a = pool.empty_like(x)
    change(a)
    del a
    b = pool.empty_like(x)
    assert b.shape == x.shape
    assert not b.is_shared()
    assert b.untyped_storage().nbytes() >= x.nbytes
    assert len(pool) == 2  # kept and b
    b.fill_(1.0)
    assert kept.data_ptr() != b.data_ptr()


def test_a_tensor_reshaped_in_place_does_not_change_the_next_output() -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    for reshape in (
        lambda t: t.unsqueeze_(0),
        lambda t: t.transpose_(2, 3),
        lambda t: t.resize_(2),
    ):
        a = pool.empty_like(x)
        reshape(a)
        del a
        b = pool.empty_like(x)
        assert b.shape == x.shape
        assert b.is_contiguous()
        del b
    assert len(pool) == 1


def test_pooled_tensors_follow_the_current_inference_mode_and_stay_on_the_cpu() -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    with torch.inference_mode():
        a = pool.empty_like(x)
        assert a.is_inference()
        del a
    b = pool.empty_like(x)
    assert not b.is_inference()
    b.add_(1.0)  # an inference tensor would refuse this outside inference mode
    del b
    with torch.device("meta"):
        c = pool.empty_like(x)
        d = pool.empty((3, 1024, 1024), torch.float32)
    assert c.is_cpu
    assert d.is_cpu


def test_layouts_and_dtypes_get_their_own_buffers() -> None:
    pool = BufferPool()
    x = torch.randn(SHAPE)
    cl = x.contiguous(memory_format=torch.channels_last)
    a = pool.empty_like(cl)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert a.shape == x.shape
    b = pool.empty_like(x)
    assert b.is_contiguous()
    assert b.data_ptr() != a.data_ptr()
    c = pool.empty_like(x.to(torch.bfloat16))
    assert c.dtype == torch.bfloat16
    expanded = torch.randn(1, *SHAPE[1:]).expand(SHAPE)  # not dense: a contiguous buffer
    d = pool.empty_like(expanded)
    assert d.is_contiguous()
    assert d.shape == x.shape
    e = pool.empty((3, 5), torch.float64)
    assert e.shape == (3, 5)
    assert e.dtype == torch.float64
    assert e.is_contiguous()
    assert len(pool) == 5


def test_capacity_bounds_the_pool() -> None:
    pool = BufferPool(capacity=3)
    x = torch.randn(SHAPE)
    held = [pool.empty_like(x) for _ in range(5)]
    assert len(pool) == 3  # the last three; the first two live on with their holder
    assert len({t.data_ptr() for t in held}) == 5
    with pytest.raises(imgdiff.InputValueError, match="capacity"):
        BufferPool(capacity=0)


def test_scopes_nest_per_thread_and_apply_above_the_threshold() -> None:
    x = torch.randn(SHAPE)
    assert active_pool() is None
    assert buffers.out_like(x, x) is None  # no scope: torch allocates
    assert buffers.out_empty(SHAPE, torch.float32, x.device) is None
    with reuse_buffers() as outer:
        assert active_pool() is outer
        with reuse_buffers() as inner:
            assert active_pool() is inner
            buffers.empty_like(x)
            assert len(inner) == 1
            assert len(outer) == 0
            seen: list[BufferPool | None] = []
            thread = threading.Thread(target=lambda: seen.append(active_pool()))
            thread.start()
            thread.join()
            assert seen == [None]
        assert active_pool() is outer
        buffers.empty_like(torch.randn(1, 4, 8, 8))  # small: malloc's free lists
        assert len(outer) == 0
        assert buffers.out_like(x, x[:, :2]) is None  # shapes differ: torch allocates
        assert buffers.out_like(x, x.double()) is None
        w = x.clone().requires_grad_(True)
        assert buffers.out_like(w, x) is None  # autograd must see it
        with torch.no_grad():
            assert buffers.out_like(w, x) is not None
    assert active_pool() is None
    assert len(outer) == 0  # dropped at the end of the block


def test_a_miscalibrated_reference_count_turns_pooling_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count measured at import (e.g. under a tracer holding frames' locals) must match the
    one a pool measures when it is made; otherwise the pool allocates every time."""
    assert BufferPool()._refs == buffers._STORAGE_REFS
    monkeypatch.setattr(buffers, "_STORAGE_REFS", buffers._STORAGE_REFS + 1)
    _assert_pools_nothing(BufferPool())


def test_unsupported_interpreters_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "_SUPPORTED", False)
    _assert_pools_nothing(BufferPool())


def _assert_pools_nothing(pool: BufferPool) -> None:
    """A buffer taken and dropped is not kept for the next take: the pool allocates each time."""
    x = torch.randn(SHAPE)
    a = pool.empty_like(x)
    del a
    pool.empty_like(x)
    assert len(pool) == 0


@pytest.mark.parametrize("gen", ["none", "one", "per-sample"])
def test_noise_drawn_into_buffers_equals_fresh_draws(gen: str) -> None:
    def gens() -> Any:
        if gen == "none":
            torch.manual_seed(3)
            return None
        if gen == "one":
            return torch.Generator().manual_seed(3)
        return [torch.Generator().manual_seed(3 + b) for b in range(SHAPE[0])]

    fresh = draw_normal(SHAPE, gens(), torch.device("cpu"), torch.float32)
    with reuse_buffers() as pool:
        g = gens()
        draw_normal((2, 3), g, torch.device("cpu"), torch.float32)  # small: not pooled
        assert len(pool) == 0
        g = gens()
        first = draw_normal(SHAPE, g, torch.device("cpu"), torch.float32)
        pooled = first.clone()
        del first
        second = draw_normal(SHAPE, g, torch.device("cpu"), torch.float32)
        assert len(pool) == 1  # the first draw's buffer was reused
    assert torch.equal(pooled, fresh)
    assert not torch.equal(second, fresh)


# ---------------------------------------------------------------------------- the loops

SCHEDULE = imgdiff.NoiseSchedule.scaled_linear(1000)


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.5 * x + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000.0)


def _samplers(backend: str) -> dict[str, imgdiff.samplers.Sampler[Any, Any]]:
    return {
        "DDIM": imgdiff.DDIM(SCHEDULE, backend=backend),  # type: ignore[arg-type]
        "DDIM eta": imgdiff.DDIM(SCHEDULE, eta=0.5, backend=backend),  # type: ignore[arg-type]
        "DDPM": imgdiff.DDPM(SCHEDULE, backend=backend),  # type: ignore[arg-type]
        "EDICT": imgdiff.EDICT(SCHEDULE, dtype=torch.float32, backend=backend),  # type: ignore[arg-type]
    }


def _run(
    sampler: imgdiff.samplers.Sampler[Any, Any], noise: torch.Tensor, callback: Any = None
) -> torch.Tensor:
    g = torch.Generator().manual_seed(0) if not isinstance(sampler, imgdiff.EDICT) else None
    return sampler.sample(
        _model, noise, num_steps=12, generator=g, callback=callback, progress=False
    )


BACKENDS = ["torch", *(["cpu"] if kernels.cpu.available() else [])]


@pytest.mark.filterwarnings("ignore::imgdiff.PrecisionWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["DDIM", "DDIM eta", "DDPM", "EDICT"])
def test_loops_equal_with_and_without_reuse(
    name: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bitwise the same samples, and the same trajectory seen by a callback that keeps every
    state (the pool must not hand out a state the callback holds)."""
    sampler = _samplers(backend)[name]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    kept: dict[bool, list[Any]] = {True: [], False: []}
    sizes: list[int] = []

    def keep(on: bool) -> Any:
        def callback(info: imgdiff.samplers.StepInfo[Any]) -> None:
            kept[on].append(info.state)
            pool = active_pool()
            sizes.append(0 if pool is None else len(pool))

        return callback

    pooled = _run(sampler, noise)
    pooled_kept = _run(sampler, noise, keep(True))
    monkeypatch.setattr(buffers, "MIN_BYTES", 2**62)  # the pool never applies
    fresh = _run(sampler, noise)
    fresh_kept = _run(sampler, noise, keep(False))
    assert torch.equal(pooled, fresh)
    assert torch.equal(pooled_kept, fresh_kept)
    assert len(kept[True]) == len(kept[False]) == 12
    for a, b in zip(kept[True], kept[False], strict=True):
        for s, t in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,))), strict=True):
            assert torch.equal(s, t)
    assert max(sizes) > 0  # the loop ran inside a pool


@pytest.mark.filterwarnings("ignore::imgdiff.PrecisionWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["DDIM", "DDPM", "EDICT"])
def test_loops_cycle_through_a_few_buffers(name: str, backend: str) -> None:
    """A loop whose callback keeps nothing allocates its buffers once: the pool stops growing."""
    sampler = _samplers(backend)[name]
    sizes: list[int] = []

    def callback(info: imgdiff.samplers.StepInfo[Any]) -> None:
        pool = active_pool()
        assert pool is not None
        sizes.append(len(pool))

    _run(sampler, torch.randn(SHAPE), callback)
    assert sizes[-1] == sizes[3], sizes
    assert 0 < sizes[-1] <= 8, sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_region_paste_reuses_buffers(backend: str) -> None:
    known = torch.rand(4, 4, 128, 128) * 2 - 1
    mask = torch.zeros(4, 1, 128, 128)
    mask[..., 32:96, :] = 1.0
    sampler = imgdiff.DDIM(SCHEDULE, backend=backend)  # type: ignore[arg-type]
    region = imgdiff.conditioning.KnownRegion(known, mask)
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(2))
    pooled = sampler.sample(_model, noise, num_steps=8, callback=region, progress=False)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(buffers, "MIN_BYTES", 2**62)
        fresh = sampler.sample(_model, noise, num_steps=8, callback=region, progress=False)
    assert torch.equal(pooled, fresh)
    assert torch.equal(pooled * (1 - mask), known * (1 - mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loops_with_autograd_callbacks_and_memoising_models_equal_without_reuse(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A callback that turns autograd on for the state (guidance done by hand) and a model that
    memoises per input tensor (weak keys) see new tensor objects each step, as without a pool."""
    from torch.utils.weak import WeakIdKeyDictionary

    def run() -> tuple[torch.Tensor, int]:
        memo: WeakIdKeyDictionary = WeakIdKeyDictionary()
        hits = [0]

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if x in memo:
                hits[0] += 1
                return memo[x]
            memo[x] = out = _model(x, t)
            return out

        def guide(info: imgdiff.samplers.StepInfo[Any]) -> torch.Tensor:
            x = info.state
            assert not x.requires_grad
            with torch.enable_grad():
                x.requires_grad_(True)
                (x**2).sum().backward()
            assert x.grad is not None
            return (x - 0.01 * x.grad).detach()

        sampler = imgdiff.DDIM(SCHEDULE, backend=backend)  # type: ignore[arg-type]
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
        return sampler.sample(model, noise, num_steps=10, callback=guide, progress=False), hits[0]

    pooled, pooled_hits = run()
    monkeypatch.setattr(buffers, "MIN_BYTES", 2**62)
    fresh, fresh_hits = run()
    assert pooled_hits == fresh_hits == 0
    assert not pooled.requires_grad
    assert torch.equal(pooled, fresh)
