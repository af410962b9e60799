"""EDICT: spec tests EDICT-1..7, a random UNet in float32 with float64 state, guidance, bad input."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import imgdiff
from imgdiff import DDIM, EDICT, ClassifierFreeGuidance, NoiseSchedule, PrecisionWarning
from imgdiff.samplers.edict import edict_mix, edict_unmix
from imgdiff.timesteps import SamplingPlan

from .conftest import TanhModel, TimeOnlyModel, backends_here, device_for

SHAPE = (1, 4, 8, 8)  # spec 4.8: latent (1, 4, 8, 8), D = 256


def sd_edict(**kw: object) -> EDICT:
    """The paper's configuration: SD schedule, leading spacing with offset 1, alpha_bar_{-1} = alpha_bar_0."""
    return EDICT(NoiseSchedule.scaled_linear(), steps_offset=1, final_alpha_bar="first", **kw)  # type: ignore[arg-type]


def round_trip(
    sampler: EDICT, model: object, x0: torch.Tensor, **kw: object
) -> tuple[float, float]:
    pair = sampler.invert(model, x0, progress=False, **kw)  # type: ignore[arg-type]
    x, y = sampler.sample_pair(model, pair, progress=False, **kw)  # type: ignore[arg-type]
    return float((x - x0).abs().max()), float((y - x0).abs().max())


@pytest.fixture
def x0() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_edict1_round_trip_is_exact(x0: torch.Tensor, spacing: str) -> None:
    """EDICT-1: invert -> generate, p = 0.93, strength 1: x and y within 1e-9 of x0 (~1e-14)."""
    sampler = (
        sd_edict(spacing=spacing)
        if spacing == "leading"
        else EDICT(NoiseSchedule.scaled_linear(), spacing=spacing)
    )  # type: ignore[arg-type]
    ex, ey = round_trip(sampler, TanhModel(SHAPE[1:]), x0, num_steps=50)
    assert ex < 1e-9
    assert ey < 1e-9
    pair = sampler.invert(TanhModel(SHAPE[1:]), x0, num_steps=50, progress=False)
    assert float((pair[0] - x0).abs().max()) > 0.5  # the inversion really moved


@dataclass(frozen=True, kw_only=True)
class _CommunityRuleEDICT(EDICT):
    """The diffusers community pipeline's order rule: parity of the *inversion* index (spec 4.3).

    Written as a user would, by overriding a hook: invert() must use the subclass's override.
    """

    def inverse_coefficients(self, plan: SamplingPlan) -> imgdiff.samplers.EDICTCoefficients:
        return self._table(plan, torch.arange(len(plan)) + 1)


@pytest.mark.parametrize(("n", "strength", "steps"), [(50, 0.82, 41), (51, 1.0, 51), (7, 1.0, 7)])
def test_edict2_odd_step_counts(x0: torch.Tensor, n: int, strength: float, steps: int) -> None:
    """EDICT-2: odd step counts are exact with the generation-index rule; the community rule fails."""
    sampler = sd_edict()
    model = TanhModel(SHAPE[1:])
    assert len(sampler.plan(n, strength=strength)) == steps
    ex, ey = round_trip(sampler, model, x0, num_steps=n, strength=strength)
    assert max(ex, ey) < 1e-9
    wrong = _CommunityRuleEDICT(
        NoiseSchedule.scaled_linear(), steps_offset=1, final_alpha_bar="first"
    )
    pair = wrong.invert(model, x0, num_steps=n, strength=strength, progress=False)
    rec = sampler.sample(model, pair, num_steps=n, strength=strength, progress=False)
    assert float((rec - x0).abs().max()) > 1e-3
    # ...while for an even count the two rules agree.
    pair = wrong.invert(model, x0, num_steps=50, progress=False)
    assert (
        float((sampler.sample(model, pair, num_steps=50, progress=False) - x0).abs().max()) < 1e-9
    )


def test_edict3_float32_state(x0: torch.Tensor) -> None:
    """EDICT-3: a float32 state reconstructs within 1e-3, worse than float64; the user is warned."""
    model = TanhModel(SHAPE[1:])
    with pytest.warns(PrecisionWarning, match="float32"):
        sampler32 = sd_edict(dtype=torch.float32)
    err32 = max(round_trip(sampler32, model, x0.float(), num_steps=50))
    err64 = max(round_trip(sd_edict(), model, x0, num_steps=50))
    assert err32 < 1e-3
    assert err32 > err64
    assert err64 < 1e-12


def test_edict4_leapfrog_off_is_exact(x0: torch.Tensor) -> None:
    """EDICT-4: with leapfrog off (x always first) inversion is still exact."""
    ex, ey = round_trip(sd_edict(leapfrog=False), TanhModel(SHAPE[1:]), x0, num_steps=50)
    assert max(ex, ey) < 1e-9


def test_edict5_time_only_model_is_ddim() -> None:
    """EDICT-5: with eps depending only on t, EDICT generation is DDIM (eta 0) and x == y throughout."""
    s = NoiseSchedule.scaled_linear()
    model = TimeOnlyModel(SHAPE[1:])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    sampler = EDICT(s, steps_offset=1, final_alpha_bar="first")
    out = sampler.sample(
        model, x_T, num_steps=50, callback=lambda i: pairs.append(i.state), progress=False
    )
    ddim = DDIM(s, steps_offset=1, final_alpha_bar="first").sample(
        model, x_T, num_steps=50, progress=False
    )
    torch.testing.assert_close(out, ddim, rtol=0, atol=1e-12)
    assert len(pairs) == 50
    assert all(float((x - y).abs().max()) < 1e-12 for x, y in pairs)


def test_edict6_mixing_layer_and_mismatched_models(x0: torch.Tensor) -> None:
    """EDICT-6: unmix(mix(x, y)) == (x, y) (1e-14); a different eps in the two passes breaks exactness."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    mx, my = edict_mix(x, y, 0.93)
    assert float((mx - x).abs().max()) > 1e-3  # mixing does something
    ux, uy = edict_unmix(mx, my, 0.93)
    torch.testing.assert_close((ux, uy), (x, y), rtol=0, atol=1e-14)
    sampler = sd_edict()
    model = TanhModel(SHAPE[1:])

    def scaled(
        z: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:  # what another CFG scale amounts to
        return 1.01 * model(z, t)

    pair = sampler.invert(model, x0, num_steps=50, progress=False)
    rec = sampler.sample(scaled, pair, num_steps=50, progress=False)
    assert float((rec - x0).abs().max()) > 1e-6


def test_edict7_coefficients_are_the_ddim_step() -> None:
    """EDICT-7: a_t z + b_t eps equals the generic DDIM (eta 0) step for every (t, s) of the plan."""
    s = NoiseSchedule.scaled_linear()
    edict = EDICT(s, steps_offset=1, final_alpha_bar="first")
    ddim = DDIM(s, steps_offset=1, final_alpha_bar="first")
    plan = edict.plan(50)
    e, d = edict.coefficients(plan), ddim.coefficients(plan)
    torch.testing.assert_close(e.a, d.x_coef, rtol=0, atol=1e-12)
    torch.testing.assert_close(e.b, d.out_coef, rtol=0, atol=1e-12)
    assert e.x_first.tolist() == [1.0, 0.0] * 25  # type: ignore[union-attr]


def _tiny_unet() -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return unet.eval()


def test_random_unet_float32_model_float64_state() -> None:
    """A random diffusers UNet in float32 with float64 EDICT state: round trip < 1e-6, (2,4,16,16), 50 steps."""
    unet = _tiny_unet()
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x.dtype)
        return unet(x, t).sample

    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = sd_edict()
    ex, ey = round_trip(sampler, model, x0, num_steps=50, model_dtype=torch.float32)
    assert max(ex, ey) < 1e-6
    assert set(calls) == {torch.float32}
    assert len(calls) == 2 * 50 * 2  # two model calls per step, per direction


def test_exact_through_classifier_free_guidance(x0: torch.Tensor) -> None:
    """With the same CFG wrapper and condition in both passes, inversion stays exact; a different
    guidance scale in the generation pass breaks it."""
    base = TanhModel((SHAPE[1] + 1, *SHAPE[2:]))

    def conditional(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        plane = label.to(x.dtype).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return base(torch.cat([x, plane], dim=1), t)[:, : x.shape[1]]

    null = {"label": torch.zeros(1)}
    cond = {"label": torch.full((1,), 2.0)}
    sampler = sd_edict()
    guided = ClassifierFreeGuidance(conditional, 3.0, null)
    pair = sampler.invert(guided, x0, num_steps=30, model_kwargs=cond, progress=False)
    rec = sampler.sample(guided, pair, num_steps=30, model_kwargs=cond, progress=False)
    assert float((rec - x0).abs().max()) < 1e-9
    other = ClassifierFreeGuidance(conditional, 3.5, null)
    rec2 = sampler.sample(other, pair, num_steps=30, model_kwargs=cond, progress=False)
    assert float((rec2 - x0).abs().max()) > 1e-6


def test_edit_with_the_source_condition_returns_the_input(x0: torch.Tensor) -> None:
    """edict_edit with target == source reconstructs x0; another target changes it."""

    def conditional(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        return torch.tanh(
            x * 0.5
            + label.to(x.dtype).reshape(-1, 1, 1, 1)
            * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)
        )

    kw = {"null": {"label": torch.zeros(1)}, "num_steps": 20, "strength": 0.8, "progress": False}
    same = imgdiff.edict_edit(
        sd_edict(),
        conditional,
        x0,
        source={"label": torch.ones(1)},
        target={"label": torch.ones(1)},
        **kw,
    )  # type: ignore[arg-type]
    assert float((same - x0).abs().max()) < 1e-9
    edited = imgdiff.edict_edit(
        sd_edict(),
        conditional,
        x0,
        source={"label": torch.ones(1)},
        target={"label": -torch.ones(1)},
        **kw,
    )  # type: ignore[arg-type]
    assert float((edited - x0).abs().max()) > 0.1


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"guidance_rescale": 1.5}, r"guidance_rescale: .*<= 1"),
        ({"guidance_scale": "3"}, r"guidance_scale: "),
        ({"source": [1.0]}, r"source: expected a mapping"),
        ({"target": {"other": torch.ones(1)}}, r"target: .*missing \['label'\]"),
        ({"source": {}}, r"source: .*missing \['label'\]"),
    ],
)
def test_edit_names_its_own_arguments(
    x0: torch.Tensor, override: dict[str, object], match: str
) -> None:
    """A bad edict_edit argument is named as the caller wrote it, not as CFG's internal one."""
    kw: dict[str, object] = {
        "source": {"label": torch.ones(1)},
        "target": {"label": torch.ones(1)},
        "null": {"label": torch.zeros(1)},
        "num_steps": 4,
        "progress": False,
    }
    kw.update(override)
    with pytest.raises(imgdiff.ImgdiffError, match=match):
        imgdiff.edict_edit(sd_edict(), TanhModel(SHAPE[1:]), x0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction", ["sample", "v"])
def test_exact_for_other_prediction_types(x0: torch.Tensor, prediction: str) -> None:
    """EDICT needs only a deterministic eps(z, t): x0- and v-prediction models invert exactly too."""
    ex, ey = round_trip(
        sd_edict(prediction=prediction), TanhModel(SHAPE[1:], scale=0.5), x0, num_steps=25
    )
    assert max(ex, ey) < 1e-9


def test_batch_of_samples_round_trips_each() -> None:
    """A batch inverts and reconstructs every sample exactly."""
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ex, ey = round_trip(sd_edict(), TanhModel((2, 4, 4)), x0, num_steps=20)
    assert max(ex, ey) < 1e-9


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_steps_stay_differentiable_through_the_model(
    backend: str, inverse: bool, x_first: bool
) -> None:
    """With autograd on and a model whose output needs it (a parameter to fit through the step),
    every backend's step is differentiable and gives torch's gradient: the fused kernels must
    not drop the graph because the state itself needs no gradient."""
    from imgdiff.models import BoundModel
    from imgdiff.samplers.step import StepContext

    g = torch.Generator().manual_seed(3)
    dev = device_for(backend)
    x, y = (torch.randn(2, 4, 8, 8, generator=g).to(dev) for _ in range(2))
    grads, states = {}, {}
    for b in ("torch", backend):
        w = torch.nn.Parameter(torch.tensor(0.7, device=dev))
        model = BoundModel(
            lambda z, t, w=w: torch.tanh(z) * w,
            model_dtype=torch.float32,
            state_dtype=torch.float32,
        )
        sampler = EDICT(NoiseSchedule.linear(), dtype=None, backend=b)  # type: ignore[arg-type]
        plan = sampler.plan(10)
        table = sampler.inverse_coefficients(plan) if inverse else sampler.coefficients(plan)
        rows = [r for r in table.unbind() if bool(r.x_first) == x_first]
        k = int(plan.timesteps[3])
        ctx = StepContext(
            3,
            10,
            k,
            k - 100,
            torch.full((2,), k, device=dev),
            torch.full((2,), k - 100, device=dev),
        )
        with torch.enable_grad():
            step = sampler.inverse_step if inverse else sampler.step
            out = step(model, (x, y), rows[0], ctx, None)
            assert all(t.requires_grad for t in out.state), b
            (out.state[0].sum() + 2 * out.state[1].sum()).backward()
        grads[b], states[b] = w.grad, out.state
    assert grads[backend] is not None
    torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-5, atol=1e-5)
    for got, want in zip(states[backend], states["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_here())
def test_step_stays_differentiable_when_only_the_first_model_call_needs_it(backend: str) -> None:
    """The first sub-step's result carries the graph into the second half even when the second
    model output does not (a branch that detaches): the fused second half must not drop it."""
    from imgdiff.models import BoundModel
    from imgdiff.samplers.step import StepContext

    dev = device_for(backend)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)).to(dev)
    grads = {}
    for b in ("torch", backend):
        w = torch.tensor(0.3, requires_grad=True, device=dev)
        calls = [0]

        def model(
            z: torch.Tensor, t: torch.Tensor, w: torch.Tensor = w, calls: list[int] = calls
        ) -> torch.Tensor:
            calls[0] += 1
            return 0.1 * z + w if calls[0] % 2 == 1 else 0.1 * z.detach()

        sampler = EDICT(NoiseSchedule.linear(), dtype=None, backend=b)  # type: ignore[arg-type]
        c = sampler.coefficients(sampler.plan(10)).unbind()[2]
        bound = BoundModel(model, model_dtype=torch.float32, state_dtype=torch.float32)
        ctx = StepContext(
            2, 10, 500, 400, torch.full((1,), 500, device=dev), torch.full((1,), 400, device=dev)
        )
        with torch.enable_grad():
            xs, _ = sampler.step(bound, (x, x.clone()), c, ctx, None).state
            assert xs.requires_grad, b
            grads[b] = torch.autograd.grad(xs.sum(), w)[0]
    torch.testing.assert_close(grads[backend], grads["torch"])


def _one_step(
    backend: str,
    prediction: str,
    inverse: bool,
    x_first: bool,
    fn: object = None,
    device: str = "cpu",
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One float32 step (or inverse step) of a v-, x0- or eps-model ``fn`` (default: the spec's
    tanh model) on ``backend`` and ``device``, ready to run."""
    from imgdiff.models import BoundModel
    from imgdiff.samplers.step import StepContext

    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 4, 8, 8, generator=g).to(device) for _ in range(2))
    model = BoundModel(
        fn or TanhModel((4, 8, 8), scale=0.5),  # type: ignore[arg-type]
        model_dtype=torch.float32,
        state_dtype=torch.float32,
    )
    sampler = EDICT(NoiseSchedule.linear(), dtype=None, prediction=prediction, backend=backend)  # type: ignore[arg-type]
    plan = sampler.plan(10)
    table = sampler.inverse_coefficients(plan) if inverse else sampler.coefficients(plan)
    c = [r for r in table.unbind() if bool(r.x_first) == x_first][1]
    k = int(plan.timesteps[3])
    t, t_next = (torch.full((2,), v, device=device) for v in (k, k - 100))
    ctx = StepContext(3, 10, k, k - 100, t, t_next)
    step = sampler.inverse_step if inverse else sampler.step
    return lambda: step(model, (x, y), c, ctx, None).state


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_fused_steps_equal_torch_for_every_prediction_type(
    backend: str, prediction: str, inverse: bool, x_first: bool
) -> None:
    """The fused kernels fold an x0- or v-model's eps estimate into their coefficients
    (``a z + b eps_hat(w, out)`` as one combination of ``z``, ``out`` and ``w``) and run the
    inverse's unmixing in one pass: the step equals the torch path's to float32 rounding."""
    dev = device_for(backend)
    got = _one_step(backend, prediction, inverse, x_first, device=dev)()
    want = _one_step("torch", prediction, inverse, x_first, device=dev)()
    for g_, w in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not imgdiff.kernels.cpu.available(), reason="needs the CPU kernels")
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("inverse", [False, True])
def test_fused_steps_run_no_torch_arithmetic(prediction: str, inverse: bool) -> None:
    """On the CPU kernels a step of an epsilon- or v-model is the kernels alone: torch only
    allocates (no eps_hat formed first, no unmixing in torch)."""

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z)  # no arithmetic op of its own

    for backend, fused in (("torch", False), ("cpu", True)):
        step = _one_step(backend, prediction, inverse, True, model)
        step()  # warm-up (builds the kernels)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        ops = {e.name for e in prof.events()}
        arithmetic = ops & {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::lerp"}
        assert not arithmetic if fused else arithmetic, (backend, sorted(ops))


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("x_first", [True, False])
def test_fused_step_writes_into_the_model_input_no_one_kept(
    backend: str, inverse: bool, x_first: bool
) -> None:
    """The sequence the model saw (sub-step 1's new tensor; the unmixed one when inverting) is
    the step's own: where the model kept nothing of it, its memory takes its next value. (Under
    Triton's interpreter the launch leaves reference cycles to the tensor until the next garbage
    collection, and on a GPU no memory is exclusive (torch reports every CUDA storage as shared),
    so the step allocates instead: only the values are checked for Triton.)"""
    seen: list[int] = []

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(z.data_ptr())  # an address, not the tensor
        return torch.tanh(z)

    dev = device_for(backend)
    state = _one_step(backend, "epsilon", inverse, x_first, model, dev)()
    want = _one_step("torch", "epsilon", inverse, x_first, model, dev)()
    lent = seen[0] if inverse else seen[1]  # the step's own tensor given to the model
    assert (lent in {s.data_ptr() for s in state}) or backend == "triton"
    for g_, w in zip(state, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)


_KEEPERS: dict[str, Callable[[torch.Tensor], object]] = {
    "tensor": lambda z: z,
    "view": lambda z: z[:1],
    "storage": lambda z: z.untyped_storage(),
    "output": lambda z: z,  # and returned as the model's output
}


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("keep", list(_KEEPERS))
def test_fused_step_leaves_what_the_model_kept(backend: str, inverse: bool, keep: str) -> None:
    """A model that keeps its input (or a view of it, its storage, or returns it) finds it
    unchanged after the step, and the step's result is the torch path's."""
    kept: list[tuple[object, torch.Tensor, torch.Tensor]] = []

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kept.append((_KEEPERS[keep](z), z.clone(), torch.empty_like(z)))
        return z if keep == "output" else torch.tanh(z)

    dev = device_for(backend)
    state = _one_step(backend, "epsilon", inverse, True, model, dev)()
    for held, value, like in kept:
        if isinstance(held, torch.UntypedStorage):
            held = like.set_(held, 0, value.shape, value.stride())
        assert isinstance(held, torch.Tensor)
        assert torch.equal(held, value[: held.shape[0]])
    want = _one_step("torch", "epsilon", inverse, True, model, dev)()
    for g_, w in zip(state, want, strict=True):
        torch.testing.assert_close(g_, w, rtol=1e-5, atol=1e-5)


def test_input_pair_is_not_modified(x0: torch.Tensor) -> None:
    """invert and sample leave their inputs unchanged."""
    keep = x0.clone()
    sampler = sd_edict()
    pair = sampler.invert(TanhModel(SHAPE[1:]), x0, num_steps=5, progress=False)
    kept = (pair[0].clone(), pair[1].clone())
    sampler.sample(TanhModel(SHAPE[1:]), pair, num_steps=5, progress=False)
    assert torch.equal(x0, keep)
    assert torch.equal(pair[0], kept[0])
    assert torch.equal(pair[1], kept[1])


def test_bad_input() -> None:
    """Thresholding, mix out of range, bad pairs: clear errors naming the argument."""
    s = NoiseSchedule.scaled_linear()
    with pytest.raises(imgdiff.InputValueError, match=r"^thresholding: expected None for EDICT"):
        EDICT(s, thresholding=imgdiff.Clip(1.0))  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputValueError, match=r"^mix: expected a float > 0\.0, got 0\.0"):
        EDICT(s, mix=0.0)
    with pytest.raises(imgdiff.InputValueError, match=r"^mix: expected a float <= 1\.0, got 1\.5"):
        EDICT(s, mix=1.5)
    with pytest.raises(imgdiff.InputTypeError, match=r"^leapfrog: expected a bool"):
        EDICT(s, leapfrog=1)  # type: ignore[arg-type]
    with pytest.warns(PrecisionWarning, match="mix=0.8"):
        EDICT(s, mix=0.8)
    sampler = EDICT(s)
    model = TanhModel((2, 3, 3))
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^noise\[1\]: expected shape \(1, 2, 3, 3\)"
    ):
        sampler.sample(model, (x, torch.randn(2, 2, 3, 3)), num_steps=3, progress=False)
    with pytest.raises(imgdiff.InputValueError, match=r"^noise: expected a tensor or a pair"):
        sampler.sample(model, (x, x, x), num_steps=3, progress=False)  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^x0: expected a floating-point tensor"):
        sampler.invert(
            model, torch.zeros(1, 2, 3, 3, dtype=torch.int64), num_steps=3, progress=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EDICT(s)  # the defaults warn about nothing


def test_wrapped_float32_unet_runs_in_its_own_dtype() -> None:
    """A float32 network wrapped in a function (its parameters found through the closure) runs
    in float32, not the float64 state's dtype; the round trip stays exact to the state's
    rounding (a float64 call would fail in its float32 layers). A callable with no network to
    find falls back to the input's dtype: test_a_parameterless_model_runs_in_the_input_dtype."""
    unet = _tiny_unet()
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))  # float32 input

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t).sample

    sampler = sd_edict()
    pair = sampler.invert(model, x0, num_steps=10, progress=False)
    assert pair[0].dtype == torch.float64
    rec = sampler.sample(model, pair, num_steps=10, progress=False)
    assert float((rec - x0.double()).abs().max()) < 1e-6


def test_callback_x0_hat_and_state_replacement() -> None:
    """Generation callbacks see the x0_hat of the step's input (equal to DDIM's for a time-only
    model); returning the pair replaces the state; inversion callbacks see the timesteps ascending."""
    s = NoiseSchedule.scaled_linear()
    model = TimeOnlyModel(SHAPE[1:])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e_x0: list[torch.Tensor] = []
    d_x0: list[torch.Tensor] = []
    EDICT(s).sample(
        model, x_T, num_steps=10, callback=lambda i: e_x0.append(i.x0_hat), progress=False
    )
    DDIM(s).sample(
        model, x_T, num_steps=10, callback=lambda i: d_x0.append(i.x0_hat), progress=False
    )
    for a, b in zip(e_x0, d_x0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    plain = EDICT(s).sample(TanhModel(SHAPE[1:]), x_T, num_steps=10, progress=False)
    same = EDICT(s).sample(
        TanhModel(SHAPE[1:]), x_T, num_steps=10, callback=lambda i: i.state, progress=False
    )
    assert torch.equal(plain, same)
    seen: list[int] = []
    EDICT(s).invert(
        model, x_T, num_steps=10, callback=lambda i: seen.append(i.timestep), progress=False
    )
    assert seen == sorted(seen)
    assert seen == list(EDICT(s).timesteps(10))[::-1]


def test_batch_and_reuse_invariance() -> None:
    """A sample's round trip inside a batch equals the same alone; one sampler object reused across
    batch sizes and step counts equals fresh ones."""
    model = TanhModel((2, 3, 3))
    x0 = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shared = sd_edict()
    batch = shared.invert(model, x0, num_steps=12, progress=False)
    alone = sd_edict().invert(model, x0[1:2], num_steps=12, progress=False)
    torch.testing.assert_close(alone[0], batch[0][1:2], rtol=1e-12, atol=1e-12)
    for n, b in ((5, 1), (12, 3), (7, 2)):
        a = shared.sample(model, x0[:b], num_steps=n, progress=False)
        f = sd_edict().sample(model, x0[:b], num_steps=n, progress=False)
        assert torch.equal(a, f)


def test_loop_has_no_host_reads() -> None:
    """EDICT's loop (both directions) runs on the meta device, where any host read raises."""
    s = NoiseSchedule.scaled_linear()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) * 1e-3

    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float64)
    pair = EDICT(s).invert(model, x, num_steps=9, progress=False)
    assert pair[0].device.type == "meta"
    assert EDICT(s).sample(model, pair, num_steps=9, progress=False).device.type == "meta"


def test_zero_terminal_snr_and_other_refusals() -> None:
    """alpha_bar = 0 at the noisy end, noise arguments and wrong model outputs give clear errors."""
    z = NoiseSchedule.scaled_linear().rescale_zero_terminal_snr()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    model = TanhModel((2, 3, 3))
    with pytest.raises(
        imgdiff.InputValueError, match=r"^timesteps: .*alpha_bar = 0 at timesteps \[999\]"
    ):
        EDICT(z, spacing="trailing", prediction="v").invert(model, x, num_steps=5, progress=False)
    assert torch.isfinite(
        EDICT(z, prediction="v").sample(model, x, num_steps=5, progress=False)
    ).all()
    s = NoiseSchedule.scaled_linear()
    with pytest.raises(imgdiff.InputValueError, match=r"^generator: EDICT is deterministic"):
        EDICT(s).sample(model, x, num_steps=3, generator=torch.Generator(), progress=False)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^model output: expected shape \(1, 2, 3, 3\)"
    ):
        EDICT(s).sample(lambda x, t: torch.zeros(1, 4, 3, 3), x, num_steps=3, progress=False)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^model output: expected shape \(2, 2, 3, 3\)"
    ):
        EDICT(s).sample(
            lambda x, t: torch.zeros(1, 2, 3, 3),
            x.expand(2, -1, -1, -1),
            num_steps=3,
            progress=False,
        )


def test_float32_input_with_dtype_none_warns_at_the_call() -> None:
    """dtype=None follows the input; a float32 input then warns, pointing at the caller's line."""
    sampler = EDICT(NoiseSchedule.scaled_linear(), dtype=None)
    x = torch.randn(1, 2, 3, 3)
    with pytest.warns(PrecisionWarning, match="float32") as record:
        sampler.sample(TanhModel((2, 3, 3)), x, num_steps=3, progress=False)
    assert record[0].filename == __file__


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(1, 30),
    strength=st.sampled_from([1.0, 0.7]),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    leapfrog=st.booleans(),
    prediction=st.sampled_from(["epsilon", "sample", "v"]),
    final=st.sampled_from(["one", "first"]),
)
def test_round_trip_property(
    steps: int, strength: float, spacing: str, leapfrog: bool, prediction: str, final: str
) -> None:
    """Any step count, strength, spacing, leapfrog, prediction type and final level: exact."""
    assume(int(steps * strength) >= 1)
    sampler = EDICT(
        NoiseSchedule.scaled_linear(),
        spacing=spacing,
        leapfrog=leapfrog,
        prediction=prediction,
        final_alpha_bar=final,
    )  # type: ignore[arg-type]
    x0 = torch.randn(
        2, 2, 3, 3, generator=torch.Generator().manual_seed(steps), dtype=torch.float64
    )
    ex, ey = round_trip(
        sampler, TanhModel((2, 3, 3), scale=0.5), x0, num_steps=steps, strength=strength
    )
    assert max(ex, ey) < 1e-9


def test_generation_steps_follow_the_paper_by_hand() -> None:
    """Three generation steps from a pair with x != y equal EDICT eq. 10-11 written out in float64:
    leapfrog sub-steps (x first at even steps), then x' = p x_i + (1-p) y_i and
    y' = p y_i + (1-p) x' with the paper's p = 0.93; a round trip alone holds for any p."""
    sampler = sd_edict()
    assert sampler.mix == 0.93
    model = TanhModel(SHAPE[1:], scale=0.5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    plan = sampler.plan(3)
    got = sampler.sample_pair(model, (x, y), num_steps=3, progress=False)
    p = 0.93
    for k in range(3):
        t = torch.full((1,), int(plan.timesteps[k]))
        ab, ab_s = float(plan.alpha_bar[k]), float(plan.alpha_bar_next[k])
        a = (ab_s / ab) ** 0.5
        b = (1 - ab_s) ** 0.5 - a * (1 - ab) ** 0.5
        if k % 2 == 0:
            x_i = a * x + b * model(y, t)
            y_i = a * y + b * model(x_i, t)
        else:
            y_i = a * y + b * model(x, t)
            x_i = a * x + b * model(y_i, t)
        x = p * x_i + (1 - p) * y_i
        y = p * y_i + (1 - p) * x
    torch.testing.assert_close(got[0], x, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], y, rtol=0, atol=1e-12)


def test_edit_passes_guidance_rescale_to_both_passes() -> None:
    """edict_edit(guidance_rescale=phi) is EDICT inversion then generation through
    ClassifierFreeGuidance(model, w, null, rescale=phi); phi changes the edit."""

    def conditional(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        return torch.tanh(
            x * 0.5
            + label.to(x.dtype).reshape(-1, 1, 1, 1)
            * (1 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000)
        )

    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sampler = EDICT(NoiseSchedule.scaled_linear(), steps_offset=1, final_alpha_bar="first")
    null, src, tgt = {"label": torch.zeros(1)}, {"label": torch.ones(1)}, {"label": -torch.ones(1)}
    kw = {"num_steps": 10, "strength": 0.8, "progress": False}
    got = imgdiff.edict_edit(
        sampler, conditional, x0, source=src, target=tgt, null=null, guidance_rescale=0.7, **kw
    )
    guided = ClassifierFreeGuidance(conditional, 3.0, null, rescale=0.7)  # 3: the default scale
    pair = sampler.invert(guided, x0, model_kwargs=src, **kw)
    want = sampler.sample(guided, pair, model_kwargs=tgt, **kw)
    torch.testing.assert_close(got, want)
    plain = imgdiff.edict_edit(sampler, conditional, x0, source=src, target=tgt, null=null, **kw)
    assert float((got - plain).abs().max()) > 1e-6
