"""Inference timesteps (spacing), guided-diffusion respacing, and sampling plans.

A *sampling plan* is the list of transitions a sampler makes: for step ``k`` the model is called
at training timestep ``timesteps[k]`` and the state moves from noise level ``alpha_bar[k]`` to
``alpha_bar_next[k]``. The "previous timestep" of a step is always the next entry of the list,
never ``t - T // N`` (which is wrong for ``linspace`` spacing and for ``trailing`` spacing when
``N`` does not divide ``T``; algorithms spec 1.4).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from imgdiff._checks import check_choice, check_float, check_int, describe, is_integer_dtype
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.schedules import NoiseSchedule, check_schedule

__all__ = [
    "FINAL_ALPHA_BARS",
    "SPACINGS",
    "FinalAlphaBar",
    "SamplingPlan",
    "Spacing",
    "inference_timesteps",
    "respace_timesteps",
    "respaced_betas",
    "truncate_for_strength",
    "validate_timesteps",
]

Spacing = Literal["leading", "trailing", "linspace"]
"""How ``N`` inference timesteps are picked from ``T`` training timesteps (Lin et al. 2023, Table 2).

* ``"leading"``: ``k * (T // N)`` for k = 0..N-1, descending, plus the offset (diffusers' default;
  never reaches ``T-1``). T=1000, N=10: 900, 800, ..., 0.
* ``"trailing"``: ``round(T - k T/N) - 1``: 999, 899, ..., 99. Starts at ``T-1`` (needed for
  zero terminal SNR).
* ``"linspace"``: ``round(linspace(0, T-1, N))`` descending: 999, 888, ..., 111, 0.
"""
SPACINGS: tuple[Spacing, ...] = get_args(Spacing)

FinalAlphaBar = Literal["one", "first"]
"""The noise level after the last step of a deterministic sampler (DDIM, EDICT).

``"one"``: ``alpha_bar_{-1} = 1``, the clean level (diffusers ``set_alpha_to_one=True``).
``"first"``: ``alpha_bar_{-1} = alpha_bar_0`` (``set_alpha_to_one=False``, Stable Diffusion).
"""
FINAL_ALPHA_BARS: tuple[FinalAlphaBar, ...] = get_args(FinalAlphaBar)


def _timestep_ints(timesteps: object, num_train_timesteps: int) -> list[int]:
    """A non-empty sequence of ints or a 1-d integer tensor, in ``[0, T-1]``, as a list of ints."""
    if isinstance(timesteps, Tensor):
        if not is_integer_dtype(timesteps.dtype):
            raise InputTypeError(
                f"timesteps: expected a 1-d integer tensor, got {describe(timesteps)}"
            )
        if timesteps.ndim != 1:
            raise InputValueError(
                f"timesteps: expected a 1-d integer tensor, got {describe(timesteps)}"
            )
        values: list[object] = list(timesteps.tolist())
    elif isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise InputTypeError(f"timesteps: expected a sequence of ints, got {describe(timesteps)}")
    else:
        values = list(timesteps)
    if not values:
        raise InputValueError("timesteps: expected at least one timestep, got an empty sequence")
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputTypeError(f"timesteps: expected ints, got {describe(v)}")
        out.append(int(v))
    T = num_train_timesteps
    if min(out) < 0 or max(out) > T - 1:
        raise InputValueError(
            f"timesteps: expected values in [0, {T - 1}] (T = {T} training timesteps), "
            f"got values from {min(out)} to {max(out)}"
        )
    return out


def validate_timesteps(timesteps: object, num_train_timesteps: int) -> tuple[int, ...]:
    """Check an explicit timestep list: non-empty, integers, strictly descending, in ``[0, T-1]``.

    Accepts a sequence of ints or a 1-d integer tensor; returns a tuple of ints.
    """
    out = _timestep_ints(timesteps, num_train_timesteps)
    for a, b in itertools.pairwise(out):
        if not b < a:
            raise InputValueError(
                "timesteps: expected a strictly descending list without duplicates "
                f"(noisiest first), got {a} followed by {b}"
            )
    return tuple(out)


def inference_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: Spacing = "leading",
    offset: int = 0,
    *,
    offset_name: str = "offset",
) -> tuple[int, ...]:
    """``num_steps`` descending training timesteps picked with ``spacing``, each shifted by ``offset``.

    Identical to diffusers' ``set_timesteps`` for ``leading`` with ``steps_offset = offset``, and
    for ``trailing`` / ``linspace`` with ``offset = 0`` (diffusers ignores ``steps_offset`` for
    those; imgdiff applies it to every spacing). Raises if a shifted timestep leaves
    ``[0, T-1]``; ``offset_name`` is the name the error gives the offset (a sampler's
    ``steps_offset``).
    """
    T = check_int("num_train_timesteps", num_train_timesteps, min=1)
    N = check_int("num_steps", num_steps, min=1, max=T)
    spacing = check_choice("spacing", spacing, SPACINGS)
    offset = check_int(offset_name, offset)
    if spacing == "leading":
        ts = np.arange(N, dtype=np.int64)[::-1] * (T // N)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64)[:N] - 1
    else:
        ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    ts = ts + offset
    if ts.min() < 0 or ts.max() > T - 1:
        hint = (
            "; diffusers applies steps_offset to 'leading' spacing only, so a diffusers config "
            f"with {spacing!r} spacing and steps_offset={offset} means steps_offset=0 here"
            if spacing != "leading" and offset != 0
            else ""
        )
        raise InputValueError(
            f"{offset_name}: expected a shift that keeps every timestep in [0, {T - 1}], got "
            f"{offset} ({spacing} spacing with {N} steps gives {int(ts.min())}..{int(ts.max())})"
            + hint
        )
    return tuple(int(v) for v in ts)  # distinct and descending by construction (tested)


def respace_timesteps(
    num_train_timesteps: int, section_counts: str | Sequence[int]
) -> tuple[int, ...]:
    """guided-diffusion's ``space_timesteps`` (Nichol & Dhariwal 2021), as a descending tuple.

    ``section_counts`` is ``"ddimN"`` (the integer stride ``s`` with ``len(range(0, T, s)) == N``),
    a comma-separated string such as ``"10,15,20"``, or a sequence of ints: ``[0, T)`` is cut into
    that many equal sections and each section gets its count of timesteps with a fractional
    stride (so every section includes its first and last timestep). Use the result as the
    explicit ``timesteps`` of any sampler; the model always receives original timesteps.
    """
    T = check_int("num_train_timesteps", num_train_timesteps, min=1)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim") :])
            except ValueError:
                raise InputValueError(
                    f"section_counts: expected 'ddimN' with an integer N, got {section_counts!r}"
                ) from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == desired:
                    return tuple(sorted(range(0, T, stride), reverse=True))
            raise InputValueError(
                f"section_counts: no integer stride gives exactly {desired} of {T} timesteps"
            )
        try:
            parsed = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise InputValueError(
                f"section_counts: expected 'ddimN' or comma-separated ints, got {section_counts!r}"
            ) from None
        counts = [check_int(f"section_counts[{i}]", c, min=0) for i, c in enumerate(parsed)]
    elif isinstance(section_counts, Sequence):
        counts = [check_int(f"section_counts[{i}]", c, min=0) for i, c in enumerate(section_counts)]
    else:
        raise InputTypeError(
            "section_counts: expected 'ddimN', comma-separated ints or a sequence of ints, "
            f"got {describe(section_counts)}"
        )
    if not counts:
        raise InputValueError("section_counts: expected at least one section")
    size_per = T // len(counts)
    extra = T % len(counts)
    start = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise InputValueError(
                f"section_counts: section {i} has {size} timesteps, cannot take {count}"
            )
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += frac_stride
        start += size
    if not kept:
        raise InputValueError("section_counts: expected a positive total count, got 0")
    return tuple(sorted(kept, reverse=True))


def respaced_betas(schedule: NoiseSchedule, timesteps: Sequence[int] | Tensor) -> Tensor:
    """Betas of the schedule restricted to ``timesteps`` (guided-diffusion respacing).

    ``beta'_k = 1 - alpha_bar_{S_k} / alpha_bar_{S_{k-1}}`` over the kept set ``S`` in ascending
    order, with ``alpha_bar_{S_{-1}} = 1``; float64 of shape ``(len(S),)``. Their cumulative
    product equals ``alpha_bar`` at the kept timesteps. Strided DDPM in imgdiff uses exactly
    these betas per step without building a new schedule.
    """
    schedule = check_schedule("schedule", schedule)
    kept = sorted(set(_timestep_ints(timesteps, len(schedule))))  # any order, duplicates dropped
    ab = schedule.alphas_cumprod[kept]
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1.0 - ab / prev


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The transitions of one sampling (or inversion) run; tables on the CPU.

    Attributes:
        timesteps: ``(N,)`` int64, the training timestep the model sees at step ``k``.
        next_timesteps: ``(N,)`` int64, the timestep of the level after step ``k``; ``-1`` is
            the final level (clean data, or ``alpha_bar_0`` under ``final_alpha_bar="first"``).
        alpha_bar: ``(N,)`` float64, the level of the state before step ``k``.
        alpha_bar_next: ``(N,)`` float64, the level after step ``k``.

    In a generation plan ``alpha_bar[k]`` is the level of ``timesteps[k]``. In a DDIM
    inversion plan (:meth:`inversion`) the model sees the *target* timestep, so
    ``timesteps[k] == next_timesteps[k]`` and ``alpha_bar[k]`` is the level of the previous
    step's target. A :meth:`reversed` plan lists a generation plan's transitions to be undone,
    last first: each row still describes ``timesteps[k] -> next_timesteps[k]``.
    """

    timesteps: Tensor
    next_timesteps: Tensor
    alpha_bar: Tensor
    alpha_bar_next: Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def reversed(self) -> SamplingPlan:
        """The same transitions in reverse order (each row still goes ``t -> s``).

        For samplers with an exact inverse step (EDICT), which undo the last transition first.
        """
        return SamplingPlan(
            timesteps=self.timesteps.flip(0),
            next_timesteps=self.next_timesteps.flip(0),
            alpha_bar=self.alpha_bar.flip(0),
            alpha_bar_next=self.alpha_bar_next.flip(0),
        )

    @staticmethod
    def final_level(schedule: NoiseSchedule, final_alpha_bar: FinalAlphaBar) -> float:
        """``alpha_bar`` after the last step: 1, or ``alpha_bar_0`` for ``"first"``."""
        final_alpha_bar = check_choice("final_alpha_bar", final_alpha_bar, FINAL_ALPHA_BARS)
        return 1.0 if final_alpha_bar == "one" else float(schedule.alphas_cumprod[0])

    @classmethod
    def denoising(
        cls,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        final_alpha_bar: FinalAlphaBar = "one",
    ) -> SamplingPlan:
        """Plan for generation over descending ``timesteps``: each step goes to the next entry."""
        ts = torch.tensor(validate_timesteps(timesteps, len(schedule)), dtype=torch.int64)
        final = torch.tensor([cls.final_level(schedule, final_alpha_bar)], dtype=torch.float64)
        levels = torch.cat([final, schedule.alphas_cumprod])  # levels[t + 1] is alpha_bar_t
        nxt = torch.cat([ts[1:], ts.new_full((1,), -1)])
        return cls(
            timesteps=ts,
            next_timesteps=nxt,
            alpha_bar=levels[ts + 1],
            alpha_bar_next=levels[nxt + 1],
        )

    @classmethod
    def inversion(
        cls,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        final_alpha_bar: FinalAlphaBar = "one",
    ) -> SamplingPlan:
        """Plan that runs the generation plan of ``timesteps`` backwards (DDIM inversion).

        Step ``k`` walks the ascending list ``u = reversed(timesteps)``: it moves from the level
        of ``u[k-1]`` (the final level for ``k = 0``) to the level of ``u[k]`` and calls the model
        at ``u[k]``, the target timestep, as diffusers' ``DDIMInverseScheduler`` does.
        """
        fwd = cls.denoising(schedule, timesteps, final_alpha_bar)
        return cls(
            timesteps=fwd.timesteps.flip(0),
            next_timesteps=fwd.timesteps.flip(0),
            alpha_bar=fwd.alpha_bar_next.flip(0),
            alpha_bar_next=fwd.alpha_bar.flip(0),
        )


def truncate_for_strength(timesteps: tuple[int, ...], strength: float) -> tuple[int, ...]:
    """Keep the last ``int(N * strength)`` timesteps (SDEdit / EDICT ``strength``).

    ``strength = 1`` keeps all of them; smaller values start from a less noisy level.
    """
    s = check_float("strength", strength, min=0.0, max=1.0, min_open=True)
    keep = int(len(timesteps) * s)
    if keep < 1:
        raise InputValueError(
            f"strength: {s} keeps int({len(timesteps)} * {s}) = 0 of {len(timesteps)} steps; "
            "expected a strength that keeps at least one step"
        )
    return timesteps[len(timesteps) - keep :]
