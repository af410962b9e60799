"""Loss guidance (spec 7.7, LOSS-7): sign, gradient formula, views, gates, classifier equivalence."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor

import imgdiff
from imgdiff import LossGuidance, LossTerm
from imgdiff.guidance import ClassifierGuidance
from imgdiff.loss_guidance import GuidanceInputs
from imgdiff.samplers.step import StepContext

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError
SCHED = imgdiff.NoiseSchedule.linear()


def _quadratic(c: Tensor) -> LossTerm:
    return LossTerm("quad", lambda v: ((v.x - c) ** 2).sum(), weight=2.0)


@pytest.mark.parametrize("sampler_cls", [imgdiff.DDPM, imgdiff.DDIM])
def test_guided_samples_move_toward_the_loss_minimum(sampler_cls: type) -> None:
    """LOSS-7: with L = |x_in - c|^2 and the exact denoiser of Gaussian data, guided samples are
    closer to c than unguided ones from the same noise."""
    model = imgdiff.GaussianDenoiser(SCHED)
    c = torch.full((1, 2, 1, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(
        1000, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    plain = sampler_cls(SCHED)
    guided = sampler_cls(SCHED, guidance=LossGuidance([_quadratic(c)]))
    kw = {"num_steps": 25, "progress": False}
    a = plain.sample(model, noise, generator=torch.Generator().manual_seed(2), **kw)
    b = guided.sample(model, noise, generator=torch.Generator().manual_seed(2), **kw)
    d_plain = (a - c).pow(2).mean().item()
    d_guided = (b - c).pow(2).mean().item()
    assert d_guided < 0.8 * d_plain
    assert (b.mean() - c.mean()).abs() < (a.mean() - c.mean()).abs()


def _ctx(timestep: int, B: int, *, step_index: int = 0, num_steps: int = 10) -> StepContext:
    t = torch.full((B,), timestep, dtype=torch.long)
    return StepContext(step_index, num_steps, timestep, timestep - 1, t, t - 1)


def test_gradient_is_minus_the_loss_gradient_through_the_blend() -> None:
    """x_in = sigma x0_hat + (1 - sigma) x_t with x0_hat = a x: g = -2 w k (k x - c), k = sigma a + 1 - sigma."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    a, sigma, w = 0.6, 0.3, 2.0
    c = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    g = LossGuidance([_quadratic(c)]).gradient_from_estimate(x, a * x, _ctx(500, 3), sigma)
    k = sigma * a + 1 - sigma
    torch.testing.assert_close(g, -2 * w * k * (k * x.detach() - c))


def _spy(name: str, *, seen: dict[str, GuidanceInputs]) -> LossTerm:
    """A term on input view ``name`` that records what it sees (its loss: the view's sum)."""

    def loss(v: GuidanceInputs) -> Tensor:
        seen[name] = v
        return v.x.sum()

    return LossTerm(name, loss, input=name)  # type: ignore[arg-type]


def test_views_of_the_sample_and_the_source() -> None:
    B = 2
    x = torch.randn(B, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x0 = 0.5 * x
    src = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    sigma = 0.4
    seen: dict[str, GuidanceInputs] = {}
    spy = functools.partial(_spy, seen=seen)

    guidance = LossGuidance(
        [spy("blend"), spy("x0_hat"), spy("x_t")],
        source=src,
        generator=torch.Generator().manual_seed(3),
    )
    guidance.gradient_from_estimate(x, x0, _ctx(300, B), sigma)
    noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y_t = math.sqrt(1 - sigma**2) * src + sigma * noise
    torch.testing.assert_close(seen["blend"].x, sigma * x0 + (1 - sigma) * x)
    torch.testing.assert_close(seen["blend"].source, sigma * src + (1 - sigma) * y_t)
    torch.testing.assert_close(seen["x0_hat"].x, x0)
    torch.testing.assert_close(seen["x0_hat"].source, src)
    torch.testing.assert_close(seen["x_t"].x, x)
    torch.testing.assert_close(seen["x_t"].source, y_t)
    assert seen["x_t"].timestep == 300
    assert seen["x_t"].t.tolist() == [300, 300]


def test_timestep_gates_and_the_reported_terms() -> None:
    reported: list[tuple[int, set[str]]] = []
    terms = [
        LossTerm("always", lambda v: v.x.sum()),
        LossTerm("low", lambda v: v.x.sum(), max_timestep=500),
    ]
    guidance = LossGuidance(
        terms, on_terms=lambda ctx, values: reported.append((ctx.timestep, set(values)))
    )
    sampler = imgdiff.DDIM(SCHED, guidance=guidance)
    model = imgdiff.GaussianDenoiser(SCHED)
    sampler.sample(model, torch.randn(2, 1, 2, 2), num_steps=10, progress=False)
    assert [t for t, _ in reported] == list(sampler.timesteps(10))
    for t, names in reported:
        assert names == ({"always", "low"} if t < 500 else {"always"})
    # ZeCon's code compares with the index within the run: the gate stays open for 10 steps
    reported.clear()
    compat = LossGuidance(terms, gate_on="respaced_index", on_terms=guidance.on_terms)
    imgdiff.DDIM(SCHED, guidance=compat).sample(
        model, torch.randn(2, 1, 2, 2), num_steps=10, progress=False
    )
    assert all(names == {"always", "low"} for _, names in reported)


def test_reported_values_are_weighted() -> None:
    values: list[dict[str, Tensor]] = []
    term = LossTerm("sum", lambda v: v.x.sum(), weight=3.0)
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    LossGuidance([term], on_terms=lambda ctx, v: values.append(v)).gradient_from_estimate(
        x, x * 1.0, _ctx(10, 1), 0.0
    )
    assert values[0]["sum"].item() == pytest.approx(12.0)


def test_a_log_probability_term_on_x_t_is_classifier_guidance() -> None:
    """Classifier guidance is loss guidance with L = -s log p(y | x_t) on the x_t view."""
    torch.manual_seed(0)
    W = torch.randn(4, 3 * 4 * 4, dtype=torch.float64)

    def classifier(x: Tensor, t: Tensor) -> Tensor:
        return x.flatten(1) @ W.T * (1 + t[:, None] / 1000)

    labels = torch.tensor([0, 3])
    model = imgdiff.GaussianDenoiser(SCHED)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    scale = 0.5
    by_classifier = imgdiff.DDIM(SCHED, guidance=ClassifierGuidance(classifier, labels, scale))

    def nll(v: GuidanceInputs) -> Tensor:
        log_p = torch.log_softmax(classifier(v.x, v.t), dim=-1)
        return -log_p.gather(1, labels[:, None]).sum()

    by_loss = imgdiff.DDIM(SCHED, guidance=LossGuidance([LossTerm("nll", nll, scale, input="x_t")]))
    a = by_classifier.sample(model, noise, num_steps=8, progress=False)
    b = by_loss.sample(model, noise, num_steps=8, progress=False)
    torch.testing.assert_close(a, b)


class _Counting:
    def __init__(self, channels_factor: int = 1) -> None:
        self.calls = 0
        self.factor = channels_factor

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        out = 0.1 * x
        return out if self.factor == 1 else torch.cat([out, torch.zeros_like(x)], dim=1)


def test_one_model_call_per_step_and_learned_variance() -> None:
    model = _Counting()
    guidance = LossGuidance([LossTerm("l2", lambda v: v.x.pow(2).sum())])
    imgdiff.DDIM(SCHED, guidance=guidance).sample(
        model, torch.randn(2, 1, 4, 4), num_steps=6, progress=False
    )
    assert model.calls == 6
    learned = _Counting(2)
    out = imgdiff.DDPM(SCHED, variance="learned_range", guidance=guidance).sample(
        learned, torch.randn(2, 1, 4, 4), num_steps=6, progress=False
    )
    assert out.shape == (2, 1, 4, 4)
    assert torch.isfinite(out).all()
    assert learned.calls == 6


def test_guided_sampling_leaves_no_graph_and_does_not_touch_inputs() -> None:
    src = torch.randn(2, 1, 4, 4)
    src_copy = src.clone()
    noise = torch.randn(2, 1, 4, 4)
    noise_copy = noise.clone()
    guidance = LossGuidance([LossTerm("mse", lambda v: (v.x - v.source).pow(2).sum())], source=src)
    out = imgdiff.DDIM(SCHED, guidance=guidance).sample(
        imgdiff.GaussianDenoiser(SCHED), noise, num_steps=4, progress=False
    )
    assert not out.requires_grad
    assert out.grad_fn is None
    torch.testing.assert_close(src, src_copy)
    torch.testing.assert_close(noise, noise_copy)


def test_bad_input() -> None:
    with pytest.raises(IVE, match="terms"):
        LossGuidance([])
    with pytest.raises(ITE, match="terms"):
        LossGuidance(LossTerm("a", lambda v: v.x.sum()))  # type: ignore[arg-type]
    with pytest.raises(ITE, match=r"terms\[0\]"):
        LossGuidance([lambda v: v.x.sum()])  # type: ignore[list-item]
    with pytest.raises(IVE, match="used twice"):
        LossGuidance([LossTerm("a", lambda v: v.x.sum()), LossTerm("a", lambda v: v.x.sum())])
    with pytest.raises(IVE, match="input"):
        LossTerm("a", lambda v: v.x.sum(), input="x0")  # type: ignore[arg-type]
    with pytest.raises(IVE, match="max_timestep"):
        LossTerm("a", lambda v: v.x.sum(), max_timestep=-1)
    with pytest.raises(IVE, match="gate_on"):
        LossGuidance([LossTerm("a", lambda v: v.x.sum())], gate_on="index")  # type: ignore[arg-type]
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    vector = LossGuidance([LossTerm("vec", lambda v: v.x.flatten())])
    with pytest.raises(IVE, match="scalar"):
        vector.gradient_from_estimate(x, x * 1.0, _ctx(5, 2), 0.5)
    wrong_source = LossGuidance(
        [LossTerm("a", lambda v: v.x.sum())], source=torch.zeros(3, 1, 2, 2)
    )
    with pytest.raises(IVE, match="source"):
        wrong_source.gradient_from_estimate(x, x * 1.0, _ctx(5, 2), 0.5)
    with pytest.raises(IVE, match="DenoisingSampler"):
        vector.gradient(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))


def test_respaced_index_gate_counts_down_to_zero() -> None:
    """gate_on="respaced_index": the clock is the position in the run counted down to 0, so
    max_timestep=3 opens the gate for exactly the last 3 of 10 steps (ZeCon's code compares so)."""
    reported: list[tuple[int, set[str]]] = []
    terms = [
        LossTerm("always", lambda v: v.x.sum()),
        LossTerm("late", lambda v: v.x.sum(), max_timestep=3),
    ]
    guidance = LossGuidance(
        terms,
        gate_on="respaced_index",
        on_terms=lambda ctx, values: reported.append((ctx.step_index, set(values))),
    )
    imgdiff.DDIM(SCHED, guidance=guidance).sample(
        imgdiff.GaussianDenoiser(SCHED), torch.randn(1, 1, 2, 2), num_steps=10, progress=False
    )
    assert [i for i, _ in reported] == list(range(10))
    for i, names in reported:
        assert names == ({"always", "late"} if i >= 7 else {"always"})
    # the gate reads the clock of the context it is given
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    for step_index, expected in ((6, 1.0), (7, 2.0)):
        g = guidance.gradient_from_estimate(x, x * 1.0, _ctx(999, 1, step_index=step_index), 0.0)
        torch.testing.assert_close(g, torch.full_like(x, -expected))


def _seen_views(sigma: float | Tensor, inputs: tuple[str, ...]) -> dict[str, GuidanceInputs]:
    """The inputs each term of ``inputs`` sees at one step, with a seeded generator."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    src = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    seen: dict[str, GuidanceInputs] = {}
    spy = functools.partial(_spy, seen=seen)

    guidance = LossGuidance(
        [spy(name) for name in inputs], source=src, generator=torch.Generator().manual_seed(7)
    )
    xg = x.clone().requires_grad_(True)
    guidance.gradient_from_estimate(xg, 0.5 * xg, _ctx(300, 2), sigma)
    return seen


def test_a_tensor_sigma_gives_the_views_of_the_float() -> None:
    """``sigma`` may come as a tensor: ``y_t = sqrt(1 - sigma^2) x_src + sigma noise`` and the
    blends are those of the same float."""
    by_float = _seen_views(0.4, ("blend", "x_t"))
    by_tensor = _seen_views(torch.tensor(0.4, dtype=torch.float64), ("blend", "x_t"))
    for name in ("blend", "x_t"):
        torch.testing.assert_close(by_tensor[name].x, by_float[name].x)
        torch.testing.assert_close(by_tensor[name].source, by_float[name].source)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    src = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(by_tensor["x_t"].source, math.sqrt(1 - 0.16) * src + 0.4 * noise)


def test_an_x_t_term_alone_sees_the_noised_source() -> None:
    """A term on ``x_t`` gets the source's ``y_t`` even when no term asks for the blend."""
    seen = _seen_views(0.4, ("x_t",))["x_t"]
    assert seen.source is not None
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    src = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(seen.source, math.sqrt(1 - 0.16) * src + 0.4 * noise)


def test_a_zero_weight_term_is_neither_evaluated_nor_reported() -> None:
    """Weight 0 switches a term off: its loss is not called and ``on_terms`` does not list it."""

    def broken(v: GuidanceInputs) -> Tensor:
        raise AssertionError("a zero-weight term was evaluated")

    assert not LossTerm("off", broken, weight=0.0).active(0)
    reported: list[set[str]] = []
    guidance = LossGuidance(
        [LossTerm("on", lambda v: v.x.sum()), LossTerm("off", broken, weight=0.0)],
        on_terms=lambda ctx, values: reported.append(set(values)),
    )
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    g = guidance.gradient_from_estimate(x, x * 1.0, _ctx(10, 1), 0.0)
    assert reported == [{"on"}]
    torch.testing.assert_close(g, -torch.ones_like(x))


def test_reported_values_are_detached() -> None:
    """``on_terms`` gets detached values: keeping them holds no graph."""
    values: list[dict[str, Tensor]] = []
    guidance = LossGuidance(
        [LossTerm("sq", lambda v: v.x.pow(2).sum(), weight=2.0)],
        on_terms=lambda ctx, v: values.append(v),
    )
    x = torch.full((1, 1, 2, 2), 3.0, requires_grad=True)
    guidance.gradient_from_estimate(x, x * 1.0, _ctx(10, 1), 0.5)
    assert not values[0]["sq"].requires_grad
    assert values[0]["sq"].grad_fn is None
    assert values[0]["sq"].item() == pytest.approx(72.0)
