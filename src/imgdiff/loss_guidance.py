"""Loss guidance: steer sampling with weighted differentiable losses on the clean estimate.

At each step (ZeCon's ``cond_fn``, Yang et al. 2023; blended diffusion, Avrahami et al. 2022;
spec 7.7) the model's ``x0_hat`` is computed inside autograd, each active loss term is evaluated
on its input view, and the guidance is ``g = -grad_{x_t} sum_k w_k L_k``. A DDPM sampler shifts
the posterior mean by ``Sigma g``, a DDIM sampler the noise estimate by ``-sqrt(1 - ab_t) g``
(:class:`~imgdiff.DenoisingSampler.guided_update`), as for classifier guidance, which is the
same mechanism with ``L = -log p(y | x_t)``.

The views a term can ask for (``input``), with ``sigma = sqrt(1 - alpha_bar_t)``:

* ``"blend"``: ``x_in = sigma x0_hat + (1 - sigma) x_t`` (mostly ``x0_hat`` at high noise, mostly
  ``x_t`` at low noise), and for the source ``y_in = sigma x_src + (1 - sigma) y_t`` with
  ``y_t = q_sample(x_src, t)`` on fresh noise each step (ZeCon);
* ``"x0_hat"``: ``x0_hat`` and ``x_src``;
* ``"x_t"``: ``x_t`` and ``y_t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from imgdiff._checks import (
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_tensor,
    describe,
)
from imgdiff._ops import Scalar
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.guidance import ModelGuidance
from imgdiff.samplers.step import StepContext

__all__ = ["GateOn", "GuidanceInputs", "LossGuidance", "LossInput", "LossTerm"]

LossInput = Literal["blend", "x0_hat", "x_t"]
GateOn = Literal["timestep", "respaced_index"]
_INPUTS: tuple[LossInput, ...] = ("blend", "x0_hat", "x_t")
_GATES: tuple[GateOn, ...] = ("timestep", "respaced_index")


class GuidanceInputs(NamedTuple):
    """What a :class:`LossTerm`'s loss sees at a step.

    Attributes:
        x: ``(B, C, ...)`` the term's view of the sample (see ``LossTerm.input``),
            differentiable in ``x_t``.
        source: ``(B, C, ...)`` the matching view of the source image, or ``None`` without one.
        x0_hat: ``(B, C, ...)`` the model's clean estimate (differentiable).
        t: ``(B,)`` int64 training timesteps.
        timestep: the step's training timestep (a Python int).
    """

    x: Tensor
    source: Tensor | None
    x0_hat: Tensor
    t: Tensor
    timestep: int


@dataclass(frozen=True, eq=False)
class LossTerm:
    """One weighted loss of a :class:`LossGuidance`.

    Args:
        name: a label (the key of the values reported to ``on_terms``).
        loss: ``loss(inputs: GuidanceInputs) -> scalar`` tensor, differentiable in ``inputs.x``.
        weight: ``lambda_k`` (ZeCon's defaults are in :class:`~imgdiff.ZeConConfig`).
        input: the view of the sample: ``"blend"`` (ZeCon), ``"x0_hat"`` or ``"x_t"``.
        max_timestep: the term is active only at training timesteps ``t < max_timestep``
            (ZeCon: MSE below 700, VGG below 800); ``None``: always.
    """

    name: str
    loss: Callable[[GuidanceInputs], Tensor]
    weight: float = 1.0
    input: LossInput = "blend"
    max_timestep: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputValueError(f"name: expected a non-empty string, got {describe(self.name)}")
        if not callable(self.loss):
            raise InputTypeError(f"loss: expected a callable, got {describe(self.loss)}")
        check_float("weight", self.weight)
        check_choice("input", self.input, _INPUTS)
        if self.max_timestep is not None:
            check_int("max_timestep", self.max_timestep, min=0)

    def active(self, timestep: int) -> bool:
        """Whether the term applies at ``timestep`` (a training timestep or respaced index)."""
        return self.weight != 0.0 and (self.max_timestep is None or timestep < self.max_timestep)


TermCallback = Callable[[StepContext, dict[str, Tensor]], None]


@dataclass(frozen=True, eq=False)
class LossGuidance(ModelGuidance):
    """Guidance by ``g = -grad_{x_t} sum_k w_k L_k(view_k)`` (spec 7.7).

    Args:
        terms: the weighted losses (:class:`LossTerm`).
        source: ``(B, C, ...)`` the source image for losses that compare with it (content,
            directional CLIP), or ``None``. Its views follow the term's ``input``. It is copied to
            the sample's device and dtype on first use and reused (do not modify it in place
            while sampling).
        gate_on: what ``max_timestep`` is compared with: the training ``"timestep"`` (what
            ZeCon's thresholds mean), or ``"respaced_index"``, the position in a run counted
            down to 0, as ZeCon's code compares (so with 700 steps or fewer its gates stay open).
        generator: draws the fresh noise of the source's ``y_t`` (``None``: the global generator
            of the sample's device); a generator on another device than the sample costs a copy.
        on_terms: called each step with the step and the weighted value of every active term
            (detached tensors; reading them is a host synchronisation, left to the callback).

    Pass it as ``guidance=`` to :class:`~imgdiff.DDPM` or :class:`~imgdiff.DDIM`.
    """

    terms: Sequence[LossTerm]
    source: Tensor | None = None
    gate_on: GateOn = "timestep"
    generator: torch.Generator | None = None
    on_terms: TermCallback | None = None
    _placed: dict[tuple[torch.device, torch.dtype], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.terms, LossTerm) or not isinstance(self.terms, Sequence):
            raise InputTypeError(
                f"terms: expected a sequence of LossTerm, got {describe(self.terms)}"
            )
        if len(self.terms) == 0:
            raise InputValueError("terms: expected at least one LossTerm, got none")
        names: set[str] = set()
        for i, term in enumerate(self.terms):
            if not isinstance(term, LossTerm):
                raise InputTypeError(f"terms[{i}]: expected a LossTerm, got {describe(term)}")
            if term.name in names:
                raise InputValueError(f"terms[{i}]: the name {term.name!r} is used twice")
            names.add(term.name)
        object.__setattr__(self, "terms", tuple(self.terms))
        if self.source is not None:
            check_tensor("source", self.source, min_ndim=2, floating=True)
        check_choice("gate_on", self.gate_on, _GATES)
        check_generator(self.generator)
        if self.on_terms is not None and not callable(self.on_terms):
            raise InputTypeError(f"on_terms: expected a callable, got {describe(self.on_terms)}")

    def gradient_from_estimate(
        self, x: Tensor, x0_hat: Tensor, ctx: StepContext, sigma: Scalar
    ) -> Tensor:
        clock = ctx.timestep if self.gate_on == "timestep" else ctx.num_steps - 1 - ctx.step_index
        active = [term for term in self.terms if term.active(clock)]
        if not active:
            return torch.zeros_like(x)
        views = self._views(x, x0_hat, ctx, sigma, {term.input for term in active})
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for term in active:
            view, source = views[term.input]
            value = term.loss(GuidanceInputs(view, source, x0_hat, ctx.t, ctx.timestep))
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InputValueError(
                    f"terms[{term.name!r}]: expected the loss to return a scalar tensor, got "
                    f"{describe(value)}"
                )
            weighted = term.weight * value.reshape(())
            values[term.name] = weighted.detach()
            total = weighted if total is None else total + weighted
        if self.on_terms is not None:
            self.on_terms(ctx, values)
        if total is None or not total.requires_grad:
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(total, x, allow_unused=True, materialize_grads=True)
        return -grad

    def _views(
        self, x: Tensor, x0_hat: Tensor, ctx: StepContext, sigma: Scalar, wanted: set[LossInput]
    ) -> dict[LossInput, tuple[Tensor, Tensor | None]]:
        src = None
        if self.source is not None:
            if self.source.shape != x.shape:
                raise InputValueError(
                    f"source: expected the sample's shape {tuple(x.shape)}, got "
                    f"{tuple(self.source.shape)}"
                )
            key = (x.device, x.dtype)
            src = self._placed.get(key)
            if src is None:  # copied once per placement, not once per step
                src = self._placed[key] = self.source.to(device=x.device, dtype=x.dtype)
        y_t = None
        if src is not None and wanted & {"blend", "x_t"}:
            if self.generator is None:
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
            else:
                noise = torch.randn(
                    x.shape, generator=self.generator, device=self.generator.device, dtype=x.dtype
                ).to(x.device)
            alpha = (
                math.sqrt(max(0.0, 1.0 - sigma * sigma))
                if isinstance(sigma, float)
                else torch.sqrt((1.0 - sigma * sigma).clamp_min(0.0))
            )
            y_t = alpha * src + sigma * noise
        views: dict[LossInput, tuple[Tensor, Tensor | None]] = {}
        if "blend" in wanted:
            x_in = sigma * x0_hat + (1.0 - sigma) * x
            y_in = None if src is None or y_t is None else sigma * src + (1.0 - sigma) * y_t
            views["blend"] = (x_in, y_in)
        if "x0_hat" in wanted:
            views["x0_hat"] = (x0_hat, src)
        if "x_t" in wanted:
            views["x_t"] = (x, y_t)
        return views
