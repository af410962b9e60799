"""Self- and cross-attention blocks for the reference U-Net (Vaswani et al.; LDM's cross-attention)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention

from imgdiff._checks import check_device, check_int, check_tensor
from imgdiff.errors import InputValueError

__all__ = ["CrossAttention", "SpatialAttention", "check_context"]


def check_context(context: object, x: Tensor, width: int | None, *, ref_name: str = "x") -> Tensor:
    """``context`` as ``(B, L, width)`` tokens (``L >= 1``; any width for ``None``) for the batch
    of ``x`` ``(B, ...)``, on its device; cross-attention's keys and values."""
    c = check_tensor("context", context, floating=True)
    if (
        c.ndim != 3
        or c.shape[0] != x.shape[0]
        or c.shape[1] < 1
        or (width is not None and c.shape[2] != width)
    ):
        raise InputValueError(
            f"context: expected shape ({x.shape[0]}, L, {width if width is not None else 'd'}) "
            f"with L >= 1 ({ref_name}'s batch), got {tuple(c.shape)}"
        )
    check_device("context", c, ref_name, x)
    return c


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens ``(B, N, d)`` over context tokens ``(B, L, d_c)``.

    ``Q = H W_q``, ``K = c W_k``, ``V = c W_v``, ``softmax(Q K^T / sqrt(d_head)) V``, merged heads,
    output projection (spec 8.4). With no context it is self-attention (``c = H``). Output
    ``(B, N, d)``; the residual add is the caller's.
    """

    def __init__(self, dim: int, *, heads: int = 4, context_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, min=1)
        self.heads = check_int("heads", heads, min=1)
        if dim % heads:
            raise InputValueError(f"heads: expected a divisor of dim {dim}, got {heads}")
        self.context_dim = (
            dim if context_dim is None else check_int("context_dim", context_dim, min=1)
        )
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        """``h`` ``(B, N, d)``, ``context`` ``(B, L, d_c)`` or ``None`` (self-attention)."""
        check_tensor("h", h, ndim=3, floating=True, nonempty=True)
        if h.shape[-1] != self.dim:
            raise InputValueError(
                f"h: expected shape (B, N, {self.dim}) (dim={self.dim}), got {tuple(h.shape)}"
            )
        if context is None:
            if self.context_dim != self.dim:
                raise InputValueError(
                    f"context: expected shape ({h.shape[0]}, L, {self.context_dim}) (context_dim "
                    f"{self.context_dim} differs from dim {self.dim}: no self-attention), got None"
                )
            c = h
        else:
            c = check_context(context, h, self.context_dim, ref_name="h")
        B, N, _ = h.shape
        q = self.to_q(h).reshape(B, N, self.heads, -1).transpose(1, 2)
        k = self.to_k(c).reshape(B, c.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(c).reshape(B, c.shape[1], self.heads, -1).transpose(1, 2)
        attended = scaled_dot_product_attention(q, k, v)
        out: Tensor = self.to_out(attended.transpose(1, 2).reshape(B, N, self.dim))
        return out


class SpatialAttention(nn.Module):
    """Self-attention over the pixels of a feature map, then optional cross-attention to a context.

    ``x`` ``(B, C, H, W)`` -> same shape; each attention is pre-normalised and residual.
    """

    def __init__(
        self, channels: int, *, heads: int = 4, context_dim: int | None = None, groups: int = 8
    ) -> None:
        super().__init__()
        channels = check_int("channels", channels, min=1)
        groups = check_int("groups", groups, min=1)
        if channels % groups:
            raise InputValueError(
                f"groups: expected a divisor of channels {channels}, got {groups}"
            )
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = CrossAttention(channels, heads=heads)
        self.cross: CrossAttention | None = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(channels)
            self.cross = CrossAttention(channels, heads=heads, context_dim=context_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``; ``context`` ``(B, L, d_c)`` when configured."""
        check_tensor("x", x, ndim=4, floating=True, nonempty=True)
        B, C, H, W = x.shape
        if self.norm.num_channels != C:
            raise InputValueError(
                f"x: expected {self.norm.num_channels} channels, got shape {tuple(x.shape)}"
            )
        if self.cross is None and context is not None:
            raise InputValueError(
                "context: this block has no cross-attention (built without context_dim); "
                "expected None, got a context"
            )
        tokens = x.reshape(B, C, H * W).transpose(1, 2)  # (B, N, C)
        tokens = tokens + self.attn(self.norm(x).reshape(B, C, H * W).transpose(1, 2))
        if self.cross is not None:
            if context is None:
                raise InputValueError(
                    "context: expected a (B, L, d) context tensor for cross-attention, got None"
                )
            tokens = tokens + self.cross(self.cross_norm(tokens), context)
        out: Tensor = tokens.transpose(1, 2).reshape(B, C, H, W)
        return out
