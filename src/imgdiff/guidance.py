"""Gradient guidance: steer sampling with ``g = grad_x log p(y | x_t)`` (Dhariwal & Nichol 2021).

A :class:`Guidance` turns the current sample into a gradient; a :class:`~imgdiff.DenoisingSampler`
with ``guidance=`` applies it the way its family does (spec 3.2, 8.3):

* DDPM shifts the posterior mean: ``mu <- mu + Sigma g`` (``condition_mean``);
* DDIM and other eps-based samplers shift the noise estimate: ``eps <- eps - sqrt(1 - ab_t) g``
  (``condition_score``), and recompute ``x0_hat`` from it.

:class:`ClassifierGuidance` is the noisy-classifier case; losses on ``x0_hat`` (CLIP, perceptual)
are other guidances built the same way: a :class:`ModelGuidance` differentiates through the
model's clean estimate, and :class:`~imgdiff.LossGuidance` turns weighted losses into one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from imgdiff._checks import check_float, check_tensor, describe, is_integer_dtype
from imgdiff.errors import InputTypeError, InputValueError

if TYPE_CHECKING:
    from imgdiff._ops import Scalar
    from imgdiff.samplers.step import StepContext

__all__ = ["ClassifierGuidance", "Guidance", "ModelGuidance"]


class Guidance(ABC):
    """Produces the guidance gradient for a batch of samples at a step."""

    @abstractmethod
    def gradient(self, x: Tensor, t: Tensor) -> Tensor:
        """``g = scale * grad_x log p(y | x)`` at the sample ``x`` ``(B, ...)`` and timesteps ``t`` ``(B,)``.

        Returns a tensor of ``x``'s shape and dtype; must not modify ``x``. Called with autograd
        off: enable it locally (``torch.enable_grad()``) to differentiate.
        """


@dataclass(frozen=True, eq=False)
class ClassifierGuidance(Guidance):
    """``g = scale * grad_x sum_b log softmax(classifier(x, t))[b, y_b]`` (a noise-aware classifier).

    Args:
        classifier: ``classifier(x, t) -> logits (B, K)``; gets the same timesteps as the model.
        labels: ``(B,)`` integer target classes in ``[0, K)`` (their range is read once, here).
        scale: guidance scale ``s`` (guided-diffusion's README uses 0.5 to 10).
    """

    classifier: Callable[[Tensor, Tensor], Tensor]
    labels: Tensor
    scale: float = 1.0
    _max_label: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.classifier):
            raise InputTypeError(
                f"classifier: expected a callable, got {describe(self.classifier)}"
            )
        check_tensor("labels", self.labels, ndim=1)
        if not is_integer_dtype(self.labels.dtype):
            raise InputTypeError(
                f"labels: expected integer class labels, got dtype {self.labels.dtype}"
            )
        low, high = (int(v) for v in self.labels.aminmax()) if self.labels.numel() else (0, -1)
        if low < 0:
            raise InputValueError(f"labels: expected class indices >= 0, got {low}")
        object.__setattr__(self, "_max_label", high)  # checked against K in gradient()
        check_float("scale", self.scale)

    def gradient(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] != self.labels.shape[0]:
            raise InputValueError(
                f"labels: expected one label per sample ({x.shape[0]}), got {self.labels.shape[0]}"
            )
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t)
            if not isinstance(logits, Tensor) or logits.shape[0] != x.shape[0] or logits.ndim != 2:
                raise InputValueError(
                    f"classifier output: expected logits (B, K), got {describe(logits)}"
                )
            if logits.shape[1] <= self._max_label:
                raise InputValueError(
                    f"labels: expected classes below the classifier's {logits.shape[1]} logits, "
                    f"got label {self._max_label}"
                )
            if not logits.requires_grad:
                raise InputValueError(
                    "classifier output: expected logits that depend on x through autograd, got "
                    "a tensor without a gradient (does the classifier run under torch.no_grad, "
                    "inference_mode or detach its input?)"
                )
            wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            log_p = torch.log_softmax(wide, dim=-1)
            picked = log_p.gather(1, self.labels.to(log_p.device).long()[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xg)
        return (grad * self.scale).to(x.dtype)


class ModelGuidance(Guidance):
    """Guidance from the model's clean estimate ``x0_hat(x_t)``, differentiated through the model.

    A :class:`~imgdiff.DenoisingSampler` with such a guidance calls the model once per step with
    autograd on, passes the sample and its ``x0_hat`` (a differentiable function of it, before
    thresholding) to :meth:`gradient_from_estimate`, and steps with the detached output.
    """

    def gradient(self, x: Tensor, t: Tensor) -> Tensor:
        raise InputValueError(
            f"{type(self).__name__} differentiates through the model: pass it as guidance= to a "
            "DenoisingSampler (DDPM, DDIM), which calls gradient_from_estimate"
        )

    @abstractmethod
    def gradient_from_estimate(
        self, x: Tensor, x0_hat: Tensor, ctx: StepContext, sigma: Scalar
    ) -> Tensor:
        """``g = -grad_x L`` at the step's sample.

        Args:
            x: ``(B, C, ...)`` the sample ``x_t``, a leaf that requires grad.
            x0_hat: ``(B, C, ...)`` the model's clean estimate, a function of ``x`` in the graph.
            ctx: the step (``ctx.timestep``, ``ctx.t`` are training timesteps).
            sigma: ``sqrt(1 - alpha_bar_t)`` of the step's input (a float, or ``(B, 1, ...)``).

        Called with autograd on; returns a tensor of ``x``'s shape (detached).
        """
