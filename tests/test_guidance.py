"""Classifier guidance (COND-4): DDPM shifts the mean by Sigma g, DDIM shifts eps by -sqrt(1-ab) g."""

from __future__ import annotations

import pytest
import torch

import imgdiff
from imgdiff import DDIM, DDPM, NoiseSchedule
from imgdiff.guidance import ClassifierGuidance, Guidance


class GaussianLikelihood(Guidance):
    """log p(y | x) = -|x - c|^2 / 2, so g = scale (c - x): an analytic gradient."""

    def __init__(self, c: float, scale: float = 1.0) -> None:
        self.c, self.scale = c, scale

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((-(xg - self.c).square() / 2).sum(), xg)
        return self.scale * g


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_cond4_ddpm_shifts_the_posterior_mean(variance: str) -> None:
    """DDPM with guidance: mean + Sigma (c - x) exactly, against the unguided step."""
    s = NoiseSchedule.linear()
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    out = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    t, prev = torch.tensor([500, 20]), torch.tensor([499, 19])
    plain = DDPM(s, variance=variance).step_at(out, x, t, prev, noise=torch.zeros_like(x)).state  # type: ignore[arg-type]
    sampler = DDPM(s, variance=variance, guidance=GaussianLikelihood(0.7))  # type: ignore[arg-type]
    coeffs = sampler.coefficients(
        imgdiff.SamplingPlan(t, prev, s.alphas_cumprod[t], s.alphas_cumprod[prev])
    ).per_sample(4, torch.float64)
    guided = sampler.guided_update(
        x, out, coeffs, torch.zeros_like(x), GaussianLikelihood(0.7).gradient(x, t)
    ).state
    sigma2 = (s.posterior_variance if variance == "fixed_small" else s.betas)[t].reshape(
        -1, 1, 1, 1
    )
    torch.testing.assert_close(guided, plain + sigma2 * (0.7 - x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_cond4_ddim_shifts_eps(prediction: str) -> None:
    """DDIM with guidance equals DDIM on eps - sqrt(1 - ab_t) g, for every prediction type."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    t, prev = torch.tensor([600, 300]), torch.tensor([580, 280])
    ab = s.alphas_cumprod[t]
    guide = GaussianLikelihood(-0.3, scale=2.0)
    grad = guide.gradient(x, t)
    shifted_eps = eps - (1 - ab).sqrt().reshape(-1, 1, 1, 1) * grad
    out = imgdiff.convert_prediction(eps, x, ab, source="epsilon", target=prediction)  # type: ignore[arg-type]
    shifted_out = imgdiff.convert_prediction(
        shifted_eps, x, ab, source="epsilon", target=prediction
    )  # type: ignore[arg-type]
    plain = DDIM(s, prediction=prediction).step_at(shifted_out, x, t, prev).state  # type: ignore[arg-type]
    sampler = DDIM(s, prediction=prediction, guidance=guide)  # type: ignore[arg-type]
    coeffs = sampler.coefficients(
        imgdiff.SamplingPlan(t, prev, ab, s.alphas_cumprod[prev])
    ).per_sample(4, torch.float64)
    guided = sampler.guided_update(x, out, coeffs, None, grad).state
    torch.testing.assert_close(guided, plain, rtol=1e-10, atol=1e-10)


def test_guidance_moves_samples_toward_the_likelihood() -> None:
    """Whole runs: guided samples end nearer c than unguided ones (DDPM and DDIM)."""
    s = NoiseSchedule.linear()
    model = imgdiff.GaussianDenoiser(s, mean=0.0, std=0.5)
    noise = torch.randn(
        64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    for make in (lambda gd: DDIM(s, guidance=gd), lambda gd: DDPM(s, guidance=gd)):
        plain = make(None).sample(
            model, noise, num_steps=50, generator=torch.Generator().manual_seed(1), progress=False
        )
        guided = make(GaussianLikelihood(1.0, scale=0.5)).sample(
            model, noise, num_steps=50, generator=torch.Generator().manual_seed(1), progress=False
        )
        assert float((guided - 1.0).abs().mean()) < float((plain - 1.0).abs().mean()) - 0.1


def test_classifier_guidance_gradient() -> None:
    """The classifier's log-softmax gradient for a linear classifier has the closed form."""
    W = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ W.T

    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    g = ClassifierGuidance(classifier, labels, scale=1.5).gradient(x, torch.tensor([10, 10]))
    p = torch.softmax(classifier(x, torch.tensor([10, 10])), dim=-1)
    want = (W[labels] - p @ W).reshape(x.shape) * 1.5
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(
        imgdiff.InputValueError, match=r"^labels: expected one label per sample \(2\), got 3"
    ):
        ClassifierGuidance(classifier, torch.tensor([0, 1, 2])).gradient(x, torch.tensor([1, 1]))
    t = torch.tensor([1, 1])
    with pytest.raises(
        imgdiff.InputValueError, match=r"^labels: expected classes below the classifier's 3 logits"
    ):
        ClassifierGuidance(classifier, torch.tensor([7, 0])).gradient(x, t)
    with pytest.raises(imgdiff.InputValueError, match=r"^labels: expected class indices >= 0"):
        ClassifierGuidance(classifier, torch.tensor([-1, 0]))
    with pytest.raises(imgdiff.InputTypeError, match=r"^labels: expected integer class labels"):
        ClassifierGuidance(classifier, torch.tensor([True, False]))

    def frozen(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier(x, t)

    with pytest.raises(imgdiff.InputValueError, match=r"^classifier output: expected logits that"):
        ClassifierGuidance(frozen, labels).gradient(x, t)
    with pytest.raises(
        imgdiff.InputTypeError, match=r"^guidance: expected None or an imgdiff.Guidance"
    ):
        DDIM(NoiseSchedule.linear(), guidance=lambda x, t: x)  # type: ignore[arg-type]


def test_cond4_ddpm_learned_variance_shifts_by_its_own_variance() -> None:
    """With a learned variance, the mean moves by exp(log_var) g, element by element."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    out = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    t, prev = torch.tensor([700, 40]), torch.tensor([690, 30])
    guide = GaussianLikelihood(0.4, scale=3.0)
    sampler = DDPM(s, variance="learned_range", guidance=guide)
    coeffs = sampler.coefficients(
        imgdiff.SamplingPlan(t, prev, s.alphas_cumprod[t], s.alphas_cumprod[prev])
    ).per_sample(4, torch.float64)
    mean, log_var, _ = sampler.posterior(x, out, coeffs)
    assert isinstance(log_var, torch.Tensor)
    assert log_var.shape == x.shape
    grad = guide.gradient(x, t)
    guided = sampler.guided_update(x, out, coeffs, None, grad).state
    torch.testing.assert_close(guided, mean + log_var.exp() * grad, rtol=1e-12, atol=1e-12)
    # DDIM with a learned-variance model shifts only the mean channels.
    ddim = DDIM(s, guidance=guide)
    plain = DDIM(s).step_at(
        out[:, :1] - (1 - s.alphas_cumprod[t]).sqrt().reshape(-1, 1, 1, 1) * grad, x, t, prev
    )
    dcoeffs = ddim.coefficients(
        imgdiff.SamplingPlan(t, prev, s.alphas_cumprod[t], s.alphas_cumprod[prev])
    ).per_sample(4, torch.float64)
    torch.testing.assert_close(
        ddim.guided_update(x, out[:, :1], dcoeffs, None, grad).state, plain.state
    )


class WrongShape(Guidance):
    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1)


class RecordDtype(Guidance):
    def __init__(self) -> None:
        self.seen: list[torch.dtype] = []

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return torch.zeros_like(x)


def test_guidance_bad_gradients_and_zero_snr_are_refused() -> None:
    """A gradient of the wrong shape, and v-prediction at zero terminal SNR, raise clearly."""
    s = NoiseSchedule.linear()
    model = imgdiff.GaussianDenoiser(s, mean=0.0, std=0.5)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^guidance: expected a gradient of the sample's shape \(2, 1, 2, 2\)",
    ):
        DDIM(s, guidance=WrongShape()).sample(model, x, num_steps=3, progress=False)
    zsnr = s.rescale_zero_terminal_snr()
    v_model = imgdiff.GaussianDenoiser(zsnr, mean=0.0, std=0.5, prediction="v")
    with pytest.raises(
        imgdiff.InputValueError,
        match=r"^guidance: the model output carries no noise estimate at timestep 999",
    ):
        DDIM(zsnr, prediction="v", spacing="trailing", guidance=GaussianLikelihood(0.0)).sample(
            v_model, x, num_steps=3, progress=False
        )


def test_guidance_sees_the_model_dtype() -> None:
    """The guidance gets x in the model's dtype (a float32 classifier beside a float64 state)."""
    s = NoiseSchedule.linear()
    record = RecordDtype()
    x = torch.randn(2, 1, 2, 2)
    DDIM(s, dtype=torch.float64, guidance=record).sample(
        imgdiff.GaussianDenoiser(s, mean=0.0, std=0.5), x, num_steps=2, progress=False
    )
    assert record.seen == [torch.float32, torch.float32]


def test_ddpm_guidance_runs_at_zero_terminal_snr() -> None:
    """DDPM shifts the posterior mean (no eps_hat needed), so a v-model at zero terminal SNR is
    guided from t = T-1, as the spec recommends sampling it; DDIM still refuses it above."""
    zsnr = NoiseSchedule.linear().rescale_zero_terminal_snr()
    v_model = imgdiff.GaussianDenoiser(zsnr, mean=0.0, std=0.5, prediction="v")
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)

    def run(guidance: imgdiff.guidance.Guidance | None) -> torch.Tensor:
        sampler = imgdiff.DDPM(zsnr, prediction="v", spacing="trailing", guidance=guidance)
        g = torch.Generator().manual_seed(0)
        return sampler.sample(v_model, x, num_steps=10, generator=g, progress=False)

    plain, guided = run(None), run(GaussianLikelihood(1.0, scale=0.5))
    assert bool(guided.isfinite().all())
    assert float(guided.mean()) > float(plain.mean())  # pulled towards the measurement 1.0


def test_classifier_guidance_is_linear_in_its_scale() -> None:
    """g(scale) = scale * g(1) for every sign of the scale (a negative scale pushes away from the
    class), and g(1) is a log-softmax gradient: its mean over y ~ p(y | x) is zero."""
    W = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.reshape(x.shape[0], -1)) @ W.T

    x = torch.randn(3, 1, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    labels = torch.tensor([0, 3, 1])
    one = ClassifierGuidance(classifier, labels).gradient(x, t)
    for scale in (-2.0, -0.5, 0.0, 3.0):
        got = ClassifierGuidance(classifier, labels, scale=scale).gradient(x, t)
        torch.testing.assert_close(got, scale * one, rtol=1e-12, atol=1e-12)
    # E_y[grad log p(y | x)] = sum_y grad p(y | x) = grad 1 = 0 (a log-softmax, not a softmax)
    p = torch.softmax(classifier(x, t), dim=-1)
    total = sum(
        p[:, k].reshape(-1, 1, 1, 1)
        * ClassifierGuidance(classifier, torch.full((3,), k)).gradient(x, t)
        for k in range(4)
    )
    torch.testing.assert_close(total, torch.zeros_like(x), rtol=0, atol=1e-12)
