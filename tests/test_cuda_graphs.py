"""CUDA-graph sampling (``Sampler.capture_graph``): replays equal eager sampling.

The recording itself needs a CUDA GPU (those tests skip without one). On any machine the tests
check the argument rules and the replay object's input handling, with a stand-in graph whose
``replay`` re-runs the recorded function on the same input tensors, as a real replay does.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import Tensor

import imgdiff
from imgdiff import DDIM, DDPM, EDICT, NoiseSchedule
from imgdiff.conditioning import KnownRegion
from imgdiff.errors import GraphCaptureError, InputTypeError, InputValueError
from imgdiff.samplers import CUDAGraphSampling
from imgdiff.samplers.graphs import check_graph_generators, static_kwargs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class CondModel:
    """``eps = 0.5 tanh(x) + 0.1 cond + 1e-3 t``: graph-safe, reads a tensor condition."""

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        out = torch.tanh(x) * 0.5 + t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * 1e-3
        return out if cond is None else out + 0.1 * cond


class Rerun:
    """A stand-in for a CUDA graph: ``replay`` runs the recorded function again on its inputs."""

    def __init__(self, fn: object) -> None:
        self.fn = fn
        self.result: Tensor | None = None

    def replay(self) -> None:
        assert callable(self.fn)
        out = self.fn()
        assert self.result is not None
        self.result.copy_(out)  # a graph writes its outputs to the same memory every replay


# ------------------------------------------------------------------ on any machine


def test_capture_needs_a_cuda_sample() -> None:
    sampler = DDIM(NoiseSchedule.linear())
    with pytest.raises(InputValueError, match="noise: CUDA-graph capture needs a sample on a CUDA"):
        sampler.capture_graph(CondModel(), torch.randn(1, 3, 4, 4), num_steps=3)


def test_edict_capture_refuses_noise_and_checks_inverse() -> None:
    sampler = EDICT(NoiseSchedule.linear())
    with pytest.raises(InputValueError, match="EDICT is deterministic"):
        sampler.capture_graph(CondModel(), torch.randn(1, 3, 4, 4), generator=torch.Generator())
    with pytest.raises(InputTypeError, match="inverse: expected a bool"):
        sampler.capture_graph_pair(CondModel(), torch.randn(1, 3, 4, 4), inverse=1)  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="x0: CUDA-graph capture needs"):
        sampler.capture_graph_pair(CondModel(), torch.randn(1, 3, 4, 4), inverse=True)


def test_graph_generators_must_be_on_the_gpu() -> None:
    with pytest.raises(InputValueError, match="generator: a CUDA graph records noise drawn on the"):
        check_graph_generators(torch.Generator(), torch.device("cuda", 0))
    with pytest.raises(InputValueError, match="generator"):
        check_graph_generators([torch.Generator(), torch.Generator()], torch.device("cuda", 0))
    assert check_graph_generators(None, torch.device("cuda", 0)) == []
    with pytest.raises(InputValueError, match=r"callback\.generator: a CUDA graph"):
        check_graph_generators(
            torch.Generator(), torch.device("cuda", 0), name="callback.generator"
        )
    g = torch.Generator()
    assert check_graph_generators([g, g], torch.device("cpu")) == [g]  # registered once


def test_static_kwargs_copy_only_device_tensors() -> None:
    cond, other = torch.randn(2, 3), torch.randn(2, 3, device="meta")
    kwargs, replaceable = static_kwargs({"cond": cond, "other": other, "scale": 2.0}, cond.device)
    assert set(replaceable) == {"cond"}
    assert kwargs["cond"] is replaceable["cond"]
    assert kwargs["cond"] is not cond
    assert torch.equal(kwargs["cond"], cond)
    assert kwargs["other"] is other
    assert kwargs["scale"] == 2.0


def _replayer(step_noise: bool = True) -> tuple[CUDAGraphSampling[Tensor], dict[str, Tensor]]:
    """A replay object over ``x * 2 + cond + noise.sum(0)`` with a re-running stand-in graph."""
    bufs = {"x": torch.zeros(2, 3), "cond": torch.zeros(2, 3), "noise": torch.zeros(4, 2, 3)}
    graph = Rerun(lambda: bufs["x"] * 2 + bufs["cond"] + bufs["noise"].sum(0))
    graph.result = torch.zeros(2, 3)
    replay = CUDAGraphSampling(
        graph,
        start=(bufs["x"],),
        step_noise=bufs["noise"] if step_noise else None,
        model_kwargs={"cond": bufs["cond"]},
        result=graph.result,
        num_steps=4,
    )
    return replay, bufs


def test_replay_copies_inputs_in_and_returns_a_new_tensor() -> None:
    replay, bufs = _replayer()
    x, cond, noise = torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 2, 3)
    saved = (x.clone(), cond.clone(), noise.clone())
    first = replay(x, model_kwargs={"cond": cond}, step_noise=noise)
    torch.testing.assert_close(first, x * 2 + cond + noise.sum(0), rtol=0, atol=0)
    second = replay(torch.ones(2, 3))  # cond and noise keep their last values
    torch.testing.assert_close(second, 2 + cond + noise.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(first, x * 2 + cond + noise.sum(0), rtol=0, atol=0)  # not aliased
    for arg, before in zip((x, cond, noise), saved, strict=True):
        assert torch.equal(arg, before)
    assert replay.start_shapes == ((2, 3),)
    assert replay.num_steps == 4
    assert bufs["x"].data_ptr() != x.data_ptr()


def test_replay_rejects_inputs_unlike_the_capture() -> None:
    replay, _ = _replayer(step_noise=False)
    with pytest.raises(InputValueError, match=r"start: expected shape \(2, 3\) and dtype"):
        replay(torch.zeros(3, 3))
    with pytest.raises(InputValueError, match=r"torch\.float32 as at capture"):
        replay(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(InputTypeError, match=r"start: expected a torch\.Tensor"):
        replay(0.0)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match=r"start: expected a torch\.Tensor"):
        replay([[0.0] * 3, [0.0] * 3][:1])  # type: ignore[list-item]
    with pytest.raises(InputValueError, match="start: expected 1 tensor"):
        replay((torch.zeros(2, 3), torch.zeros(2, 3)))
    with pytest.raises(InputValueError, match="model_kwargs: expected tensor conditions given"):
        replay(torch.zeros(2, 3), model_kwargs={"mask": torch.zeros(2, 3)})
    with pytest.raises(InputValueError, match="step_noise: this loop was captured without"):
        replay(torch.zeros(2, 3), step_noise=torch.zeros(4, 2, 3))


def test_replay_takes_step_noise_of_any_floating_dtype() -> None:
    """Capture converts the injected noise to the sampler's state dtype, so a replay takes it in
    any floating dtype too (converted as at capture); a non-floating one or another shape is
    refused."""
    replay, bufs = _replayer()
    x, noise = torch.randn(2, 3), torch.randn(4, 2, 3, dtype=torch.float64)
    got = replay(x, step_noise=noise)
    assert bufs["noise"].dtype == torch.float32
    torch.testing.assert_close(got, x * 2 + noise.float().sum(0), rtol=0, atol=0)
    with pytest.raises(
        InputValueError, match=r"step_noise: expected shape \(4, 2, 3\) and a float"
    ):
        replay(x, step_noise=torch.zeros(4, 2, 3, dtype=torch.int64))
    with pytest.raises(InputValueError, match=r"step_noise: expected shape \(4, 2, 3\)"):
        replay(x, step_noise=torch.zeros(3, 2, 3))


@pytest.fixture
def rerun_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``capture_graph`` run on the CPU: "recording" runs the loop once, a replay re-runs it
    on the same input tensors and writes the recorded result tensors in place, as a graph does."""
    import imgdiff.samplers.base as base

    def capture(run: object, *, device: object, generators: object, warmup: int) -> object:
        assert callable(run)
        result = run()
        recorded = weakref.ref(run)  # a real graph holds no reference to the Python loop

        class Graph:
            def replay(self) -> None:
                loop = recorded()
                assert loop is not None, "the recorded loop was freed"
                new = loop()
                pairs = (
                    zip(result, new, strict=True) if isinstance(result, tuple) else [(result, new)]
                )
                for old, fresh in pairs:
                    old.copy_(fresh)

        return Graph(), result

    monkeypatch.setattr(base, "require_cuda", lambda name, device: None)
    monkeypatch.setattr(base, "capture_loop", capture)


@pytest.mark.usefixtures("rerun_capture")
def test_captured_loop_reads_its_inputs_from_the_replay() -> None:
    """Through the whole capture path: a replay on new noise, injected noise and a new condition
    equals eager sampling with them, and the caller's tensors are untouched."""
    sampler = DDPM(NoiseSchedule.linear())
    x, cond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    noise = torch.randn(6, 2, 3, 4, 4)
    saved = [t.clone() for t in (x, cond, noise)]
    graphed = sampler.capture_graph(
        CondModel(), x, num_steps=6, step_noise=noise, model_kwargs={"cond": cond}
    )
    x2, cond2, noise2 = torch.randn_like(x), torch.randn_like(cond), torch.randn_like(noise)
    got = graphed(x2, step_noise=noise2, model_kwargs={"cond": cond2})
    want = sampler.sample(
        CondModel(),
        x2,
        num_steps=6,
        step_noise=noise2,
        model_kwargs={"cond": cond2},
        progress=False,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for arg, before in zip((x, cond, noise), saved, strict=True):
        assert torch.equal(arg, before)
    with pytest.raises(InputTypeError, match="model_kwargs: expected a mapping"):
        sampler.capture_graph(CondModel(), x, num_steps=6, model_kwargs=[("cond", cond)])  # type: ignore[arg-type]


@pytest.mark.usefixtures("rerun_capture")
@pytest.mark.filterwarnings("ignore::imgdiff.PrecisionWarning")
def test_captured_edict_pair_equals_eager_inversion() -> None:
    sampler = EDICT(NoiseSchedule.linear())
    x0 = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    invert = sampler.capture_graph_pair(CondModel(), x0, inverse=True, num_steps=5)
    x1 = torch.randn_like(x0)
    for got, want in zip(
        invert(x1), sampler.invert(CondModel(), x1, num_steps=5, progress=False), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.usefixtures("rerun_capture")
def test_the_replay_object_keeps_what_the_graph_reads_alive() -> None:
    """The model (and the loop's timestep tensors beside it) live as long as the replay object:
    a graph reading freed memory would see whatever was allocated there next."""
    model = CondModel()
    ref = weakref.ref(model)
    graphed = DDIM(NoiseSchedule.linear()).capture_graph(
        model, torch.randn(1, 3, 4, 4), num_steps=3
    )
    del model
    gc.collect()
    assert ref() is not None
    del graphed
    gc.collect()
    assert ref() is None


def test_graph_capture_error_is_a_runtime_and_imgdiff_error() -> None:
    assert issubclass(GraphCaptureError, RuntimeError)
    assert issubclass(GraphCaptureError, imgdiff.ImgdiffError)


# ------------------------------------------------------------------ on a CUDA GPU


def _eager_and_graphed(
    sampler: imgdiff.Sampler, x: Tensor, **kwargs: object
) -> tuple[Tensor, CUDAGraphSampling[Tensor]]:
    eager = sampler.sample(CondModel(), x, progress=False, **kwargs)  # type: ignore[arg-type]
    graphed = sampler.capture_graph(CondModel(), x, **kwargs)  # type: ignore[arg-type]
    return eager, graphed


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddim_graph_replays_equal_eager(
    backend: str, dtype: torch.dtype
) -> None:  # pragma: no cover - GPU only
    sampler = DDIM(NoiseSchedule.linear(), backend=backend, dtype=dtype)  # type: ignore[arg-type]
    x = torch.randn(2, 4, 16, 16, device="cuda")
    eager, graphed = _eager_and_graphed(sampler, x, num_steps=20)
    torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)
    x2 = torch.randn_like(x)
    eager2 = sampler.sample(CondModel(), x2, num_steps=20, progress=False)
    out2 = graphed(x2)
    torch.testing.assert_close(out2, eager2, rtol=0, atol=0)
    assert not torch.equal(out2, eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["ddpm", "ddim_eta"])
def test_stochastic_graph_replays_equal_eager_with_the_same_generator_state(
    name: str, backend: str
) -> None:  # pragma: no cover - GPU only
    s = NoiseSchedule.linear()
    b = backend
    sampler = DDPM(s, backend=b) if name == "ddpm" else DDIM(s, eta=1.0, backend=b)  # type: ignore[arg-type]
    x = torch.randn(2, 3, 16, 16, device="cuda")
    gen = torch.Generator(device="cuda")
    graphed = sampler.capture_graph(CondModel(), x, num_steps=15, generator=gen)
    gen.manual_seed(7)
    eager = sampler.sample(CondModel(), x, num_steps=15, generator=gen, progress=False)
    gen.manual_seed(7)
    torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)
    assert not torch.equal(graphed(x), eager)  # a replay draws fresh noise


@pytest.mark.gpu
@needs_cuda
def test_injected_noise_and_conditions_can_change_between_replays() -> None:  # pragma: no cover
    sampler = DDPM(NoiseSchedule.linear())
    x = torch.randn(2, 3, 8, 8, device="cuda")
    noise = torch.randn(10, *x.shape, device="cuda")
    cond = torch.randn_like(x)
    graphed = sampler.capture_graph(
        CondModel(), x, num_steps=10, step_noise=noise, model_kwargs={"cond": cond}
    )
    noise2, cond2 = torch.randn_like(noise), torch.randn_like(cond)
    eager = sampler.sample(
        CondModel(),
        x,
        num_steps=10,
        step_noise=noise2,
        model_kwargs={"cond": cond2},
        progress=False,
    )
    out = graphed(x, step_noise=noise2, model_kwargs={"cond": cond2})
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_a_pinned_input_can_be_overwritten_as_soon_as_the_call_returns() -> (
    None
):  # pragma: no cover
    """The replay's copy of a page-locked ``start`` or condition must not read it late."""
    sampler = DDPM(NoiseSchedule.linear())
    x = torch.randn(2, 3, 8, 8, device="cuda")
    cond = torch.randn_like(x)
    noise = torch.randn(10, *x.shape, device="cuda")
    graphed = sampler.capture_graph(
        CondModel(), x, num_steps=10, step_noise=noise, model_kwargs={"cond": cond}
    )
    x_host, cond_host = torch.randn(x.shape).pin_memory(), torch.randn(x.shape).pin_memory()
    expected = graphed(x_host.cuda(), model_kwargs={"cond": cond_host.cuda()})
    torch.cuda._sleep(1_000_000_000)  # keep the stream busy so a late read would see the writes
    out = graphed(x_host, model_kwargs={"cond": cond_host})
    x_host.fill_(1e3)
    cond_host.fill_(-1e3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_known_region_callback_is_recorded(backend: str) -> None:  # pragma: no cover - GPU only
    s = NoiseSchedule.linear()
    known = torch.randn(2, 3, 8, 8, device="cuda")
    mask = torch.zeros(2, 1, 8, 8, device="cuda")
    mask[..., 2:6, 2:6] = 1
    region = KnownRegion(known, mask, backend=backend)  # type: ignore[arg-type]
    sampler = DDIM(s, backend=backend)  # type: ignore[arg-type]
    x = region.start(torch.randn_like(known))
    eager = sampler.sample(CondModel(), x, num_steps=10, callback=region, progress=False)
    graphed = sampler.capture_graph(CondModel(), x, num_steps=10, callback=region)
    out = graphed(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    keep = (1 - mask).bool().expand_as(out)
    assert torch.equal(out[keep], known[keep])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "backend"),
    [(torch.float64, "auto"), (torch.float32, "torch"), (torch.float32, "triton")],
)
def test_edict_graphs_invert_and_reconstruct(
    dtype: torch.dtype, backend: str
) -> None:  # pragma: no cover - GPU only
    """Recorded EDICT inversion and generation equal eager ones bitwise; float64 (the default, on
    the torch path) reconstructs to 1e-10, a float32 state (where the kernels run) to its
    rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imgdiff.PrecisionWarning)  # float32 is what is tested
        sampler = EDICT(NoiseSchedule.linear(), dtype=dtype, backend=backend)  # type: ignore[arg-type]
    x0 = torch.randn(2, 3, 8, 8, device="cuda", dtype=dtype)
    invert = sampler.capture_graph_pair(CondModel(), x0, inverse=True, num_steps=12)
    pair = invert(x0)
    eager_pair = sampler.invert(CondModel(), x0, num_steps=12, progress=False)
    for got, want in zip(pair, eager_pair, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    generate = sampler.capture_graph_pair(CondModel(), pair, num_steps=12)
    rec, _ = generate(pair)
    torch.testing.assert_close(rec, x0, rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-4)
    graphed = sampler.capture_graph(CondModel(), x0, num_steps=12)
    torch.testing.assert_close(
        graphed(x0), sampler.sample(CondModel(), x0, num_steps=12, progress=False), rtol=0, atol=0
    )


@pytest.mark.gpu
@needs_cuda
def test_a_model_that_syncs_cannot_be_recorded() -> None:  # pragma: no cover - GPU only
    """In a subprocess: some torch versions leave CUDA RNG state unusable after a failed capture."""
    import subprocess
    import sys

    code = (
        "import torch, imgdiff\n"
        "def syncing(x, t):\n"
        "    return x * float(x.abs().max())\n"
        "try:\n"
        "    imgdiff.DDIM(imgdiff.NoiseSchedule.linear()).capture_graph(\n"
        "        syncing, torch.randn(1, 3, 8, 8, device='cuda'), num_steps=3)\n"
        "except imgdiff.GraphCaptureError as e:\n"
        "    print('refused:', 'could not be recorded' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: True" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@needs_cuda
def test_replays_survive_later_allocations() -> None:  # pragma: no cover - GPU only
    """Memory freed after capture is reused by new tensors: replays must not read any of it."""
    sampler = DDIM(NoiseSchedule.linear())
    x = torch.randn(2, 3, 8, 8, device="cuda")
    graphed = sampler.capture_graph(CondModel(), x, num_steps=10)
    gc.collect()
    filler = [
        torch.full((k,), 10**6, dtype=torch.int64, device="cuda") for k in range(1, 20000, 61)
    ]
    eager = sampler.sample(CondModel(), x, num_steps=10, progress=False)
    torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)
    del filler


@pytest.mark.gpu
@needs_cuda
def test_per_sample_generators_and_a_noised_paste() -> None:  # pragma: no cover - GPU only
    s = NoiseSchedule.linear()
    known = torch.randn(2, 3, 8, 8, device="cuda")
    mask = torch.zeros(1, 1, 8, 8, device="cuda")
    mask[..., 2:6, 2:6] = 1
    paste_gen = torch.Generator(device="cuda")
    region = KnownRegion(known, mask, mode="noised", schedule=s, generator=paste_gen)
    gens = [torch.Generator(device="cuda") for _ in range(2)]
    sampler = DDPM(s)
    x = torch.randn_like(known)
    graphed = sampler.capture_graph(CondModel(), x, num_steps=8, generator=gens, callback=region)

    def seed() -> None:
        for k, g in enumerate([*gens, paste_gen]):
            g.manual_seed(10 + k)

    seed()
    eager = sampler.sample(
        CondModel(), x, num_steps=8, generator=gens, callback=region, progress=False
    )
    seed()
    torch.testing.assert_close(graphed(x), eager, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_cpu_generator_for_a_graph_is_refused() -> None:  # pragma: no cover - GPU only
    with pytest.raises(InputValueError, match="generator: a CUDA graph records noise"):
        DDPM(NoiseSchedule.linear()).capture_graph(
            CondModel(),
            torch.randn(1, 3, 8, 8, device="cuda"),
            num_steps=3,
            generator=torch.Generator(),
        )
