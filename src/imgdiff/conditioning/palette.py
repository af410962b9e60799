"""Colour-palette conditioning in the style of PaletteNet (Cho, Yun, Lee, Choi, CVPRW 2017).

PaletteNet recolours an image so that its palette matches a target palette of **six ordered
colours in CIE Lab**; the network sees the palette flattened to an 18-vector and tiled spatially
(spec 8.6). This module has the pieces a diffusion model needs for that kind of condition:

* :func:`rgb_to_lab` / :func:`lab_to_rgb`: differentiable sRGB (images in ``[-1, 1]``) <-> CIE Lab
  (D65 white, sRGB transfer curve);
* :func:`extract_palette`: a deterministic k-means in Lab, centres sorted by cluster size;
* :func:`tile_palette`: ``(B, 6, 3) -> (B, 18, H, W)`` for channel concatenation;
* :class:`PaletteEmbedding`: ``MLP(18 -> emb_dim)`` with a learned null embedding for
  classifier-free guidance, to add to the timestep embedding.

Both adapters feed the network normalised values (:func:`normalize_palette`): ``L / 100`` (so
``[0, 1]``) and ``a / 128``, ``b / 128`` (about ``[-1, 1]``). The flattened layout is colour-major,
``[L_0, a_0, b_0, L_1, a_1, b_1, ...]``: channel ``3 i + c`` holds component ``c`` of colour ``i``.
The order of the colours is part of a trained model's contract, so extraction sorts them by a fixed
rule (cluster size, then lightness).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, overload

import torch
from torch import Tensor

from imgdiff._checks import (
    check_bool,
    check_finite,
    check_float,
    check_int,
    check_seed,
    check_tensor,
    describe,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.nets.palette_embedding import LAB_SCALE, PALETTE_SIZE, PaletteEmbedding, _check_palette

__all__ = [
    "LAB_SCALE",
    "PALETTE_SIZE",
    "PaletteEmbedding",
    "denormalize_palette",
    "extract_palette",
    "lab_to_rgb",
    "normalize_palette",
    "rgb_to_lab",
    "tile_palette",
]

# Linear sRGB -> CIE XYZ for the D65 white point (IEC 61966-2-1; the matrix as tabulated by
# B. Lindbloom). The reference white is taken as the matrix' row sums, i.e. the XYZ of sRGB white,
# (0.95047, 1.0, 1.08883), so that white maps to exactly (100, 0, 0).
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_DELTA = 6.0 / 29.0  # CIE 1976 L*a*b*: f(t) = t^(1/3) above delta^3, linear below


@lru_cache(maxsize=16)
def _matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(M, M^-1, white)`` in ``dtype`` on ``device`` (inverted once in float64)."""
    m = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)
    return (
        m.to(device=device, dtype=dtype),
        torch.linalg.inv(m).to(device=device, dtype=dtype),
        m.sum(dim=1).to(device=device, dtype=dtype),
    )


def _check_colors(name: str, x: object, dim: int) -> tuple[Tensor, int]:
    """A floating tensor with 3 entries along ``dim``; returns it and ``dim`` made non-negative."""
    x = check_tensor(name, x, min_ndim=1, floating=True)
    dim = check_int("dim", dim)
    if not -x.ndim <= dim < x.ndim:
        raise InputValueError(
            f"dim: expected a dimension of {name} (shape {tuple(x.shape)}), got {dim}"
        )
    dim %= x.ndim
    if x.shape[dim] != 3:
        raise InputValueError(
            f"{name}: expected 3 colour channels along dim {dim}, got shape {tuple(x.shape)}"
        )
    return x, dim


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def rgb_to_lab(images: Tensor, *, dim: int = 1) -> Tensor:
    """sRGB in ``[-1, 1]`` -> CIE Lab (D65): ``L`` in ``[0, 100]``, ``a, b`` about ``[-128, 127]``.

    ``images`` has its 3 colour channels along ``dim`` (``(B, 3, H, W)`` by default; use
    ``dim=-1`` for ``(..., 3)`` colour lists). Differentiable; computed in float32 (float64 for
    float64 input) and returned in the input dtype. Values outside ``[-1, 1]`` follow the
    extended sRGB curve (linear below 0), so the conversion stays invertible.
    """
    x, dim = _check_colors("images", images, dim)
    work = _work_dtype(x.dtype)
    m, _, white = _matrices(work, x.device)
    c = (x.to(work).movedim(dim, -1) + 1.0) / 2.0
    # sRGB transfer curve; the clamp keeps the unused branch of `where` free of NaN gradients.
    linear = torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    t = (linear @ m.T) / white
    d3 = _DELTA**3
    f = torch.where(t > d3, t.clamp_min(d3) ** (1.0 / 3.0), t / (3 * _DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-1)
    lab = torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)
    return lab.movedim(-1, dim).to(x.dtype)


def lab_to_rgb(lab: Tensor, *, dim: int = 1) -> Tensor:
    """CIE Lab (D65) -> sRGB in ``[-1, 1]``, the inverse of :func:`rgb_to_lab` (not clamped).

    ``lab`` has ``(L, a, b)`` along ``dim`` (``(B, 3, H, W)`` by default, ``dim=-1`` for a palette
    ``(B, 6, 3)``). Out-of-gamut colours come back outside ``[-1, 1]``; clamp them for display.
    """
    x, dim = _check_colors("lab", lab, dim)
    work = _work_dtype(x.dtype)
    _, m_inv, white = _matrices(work, x.device)
    L, a, b = x.to(work).movedim(dim, -1).unbind(-1)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-1)
    t = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    linear = (t * white) @ m_inv.T
    c = torch.where(
        linear <= 0.0031308,
        12.92 * linear,
        1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055,
    )
    return (c * 2.0 - 1.0).movedim(-1, dim).to(x.dtype)


def normalize_palette(palette: Tensor) -> Tensor:
    """Lab ``(..., 3)`` -> network scale: ``(L / 100, a / 128, b / 128)``."""
    p, _ = _check_colors("palette", palette, -1)
    return p / p.new_tensor(LAB_SCALE)


def denormalize_palette(values: Tensor) -> Tensor:
    """The inverse of :func:`normalize_palette`: ``(..., 3)`` -> Lab."""
    v, _ = _check_colors("values", values, -1)
    return v * v.new_tensor(LAB_SCALE)


@overload
def extract_palette(
    images: Tensor,
    k: int = ...,
    *,
    max_pixels: int | None = ...,
    num_iters: int = ...,
    tol: float = ...,
    seed: int = ...,
    return_weights: Literal[False] = ...,
) -> Tensor: ...
@overload
def extract_palette(
    images: Tensor,
    k: int = ...,
    *,
    max_pixels: int | None = ...,
    num_iters: int = ...,
    tol: float = ...,
    seed: int = ...,
    return_weights: Literal[True],
) -> tuple[Tensor, Tensor]: ...
def extract_palette(
    images: Tensor,
    k: int = PALETTE_SIZE,
    *,
    max_pixels: int | None = 4096,
    num_iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The ``k`` dominant colours of each image, in Lab, by k-means on its pixels.

    Args:
        images: ``(B, 3, H, W)`` sRGB in ``[-1, 1]``.
        k: number of colours (PaletteNet uses 6).
        max_pixels: cluster a random subset of this many pixels (the same pixel positions for
            every image, drawn from ``seed``) when an image has more; ``None`` uses all pixels.
        num_iters: at most this many Lloyd iterations.
        tol: an image stops iterating once no centre moves by more than ``tol`` (Lab units).
        seed: seeds the pixel subset and the k-means++ initialisation.
        return_weights: also return each colour's share of the clustered pixels.

    Returns:
        ``palette`` ``(B, k, 3)`` Lab in the images' dtype, and with ``return_weights`` also
        ``weights`` ``(B, k)`` (fractions summing to 1).

    Deterministic: k-means++ initialisation from a CPU generator seeded with ``seed``, a fixed
    iteration budget, clustering in float64. Every image uses the same random numbers and stops on
    its own, so its palette does not depend on the rest of the batch. An empty cluster is moved
    to the pixel farthest from its centre. The colours are sorted by cluster size (descending),
    ties by ``L``, then ``a``, then ``b`` (all descending). Colours closer than 0.001 in Lab
    count as one; an image with fewer than ``k`` distinct colours repeats them cyclically
    (largest first) after the distinct ones, with weight 0.
    """
    x = check_tensor("images", images, ndim=4, floating=True)
    if x.shape[1] != 3:
        raise InputValueError(
            f"images: expected shape (B, 3, H, W) (RGB in [-1, 1]), got {tuple(x.shape)}"
        )
    if x.shape[2] * x.shape[3] == 0:
        raise InputValueError(f"images: expected at least one pixel, got shape {tuple(x.shape)}")
    k = check_int("k", k, min=1)
    if max_pixels is not None:
        max_pixels = check_int("max_pixels", max_pixels, min=1)
    num_iters = check_int("num_iters", num_iters, min=1)
    tol = check_float("tol", tol, min=0.0)
    seed = check_seed("seed", seed)
    return_weights = check_bool("return_weights", return_weights)

    check_finite("images", x)
    B = x.shape[0]
    pixels = rgb_to_lab(x.detach()).to(torch.float64).flatten(2).transpose(1, 2)  # (B, N, 3)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(k, generator=g, dtype=torch.float64).tolist()
    if max_pixels is not None and pixels.shape[1] > max_pixels:
        keep = torch.randperm(pixels.shape[1], generator=g)[:max_pixels].sort().values
        pixels = pixels[:, keep.to(x.device)]
    N = pixels.shape[1]
    if B == 0:
        empty = x.new_zeros(0, k, 3)
        return (empty, x.new_zeros(0, k)) if return_weights else empty

    centres, active = _kmeans_pp(pixels, u)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    for _ in range(num_iters):
        new, new_active = _lloyd_step(pixels, centres, active)
        shift = (new - centres).norm(dim=-1).amax(dim=1)
        centres = torch.where(done[:, None, None], centres, new)
        active = torch.where(done[:, None], active, new_active)
        done = done | (shift <= tol)
        if bool(done.all()):
            break
    counts = _assign_counts(pixels, centres, active)
    order = _palette_order(centres, counts)
    # Inactive centres (count 0, sorted last) repeat the active colours cyclically.
    n_active = active.sum(dim=1, keepdim=True)
    pos = torch.arange(k, device=x.device).expand(B, k)
    order = order.gather(1, torch.where(pos < n_active, pos, pos % n_active))
    palette = centres.gather(1, order[..., None].expand(-1, -1, 3)).to(x.dtype)
    if not return_weights:
        return palette
    weights = torch.where(pos < n_active, counts.gather(1, order), 0.0) / N
    return palette, weights.to(x.dtype)


# Pixels closer than 1e-3 in Lab (squared: 1e-6) count as the same colour: float noise of the
# conversion must not split a flat colour into two clusters (a just-noticeable difference is ~1).
_SAME_COLOUR_SQ = 1e-6


def _sq_dists(pixels: Tensor, centres: Tensor, active: Tensor) -> Tensor:
    """``(B, N, k)`` squared distances, ``inf`` to inactive centres (one centre at a time)."""
    d2 = torch.stack(
        [(pixels - centres[:, j, None]).square().sum(-1) for j in range(centres.shape[1])], dim=-1
    )
    return d2.masked_fill(~active[:, None, :], float("inf"))


def _kmeans_pp(pixels: Tensor, u: list[float]) -> tuple[Tensor, Tensor]:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) from the uniforms ``u`` (one per centre).

    Returns ``centres`` ``(B, k, 3)`` and ``active`` ``(B, k)``: a centre is inactive (a
    placeholder copy of the first) when every pixel already lies on a chosen centre.
    """
    B, N, _ = pixels.shape
    rows = torch.arange(B, device=pixels.device)
    first = min(int(u[0] * N), N - 1)
    chosen = [pixels[:, first]]
    active = [torch.ones(B, dtype=torch.bool, device=pixels.device)]
    d2 = (pixels - chosen[0][:, None]).square().sum(-1)
    for uj in u[1:]:
        # Draw a pixel with probability d2 / sum(d2): the first index whose cumulative sum exceeds
        # u * total (pixels on a centre, d2 ~ 0, are never drawn).
        cum = torch.where(d2 > _SAME_COLOUR_SQ, d2, 0.0).cumsum(dim=1)
        total = cum[:, -1]
        idx = torch.searchsorted(cum, (uj * total[:, None]).contiguous(), right=True).squeeze(1)
        ok = total > 0
        c = torch.where(ok[:, None], pixels[rows, idx.clamp(max=N - 1)], chosen[0])
        chosen.append(c)
        active.append(ok)
        d2 = torch.where(ok[:, None], torch.minimum(d2, (pixels - c[:, None]).square().sum(-1)), d2)
    return torch.stack(chosen, dim=1), torch.stack(active, dim=1)


def _lloyd_step(pixels: Tensor, centres: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """One Lloyd iteration: ``(new centres (B, k, 3), new active (B, k))``.

    An empty cluster takes the pixel farthest from its centre, if that pixel is not on a centre;
    otherwise it becomes inactive.
    """
    B, _, _ = pixels.shape
    k = centres.shape[1]
    dmin, assign = _sq_dists(pixels, centres, active).min(dim=-1)  # ties: lowest index
    sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, 3), pixels)
    counts = torch.zeros(B, k, dtype=pixels.dtype, device=pixels.device)
    counts.scatter_add_(1, assign, torch.ones_like(dmin))
    new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], centres)
    new_active = counts > 0
    rows = torch.arange(B, device=pixels.device)
    for j in range(k):
        # That pixel's distance is then zeroed so the next empty cluster takes another one.
        far = dmin.argmax(dim=1)
        far_d = dmin[rows, far]
        move = (counts[:, j] == 0) & (far_d > _SAME_COLOUR_SQ)
        new[:, j] = torch.where(move[:, None], pixels[rows, far], new[:, j])
        new_active[:, j] |= move
        dmin = dmin.index_put((rows, far), torch.where(move, torch.zeros_like(far_d), far_d))
    return new, new_active


def _assign_counts(pixels: Tensor, centres: Tensor, active: Tensor) -> Tensor:
    """``(B, k)`` number of pixels nearest to each active centre (ties to the lowest index)."""
    assign = _sq_dists(pixels, centres, active).argmin(dim=-1)
    counts = torch.zeros(centres.shape[:2], dtype=pixels.dtype, device=pixels.device)
    return counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=pixels.dtype))


def _palette_order(centres: Tensor, counts: Tensor) -> Tensor:
    """``(B, k)`` permutation: counts descending, then L, a, b descending (stable sorts, last key first)."""
    B, k = counts.shape
    order = torch.arange(k, device=centres.device).expand(B, k)
    for key in (centres[..., 2], centres[..., 1], centres[..., 0], counts):
        perm = torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices
        order = order.gather(1, perm)
    return order


def tile_palette(
    palette: Tensor,
    size: int | tuple[int, int],
    *,
    normalize: bool = True,
    num_colors: int = PALETTE_SIZE,
) -> Tensor:
    """``(B, 6, 3)`` Lab palette -> ``(B, 18, H, W)``: the flattened palette at every pixel.

    For channel concatenation (``cat([x_t, tiled], dim=1)``, in_channels += 18) at the input or
    at each decoder scale, as PaletteNet's decoder does. Channel ``3 i + c`` is component ``c``
    of colour ``i``, so the palette order matters. With ``normalize`` (default) the values are
    :func:`normalize_palette`'d. ``size`` is ``H`` or ``(H, W)``. The result is a broadcast view
    (no copy); call ``.contiguous()`` before writing into it. For classifier-free guidance the
    usual null condition is zeros.
    """
    n = check_int("num_colors", num_colors, min=1)
    p = _check_palette("palette", palette, n)
    H, W = _check_size(size)
    if not isinstance(normalize, bool):
        raise InputTypeError(f"normalize: expected a bool, got {describe(normalize)}")
    flat = (normalize_palette(p) if normalize else p).reshape(p.shape[0], 3 * n)
    return flat[:, :, None, None].expand(p.shape[0], 3 * n, H, W)


def _check_size(size: object) -> tuple[int, int]:
    if isinstance(size, tuple) and len(size) == 2:
        return check_int("size[0]", size[0], min=1), check_int("size[1]", size[1], min=1)
    if isinstance(size, int) and not isinstance(size, bool):
        s = check_int("size", size, min=1)
        return s, s
    raise InputTypeError(f"size: expected an int or a pair of ints (H, W), got {describe(size)}")
