"""ZeCon's CLIP augmentations: random resized patches, affine and perspective, in one resampling.

Yang et al. 2023 (ZeCon), following Kim et al.'s patch CLIP loss: each image is augmented
``n_patch`` times before the CLIP encoder (spec 7.4). The copies are laid out copy-major,
``[I1_aug1, I2_aug1, ..., I1_aug2, ...]`` (``x.repeat(n_patch, 1, 1, 1)``), so image ``b``'s
copies are rows ``b::B``. Per copy, with independent parameters:

1. patch mode only: a random resized crop with area fraction in ``[patch_min, patch_max]`` and
   aspect ratio log-uniform in ``[3/4, 4/3]``, resampled to ``patch_size x patch_size``;
2. with probability ``p``: a random affine map (rotation up to ``degrees``, translation up to
   ``translate`` of the size), border padding;
3. with probability ``p``: a random perspective map (each corner moved inward by up to
   ``distortion`` of the half-size), zero padding;
4. adaptive average pooling to ``output_size`` (224 for CLIP).

The three warps are composed into one sampling grid, so the image is resampled once
(bilinear), and the border padding of step 2 is reproduced by clamping to the crop; the result
is differentiable in the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - torch's conventional alias
from torch import Tensor

from imgdiff._checks import (
    check_float,
    check_generator,
    check_int,
    check_same_shape,
    check_tensor,
    describe,
)
from imgdiff.errors import InputTypeError

__all__ = ["CLIPAugment"]


@dataclass(frozen=True)
class CLIPAugment:
    """ZeCon's augmenter: ``(B, C, H, W)`` -> ``(n_patch B, C, output_size, output_size)``.

    Args:
        n_patch: copies per image (ZeCon: 32).
        patch: take random resized patches first (the ``*_patch`` losses); else whole images.
        patch_min / patch_max: area fraction of a patch (ZeCon argparse 0.01 / 0.05; README 0.3).
        patch_size: side of a resampled patch before pooling (ZeCon: 128).
        output_size: side after adaptive average pooling (the CLIP input, 224).
        p: probability of each of the affine and perspective warps (ZeCon ``aug_prob = 1``).
        degrees / translate: the affine range (15 degrees, 0.1 of the size).
        distortion: the perspective strength (0.7).
    """

    n_patch: int = 32
    patch: bool = False
    patch_min: float = 0.01
    patch_max: float = 0.05
    patch_size: int = 128
    output_size: int = 224
    p: float = 1.0
    degrees: float = 15.0
    translate: float = 0.1
    distortion: float = 0.7

    def __post_init__(self) -> None:
        check_int("n_patch", self.n_patch, min=1)
        if not isinstance(self.patch, bool):
            raise InputTypeError(f"patch: expected a bool, got {describe(self.patch)}")
        check_float("patch_min", self.patch_min, min=0.0, max=1.0, min_open=True)
        check_float("patch_max", self.patch_max, min=self.patch_min, max=1.0)
        check_int("patch_size", self.patch_size, min=1)
        check_int("output_size", self.output_size, min=1)
        check_float("p", self.p, min=0.0, max=1.0)
        check_float("degrees", self.degrees, min=0.0, max=180.0)
        check_float("translate", self.translate, min=0.0, max=1.0)
        check_float("distortion", self.distortion, min=0.0, max=1.0)

    def __call__(
        self, x: Tensor, *, is_global: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augmented copies ``(n_patch B, C, S, S)``, ``S = output_size``, copy-major.

        ``is_global=True`` returns the images repeated ``n_patch`` times and pooled, without any
        augmentation (the source side of ZeCon's patch directional loss). ``generator`` (on the
        CPU) draws the random parameters; the global generator when ``None``.
        """
        x = check_tensor("x", x, ndim=4, floating=True, nonempty=True)
        generator = check_generator(generator)
        B, _, H, W = x.shape
        S = self.output_size
        copies = x.repeat(self.n_patch, 1, 1, 1)
        if is_global:
            return F.adaptive_avg_pool2d(copies, (S, S))
        grid, inside = self.sampling_grid(
            self.n_patch * B, H, W, generator=generator, device=x.device
        )
        return self._warp(copies, grid, inside)

    def paired(
        self, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Augment ``x`` and ``y`` (same shape) with the same random warps, copy for copy.

        For directional losses: the difference of the two sides then measures ``x - y``, not
        the augmentations. Returns two ``(n_patch B, C, S, S)`` tensors.
        """
        x = check_tensor("x", x, ndim=4, floating=True, nonempty=True)
        y = check_tensor("y", y, ndim=4, floating=True)
        check_same_shape("y", y, "x", x)
        B, _, H, W = x.shape
        grid, inside = self.sampling_grid(
            self.n_patch * B, H, W, generator=generator, device=x.device
        )
        reps = (self.n_patch, 1, 1, 1)
        return self._warp(x.repeat(reps), grid, inside), self._warp(y.repeat(reps), grid, inside)

    def _warp(self, copies: Tensor, grid: Tensor, inside: Tensor) -> Tensor:
        S = self.output_size
        work = copies if copies.dtype in (torch.float32, torch.float64) else copies.float()
        grid = grid.to(work.dtype)
        out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out * inside.to(work.dtype)
        return F.adaptive_avg_pool2d(out, (S, S)).to(copies.dtype)

    def sampling_grid(
        self,
        N: int,
        H: int,
        W: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The composed warp of ``N`` copies of an ``H x W`` image.

        Returns ``grid`` ``(N, h, w, 2)`` in ``grid_sample``'s normalised ``(x, y)`` coordinates
        of the input (``h = w = patch_size`` in patch mode, else ``H x W``) and ``inside``
        ``(N, 1, h, w)``, 0 where the perspective warp samples outside its input (zero padding),
        both float32 on ``device``. The per-copy parameters are drawn in float64 on the CPU (from
        ``generator``) and only they are moved; the grid itself is built on ``device``.
        """
        h, w = (self.patch_size, self.patch_size) if self.patch else (H, W)
        # the random parameters, in a fixed draw order
        apply_persp = self._coin(N, generator)
        H_inv = _perspective_inverse(N, self.distortion * apply_persp, generator)
        apply_aff = self._coin(N, generator)
        angle = _uniform(N, -self.degrees, self.degrees, generator) * math.pi / 180 * apply_aff
        shift = torch.stack(
            [
                _uniform(N, -self.translate, self.translate, generator) * 2 * apply_aff,
                _uniform(N, -self.translate, self.translate, generator) * 2 * apply_aff,
            ],
            dim=-1,
        )
        crop = self._crops(N, H, W, generator) if self.patch else None

        def on(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=torch.float32)

        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([gx, gy], dim=-1).reshape(1, h * w, 2).expand(N, -1, -1)

        # 3. perspective (applied last, inverted first): output -> affine-output coordinates
        pts = _apply_homography(on(H_inv), pts)
        inside = (pts.abs() <= 1.0).all(dim=-1).float()

        # 2. affine: affine-output -> crop coordinates (border padding: clamp to the crop)
        # rotate in pixel-proportional coordinates so that non-square inputs stay undistorted
        aspect = torch.tensor([w / 2, h / 2], device=device)
        p = (pts - on(shift)[:, None, :]) * aspect
        cos, sin = on(torch.cos(angle))[:, None], on(torch.sin(angle))[:, None]
        rx = cos * p[..., 0] + sin * p[..., 1]
        ry = -sin * p[..., 0] + cos * p[..., 1]
        pts = (torch.stack([rx, ry], dim=-1) / aspect).clamp(-1.0, 1.0)

        # 1. crop: crop coordinates -> image coordinates
        if crop is not None:
            centre, half = crop
            pts = on(centre)[:, None, :] + pts * on(half)[:, None, :]
        return pts.reshape(N, h, w, 2), inside.reshape(N, 1, h, w)

    def _coin(self, N: int, generator: torch.Generator | None) -> Tensor:
        if self.p >= 1.0:
            return torch.ones(N, dtype=torch.float64)
        return (torch.rand(N, generator=generator, dtype=torch.float64) < self.p).double()

    def _crops(
        self, N: int, H: int, W: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Centres and half-sizes ``(N, 2)`` (normalised ``(x, y)``) of random resized crops."""
        area = _uniform(N, self.patch_min, self.patch_max, generator) * H * W
        log_ratio = _uniform(N, math.log(3 / 4), math.log(4 / 3), generator)
        ratio = torch.exp(log_ratio)  # width / height
        cw = torch.sqrt(area * ratio).clamp(1.0, W)
        ch = torch.sqrt(area / ratio).clamp(1.0, H)
        left = torch.rand(N, generator=generator, dtype=torch.float64) * (W - cw)
        top = torch.rand(N, generator=generator, dtype=torch.float64) * (H - ch)
        centre = torch.stack([(left + cw / 2) / W * 2 - 1, (top + ch / 2) / H * 2 - 1], dim=-1)
        half = torch.stack([cw / W, ch / H], dim=-1)
        return centre, half


def _uniform(N: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(N, generator=generator, dtype=torch.float64)


def _perspective_inverse(N: int, strength: Tensor, generator: torch.Generator | None) -> Tensor:
    """``(N, 3, 3)`` homographies from the warped image back to its input.

    The input's corners ``(+-1, +-1)`` go to corners moved inward by ``U(0, strength)`` in each
    axis (torchvision's ``RandomPerspective`` parameters); the inverse maps those back.
    """
    corners = torch.tensor(
        [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64
    )
    inward = -corners  # direction towards the centre, per axis
    moved = (
        corners
        + inward
        * torch.rand(N, 4, 2, generator=generator, dtype=torch.float64)
        * (strength[:, None, None])
    )
    return _homography(moved, corners.expand(N, 4, 2))


def _homography(src: Tensor, dst: Tensor) -> Tensor:
    """``(N, 3, 3)`` ``M`` with ``M [src, 1] ~ [dst, 1]`` for four point pairs ``(N, 4, 2)``."""
    N = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    A = torch.cat([rows_u, rows_v], dim=1)  # (N, 8, 8)
    b = torch.cat([u, v], dim=1)  # (N, 8)
    h = torch.linalg.solve(A, b)
    return torch.cat([h, torch.ones(N, 1, dtype=h.dtype)], dim=1).reshape(N, 3, 3)


def _apply_homography(M: Tensor, pts: Tensor) -> Tensor:
    """Points ``(N, P, 2)`` through homographies ``(N, 3, 3)``."""
    mapped = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1) @ M.transpose(1, 2)
    return mapped[..., :2] / mapped[..., 2:]
