"""The global colour-palette embedding of the reference networks (PaletteNet-style, spec 8.6).

Re-exported by :mod:`imgdiff.conditioning.palette`, which also extracts palettes from images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imgdiff._checks import check_int, check_tensor, describe
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["LAB_SCALE", "PALETTE_SIZE", "PaletteEmbedding"]

PALETTE_SIZE = 6
"""Number of colours in a PaletteNet palette."""

LAB_SCALE = (100.0, 128.0, 128.0)
"""Divisors of ``(L, a, b)`` used by :func:`normalize_palette`."""


def _check_palette(name: str, palette: object, num_colors: int) -> Tensor:
    p = check_tensor(name, palette, floating=True)
    if p.ndim != 3 or p.shape[1:] != (num_colors, 3):
        raise InputValueError(
            f"{name}: expected shape (B, {num_colors}, 3) ({num_colors} Lab colours per sample), "
            f"got shape {tuple(p.shape)}"
        )
    return p


class PaletteEmbedding(nn.Module):
    """``MLP(18 -> emb_dim)`` of a normalised palette, with a learned null embedding for CFG.

    The output ``(B, emb_dim)`` is meant to be added to the timestep embedding, like a class
    embedding (spec 8.6, "global" adapter). The palette is normalised inside
    (``L/100, a/128, b/128``, :func:`imgdiff.conditioning.palette.normalize_palette`) and flattened colour-major, so pass raw Lab palettes.

    Classifier-free guidance: samples marked in ``null`` (or all of them when ``palette`` is
    ``None``) get the learned ``null_embedding`` instead of the MLP output, whatever their palette
    holds. For :class:`imgdiff.ClassifierFreeGuidance`, pass the flag as its own keyword::

        null = {"palette": torch.zeros(1, 6, 3), "palette_null": torch.ones(1, dtype=torch.bool)}
        cond = {"palette": palettes, "palette_null": torch.zeros(B, dtype=torch.bool)}

    and call ``embedding(palette, palette_null)`` inside the network. The null embedding starts at
    zero (no change to the timestep embedding).

    Args:
        emb_dim: output width (the timestep-embedding width of the network).
        num_colors: colours per palette (6 for PaletteNet).
        hidden_dim: width of the hidden layer (default ``emb_dim``).
    """

    def __init__(
        self, emb_dim: int, *, num_colors: int = PALETTE_SIZE, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.emb_dim = check_int("emb_dim", emb_dim, min=1)
        self.num_colors = check_int("num_colors", num_colors, min=1)
        hidden = self.emb_dim if hidden_dim is None else check_int("hidden_dim", hidden_dim, min=1)
        self.mlp = nn.Sequential(
            nn.Linear(3 * self.num_colors, hidden), nn.SiLU(), nn.Linear(hidden, self.emb_dim)
        )
        self.null_embedding = nn.Parameter(torch.zeros(self.emb_dim))

    def forward(
        self,
        palette: Tensor | None,
        null: Tensor | None = None,
        *,
        batch_size: int | None = None,
        null_name: str = "null",
    ) -> Tensor:
        """Embed ``palette`` ``(B, 6, 3)`` Lab -> ``(B, emb_dim)``.

        Args:
            palette: the palettes, or ``None`` for "no palette" (then ``batch_size`` is needed).
            null: optional ``(B,)`` flags, bool or 0/1 (nonzero = no palette), e.g. condition
                dropout during training or the CFG null half.
            batch_size: the batch when ``palette`` is ``None``; else it must match or be ``None``.
            null_name: what errors call ``null`` (a network passes its own keyword's name).
        """
        if palette is None:
            if batch_size is None:
                raise InputValueError(
                    "batch_size: expected the batch size when palette is None, got None"
                )
            B = check_int("batch_size", batch_size, min=0)
            if null is not None:
                raise InputValueError(
                    f"{null_name}: expected None when palette is None (every sample is then "
                    f"null), got {describe(null)}"
                )
            return self.null_embedding.expand(B, self.emb_dim)
        p = _check_palette("palette", palette, self.num_colors)
        B = p.shape[0]
        if batch_size is not None and check_int("batch_size", batch_size, min=0) != B:
            raise InputValueError(
                f"palette: expected batch {batch_size} (batch_size, e.g. the sample's), got "
                f"shape {tuple(p.shape)}"
            )
        weight = self.null_embedding
        lab = (p / p.new_tensor(LAB_SCALE)).reshape(B, 3 * self.num_colors)  # B = 0 too
        h: Tensor = self.mlp(lab.to(weight.dtype))
        if null is None:
            return h
        flags = check_tensor(null_name, null, ndim=1)
        if flags.shape[0] != B:
            raise InputValueError(
                f"{null_name}: expected shape ({B},) to match the palette's batch, "
                f"got {tuple(flags.shape)}"
            )
        if flags.dtype.is_complex:
            raise InputTypeError(
                f"{null_name}: expected bool or 0/1 flags, got dtype {flags.dtype}"
            )
        return torch.where(flags.to(device=h.device, dtype=torch.bool)[:, None], weight, h)
