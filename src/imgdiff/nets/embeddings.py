"""Timestep and noise-level embeddings (sinusoidal, as guided-diffusion and Palette)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from imgdiff._checks import check_float, check_int, check_tensor

__all__ = ["TimestepEmbedding", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """guided-diffusion's ``timestep_embedding`` (Vaswani et al. positional encoding), cos first.

    ``half = dim // 2``, ``f_i = exp(-ln(max_period) i / half)``, ``emb = [cos(t f), sin(t f)]``,
    zero-padded to ``dim`` when odd. ``t`` ``(B,)`` (any real values: timesteps, or a scaled
    noise level); returns float32 ``(B, dim)``. Equals diffusers' ``get_timestep_embedding`` with
    ``flip_sin_to_cos=True, downscale_freq_shift=0`` (Stable Diffusion's setting).
    """
    check_tensor("t", t, ndim=1)
    dim = check_int("dim", dim, min=2)  # one cosine and one sine at least
    max_period = check_float("max_period", max_period, min=1.0)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the noise conditioning, then ``Linear(d, 4d) -> SiLU -> Linear(4d, 4d)``.

    ``scale`` multiplies the input first: 1 for integer timesteps; for Palette's continuous noise
    level ``gamma`` in [0, 1] use e.g. 1000 so the frequencies vary over the input range (with
    ``max_period = 1e4`` and raw gamma most of them are nearly constant; spec 2.6 pitfall). The
    same scale must be used in training and inference. Input ``(B,)``, output ``(B, 4 dim)``.
    """

    def __init__(self, dim: int, *, scale: float = 1.0, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, min=2)
        self.scale = check_float("scale", scale, min=0.0, min_open=True)
        self.max_period = check_float("max_period", max_period, min=1.0)
        self.linear_1 = nn.Linear(dim, 4 * dim)
        self.linear_2 = nn.Linear(4 * dim, 4 * dim)

    @property
    def out_dim(self) -> int:
        """Size of the embedding, ``4 dim``."""
        return 4 * self.dim

    def forward(self, t: Tensor) -> Tensor:
        """``(B,)`` -> ``(B, 4 dim)`` in the MLP's dtype."""
        emb = sinusoidal_embedding(t.to(torch.float32) * self.scale, self.dim, self.max_period)
        hidden = nn.functional.silu(self.linear_1(emb.to(self.linear_1.weight.dtype)))
        out: Tensor = self.linear_2(hidden)
        return out
