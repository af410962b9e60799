"""Classifier-free guidance wrapper: the combination, one batched forward, null broadcasting, rescale."""

from __future__ import annotations

import pytest
import torch

import imgdiff
from imgdiff import ClassifierFreeGuidance
from imgdiff.conditioning import rescale_guidance


class Recorder:
    """``out = tanh(x) * (1 + label)``; records the batch of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        label: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.batches.append(x.shape[0])
        out = torch.tanh(x) * (1 + label.reshape(-1, 1, 1, 1)) + t.reshape(-1, 1, 1, 1) * 1e-3
        return out if mask is None else out * mask


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 500, 999])
    return x, t, {"label": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_guidance_is_the_affine_combination(scale: float) -> None:
    """out_u + w (out_c - out_u) with one forward on the doubled batch; w=0/1 give uncond/cond."""
    x, t, cond = _inputs()
    model = Recorder()
    null = {"label": torch.zeros(1, dtype=torch.float64)}
    guided = ClassifierFreeGuidance(model, scale, null)(x, t, **cond)
    assert model.batches == [6]
    out_c = model(x, t, **cond)
    out_u = model(x, t, label=torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(guided, out_u + scale * (out_c - out_u), rtol=1e-12, atol=1e-12)


def test_per_sample_keywords_are_duplicated() -> None:
    """Keywords that null does not name are per-sample and shared by both halves."""
    x, t, cond = _inputs()
    mask = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    null = {"label": torch.zeros(1, dtype=torch.float64)}
    guided = ClassifierFreeGuidance(Recorder(), 2.0, null)(x, t, mask=mask, **cond)
    plain = ClassifierFreeGuidance(Recorder(), 2.0, null)(x, t, **cond)
    torch.testing.assert_close(guided, plain * mask, rtol=1e-12, atol=1e-12)


def test_shared_keywords_and_non_tensors_pass_unchanged() -> None:
    """``shared`` names reach the doubled batch as given; non-tensor values pass through."""
    x, t, cond = _inputs()
    seen: list[object] = []

    def model(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor, **rest: object):
        seen.append(rest)
        return torch.tanh(x) * (1 + label.reshape(-1, 1, 1, 1))

    null = {"label": torch.zeros(1, dtype=torch.float64)}
    table = torch.arange(3.0)  # first dimension equals the batch, yet not per-sample
    ClassifierFreeGuidance(model, 2.0, null, shared={"table"})(
        x, t, table=table, name="run", **cond
    )
    assert seen[0]["table"] is table
    assert seen[0]["name"] == "run"
    ClassifierFreeGuidance(model, 2.0, null)(x, t, table=table, **cond)
    assert seen[1]["table"].shape == (6,)  # type: ignore[attr-defined]


def test_rescale_matches_lin_et_al() -> None:
    """phi = 1 gives the guided output rescaled to the conditional output's std, per sample."""
    g = torch.Generator().manual_seed(1)
    guided, cond = torch.randn(2, 3, 4, 4, generator=g) * 3, torch.randn(2, 3, 4, 4, generator=g)
    out = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)


def test_bad_input() -> None:
    """Missing conditional keys, mismatched shapes and bad options are named."""
    x, t, _ = _inputs()
    null = {"label": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^cond: expected a conditional value for every key of null \['label'\]",
    ):
        ClassifierFreeGuidance(Recorder(), 2.0, null)(x, t)
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^cond\['label'\]: expected shape \(3,\) \(or batch 1\) to match null\['label'\] \(1,\)",
    ):
        ClassifierFreeGuidance(Recorder(), 2.0, null)(
            x, t, label=torch.zeros(2, dtype=torch.float64)
        )
    with pytest.raises(imgdiff.InputValueError, match=r"^rescale: expected a float <= 1\.0"):
        ClassifierFreeGuidance(Recorder(), 2.0, null, rescale=2.0)
    with pytest.raises(imgdiff.InputTypeError, match=r"^null\['label'\]: expected a tensor"):
        ClassifierFreeGuidance(Recorder(), 2.0, {"label": 0.0})  # type: ignore[dict-item]
    with pytest.raises(imgdiff.InputTypeError, match=r"^model: expected a callable"):
        ClassifierFreeGuidance(None, 2.0, null)  # type: ignore[arg-type]


def test_rescale_through_the_wrapper_at_an_intermediate_phi() -> None:
    """rescale=0.7 applies phi g std(c)/std(g) + (1 - phi) g to the guided output."""
    x, t, cond = _inputs()
    null = {"label": torch.zeros(1, dtype=torch.float64)}
    model = Recorder()
    out = ClassifierFreeGuidance(model, 4.0, null, rescale=0.7)(x, t, **cond)
    out_c = model(x, t, **cond)
    out_u = model(x, t, label=torch.zeros(3, dtype=torch.float64))
    g = out_u + 4.0 * (out_c - out_u)
    ratio = out_c.std(dim=(1, 2, 3), keepdim=True) / g.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, 0.7 * g * ratio + 0.3 * g, rtol=1e-12, atol=1e-12)


class KwargModel:
    """Checks what arrives: a float, a nested dict of per-sample tensors, a null of batch B."""

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        label: torch.Tensor,
        gain: float,
        extra: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        assert isinstance(gain, float)
        assert extra["bias"].shape[0] == x.shape[0]
        assert label.dtype == x.dtype
        return (
            torch.tanh(x) * (1 + label.reshape(-1, 1, 1, 1)) + extra["bias"].reshape(-1, 1, 1, 1)
        ) * gain


def test_keyword_handling() -> None:
    """Non-tensors pass through, nested per-sample tensors are doubled, a batch-B null and a
    float32 null with float64 conditions work, a batch-1 condition is broadcast."""
    x, t, cond = _inputs()
    bias = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    null_b = {"label": torch.zeros(3, dtype=torch.float32)}
    out = ClassifierFreeGuidance(KwargModel(), 2.0, null_b)(
        x, t, gain=1.5, extra={"bias": bias}, **cond
    )
    want_c = KwargModel()(x, t, label=cond["label"], gain=1.5, extra={"bias": bias})
    want_u = KwargModel()(
        x, t, label=torch.zeros(3, dtype=torch.float64), gain=1.5, extra={"bias": bias}
    )
    torch.testing.assert_close(out, want_u + 2.0 * (want_c - want_u), rtol=1e-12, atol=1e-12)
    one = ClassifierFreeGuidance(Recorder(), 2.0, {"label": torch.zeros(1, dtype=torch.float64)})
    broadcast = one(x, t, label=torch.full((1,), 2.0, dtype=torch.float64))
    full = one(x, t, label=torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(broadcast, full, rtol=0, atol=0)


@pytest.mark.parametrize("guided_channels", [2, None])
def test_guided_channels_leave_the_variance_half_alone(guided_channels: int | None) -> None:
    """guided_channels=C (and the default, for a 2C output) guides the mean half of a
    learned-variance output and keeps the conditional variance half (spec 8.2)."""
    x, t, cond = _inputs()

    def learned(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        mean = torch.tanh(x) * (1 + label.reshape(-1, 1, 1, 1))
        return torch.cat([mean, mean * 0.1 + label.reshape(-1, 1, 1, 1)], dim=1)

    null = {"label": torch.zeros(1, dtype=torch.float64)}
    out = ClassifierFreeGuidance(learned, 3.0, null, guided_channels=guided_channels)(x, t, **cond)
    c = learned(x, t, **cond)
    u = learned(x, t, label=torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(
        out[:, :2], u[:, :2] + 3.0 * (c[:, :2] - u[:, :2]), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out[:, 2:], c[:, 2:], rtol=0, atol=0)


def test_more_bad_input() -> None:
    """An empty null, a null of the wrong batch, a bad guided_channels are named."""
    x, t, cond = _inputs()
    with pytest.raises(imgdiff.InputValueError, match=r"^null: expected at least one"):
        ClassifierFreeGuidance(Recorder(), 2.0, {})
    with pytest.raises(
        imgdiff.InputValueError, match=r"^null\['label'\]: expected batch 1 or 3, got shape \(2,\)"
    ):
        ClassifierFreeGuidance(Recorder(), 2.0, {"label": torch.zeros(2, dtype=torch.float64)})(
            x, t, **cond
        )
    with pytest.raises(
        imgdiff.InputValueError, match=r"^guided_channels: expected an int >= 1, got 0"
    ):
        ClassifierFreeGuidance(Recorder(), 2.0, {"label": torch.zeros(1)}, guided_channels=0)
    null = {"label": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^guided_channels: expected at most the model output's 2 channels, got 3",
    ):
        ClassifierFreeGuidance(Recorder(), 2.0, null, guided_channels=3)(x, t, **cond)
    with pytest.raises(imgdiff.InputTypeError, match=r"^shared: expected a collection of"):
        ClassifierFreeGuidance(Recorder(), 2.0, null, shared="mask")  # type: ignore[arg-type]
    with pytest.raises(imgdiff.InputTypeError, match=r"^shared: expected keyword names"):
        ClassifierFreeGuidance(Recorder(), 2.0, null, shared={1})  # type: ignore[arg-type]


def test_rescale_guidance_bad_input() -> None:
    """phi outside [0, 1], mismatched shapes and one element per sample are named."""
    g = torch.randn(2, 3, 4, 4)
    with pytest.raises(imgdiff.InputValueError, match=r"^phi: expected a float <= 1"):
        rescale_guidance(g, g, 5.0)
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^cond: expected shape \(2, 3, 4, 4\) \(the shape of guided\), got \(1, 3, 4, 4\)",
    ):
        rescale_guidance(g, g[:1], 0.5)
    with pytest.raises(imgdiff.InputValueError, match=r"^guided: expected shape \(B, ...\) with"):
        rescale_guidance(torch.randn(2, 1), torch.randn(2, 1), 0.5)


def test_default_guidance_keeps_learned_range_ddpm_on_the_data() -> None:
    """A learned-range DDPM under CFG with the default channels samples the data's spread.

    The model is the exact denoiser of N(0, 0.5^2) plus a variance channel that differs between
    the conditional (0.5) and unconditional (-0.5) halves; guiding that channel too would
    extrapolate it to 7 at scale 7.5 and the samples' std to ~39.
    """
    schedule = imgdiff.NoiseSchedule.linear()
    exact = imgdiff.GaussianDenoiser(schedule, mean=0.0, std=0.5)

    def net(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        v = torch.where(label.reshape(-1, 1, 1, 1) > 0, 0.5, -0.5).expand_as(x).to(x.dtype)
        return torch.cat([exact(x, t), v], dim=1)

    guided = ClassifierFreeGuidance(net, 7.5, {"label": torch.zeros(1)})
    x = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = imgdiff.DDPM(schedule, variance="learned_range").sample(
        guided,
        x,
        num_steps=50,
        generator=torch.Generator().manual_seed(1),
        progress=False,
        model_kwargs={"label": torch.ones(2000)},
    )
    assert abs(float(y.std()) - 0.5) < 0.05


def test_rescale_uses_unbiased_standard_deviations_of_both() -> None:
    """phi = 1: the result's per-sample (unbiased) std equals cond's, and rescaling is invariant to
    a common positive scale of guided; a guided output already matching cond's std is unchanged."""
    g = torch.Generator().manual_seed(3)
    guided = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) * 4 + 1
    cond = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    out = rescale_guidance(guided, cond, 1.0)
    # the unbiased std of out (correction=1) equals that of cond; so does the biased one
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        out.std(dim=(1, 2, 3), correction=0),
        cond.std(dim=(1, 2, 3), correction=0),
        rtol=1e-12,
        atol=0,
    )
    torch.testing.assert_close(
        rescale_guidance(guided * 7.0, cond, 1.0), out, rtol=1e-12, atol=1e-12
    )
    same = cond * -1.0  # same std as cond
    torch.testing.assert_close(rescale_guidance(same, cond, 0.4), same, rtol=1e-12, atol=1e-12)
    # phi interpolates linearly between guided (phi = 0) and the fully rescaled output
    torch.testing.assert_close(
        rescale_guidance(guided, cond, 0.25), 0.25 * out + 0.75 * guided, rtol=1e-12, atol=1e-12
    )


def test_null_half_comes_first_in_the_doubled_batch() -> None:
    """Spec 8.2: one forward on cat([null, cond]) split with chunk(2) in that order, so the first
    half of the batch the model sees carries the null condition."""
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        seen.append(label.clone())
        return x * label.reshape(-1, 1, 1, 1)

    x, t, cond = _inputs()
    null = {"label": torch.full((1,), -1.0, dtype=torch.float64)}
    out = ClassifierFreeGuidance(model, 3.0, null)(x, t, **cond)
    assert torch.equal(seen[0][:3], torch.full((3,), -1.0, dtype=torch.float64))
    assert torch.equal(seen[0][3:], cond["label"])
    want = -x + 3.0 * (x * cond["label"].reshape(-1, 1, 1, 1) + x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_batch_one_per_sample_keywords_reach_the_model_with_the_doubled_batch() -> None:
    """A per-sample keyword of batch 1 (shared by the samples) is broadcast to the doubled batch
    2B, like one of batch B: both give the same guided output."""
    x, t, cond = _inputs()
    shapes: list[tuple[int, ...]] = []

    def model(
        x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        shapes.append(tuple(mask.shape))
        return Recorder()(x, t, label=label, mask=mask)

    null = {"label": torch.zeros(1, dtype=torch.float64)}
    guided = ClassifierFreeGuidance(model, 2.0, null)
    mask = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = guided(x, t, mask=mask, **cond)
    full = guided(x, t, mask=mask.expand(3, 1, 4, 4).clone(), **cond)
    assert shapes == [(6, 1, 4, 4), (6, 1, 4, 4)]
    torch.testing.assert_close(one, full, rtol=0, atol=0)
