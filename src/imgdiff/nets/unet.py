"""A compact, configurable U-Net for examples, tests and small experiments (not a model zoo).

The layout follows Ho et al. 2020 / Dhariwal & Nichol 2021 in miniature: residual blocks whose
normalisation the noise embedding scales and shifts (ADM; or adds to, DDPM), self-attention (and optional cross-attention)
at chosen levels, strided-convolution downsampling and nearest-neighbour upsampling with skip
connections. Options cover what imgdiff's conditioning adapters need: extra input channels for
channel concatenation (Palette/SR3), timestep or continuous noise-level (gamma) conditioning, a
class embedding and a colour-palette embedding with learned nulls for classifier-free guidance,
cross-attention to a text context, and a learned-variance head (``2C`` outputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from imgdiff._checks import (
    check_batch_timesteps,
    check_bool,
    check_choice,
    check_float,
    check_input_dtype,
    check_int,
    check_tensor,
    describe,
    is_integer_dtype,
    set_checked,
)
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.nets.attention import SpatialAttention, check_context
from imgdiff.nets.embeddings import TimestepEmbedding
from imgdiff.nets.palette_embedding import PaletteEmbedding

__all__ = ["NOISE_CONDITIONINGS", "NoiseConditioning", "UNet", "UNetConfig"]

NoiseConditioning = Literal["timestep", "gamma"]
"""What the network's ``t`` input is: integer training timesteps, or Palette's continuous noise
level ``gamma = alpha_bar`` in [0, 1] (scaled by ``gamma_scale`` before the sinusoidal embedding)."""
NOISE_CONDITIONINGS: tuple[NoiseConditioning, ...] = get_args(NoiseConditioning)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (validated at construction).

    Attributes:
        in_channels: channels of the network input, including concatenated conditions
            (Palette: 3 source + 3 noisy target = 6).
        out_channels: channels of the predicted quantity (doubled with ``learned_variance``).
        base_channels: channels at the first level.
        channel_mults: multipliers of ``base_channels`` per level; the input size must be
            divisible by ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level (down path; the up path has one more).
        attention_levels: level indices (0 = full resolution) with self-attention.
        heads: attention heads.
        dropout: dropout inside residual blocks.
        noise_conditioning: ``"timestep"`` or ``"gamma"``.
        gamma_scale: multiplier of gamma before the embedding (``"gamma"`` only).
        num_classes: size of a class embedding (``None``: none); label ``num_classes`` is null.
        palette_colors: colours of a global palette embedding (PaletteNet: 6 Lab colours, input
            ``(B, 6, 3)``; :class:`~imgdiff.nets.PaletteEmbedding`, with a learned null); ``None``: none.
        context_dim: size of cross-attention context tokens (``None``: no cross-attention).
        learned_variance: output ``2 * out_channels`` (improved DDPM's ``learned_range``).
        scale_shift: the noise embedding scales and shifts the residual blocks' normalisation
            (ADM's ``use_scale_shift_norm``) instead of being added as a bias.
        groups: GroupNorm groups (must divide every level's channels).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (2,)
    heads: int = 4
    dropout: float = 0.0
    noise_conditioning: NoiseConditioning = "timestep"
    gamma_scale: float = 1000.0
    num_classes: int | None = None
    palette_colors: int | None = None
    context_dim: int | None = None
    learned_variance: bool = False
    scale_shift: bool = True
    groups: int = 8

    def __post_init__(self) -> None:
        # the checked values are stored: numpy scalars become ints and floats (config_dict()
        # is saved as JSON next to the weights)
        set_checked(
            self,
            in_channels=check_int("in_channels", self.in_channels, min=1),
            out_channels=check_int("out_channels", self.out_channels, min=1),
            # the time embedding has base_channels sinusoids: one cosine and one sine at least
            base_channels=check_int("base_channels", self.base_channels, min=2),
        )
        mults = _int_tuple("channel_mults", self.channel_mults, min=1)
        if not mults:
            raise InputValueError(
                f"channel_mults: expected a non-empty tuple of ints >= 1, got {self.channel_mults!r}"
            )
        levels = _int_tuple("attention_levels", self.attention_levels, min=0, max=len(mults) - 1)
        set_checked(
            self,
            channel_mults=mults,  # lists become tuples (hashable, frozen)
            attention_levels=levels,
            num_res_blocks=check_int("num_res_blocks", self.num_res_blocks, min=1),
            heads=check_int("heads", self.heads, min=1),
            dropout=check_float("dropout", self.dropout, min=0.0, max=1.0, max_open=True),
            noise_conditioning=check_choice(
                "noise_conditioning", self.noise_conditioning, NOISE_CONDITIONINGS
            ),
            gamma_scale=check_float("gamma_scale", self.gamma_scale, min=0.0, min_open=True),
            groups=check_int("groups", self.groups, min=1),
            learned_variance=check_bool("learned_variance", self.learned_variance),
            scale_shift=check_bool("scale_shift", self.scale_shift),
        )
        for name in ("num_classes", "palette_colors", "context_dim"):
            value = getattr(self, name)
            if value is not None:
                set_checked(self, **{name: check_int(name, value, min=1)})
        for m in self.channel_mults:
            ch = self.base_channels * m
            for name, value in (("groups", self.groups), ("heads", self.heads)):
                if ch % value:
                    raise InputValueError(
                        f"{name}: expected a divisor of every level's channels "
                        f"(base_channels * channel_mults), got {value} for a level of {ch} channels"
                    )

    @property
    def downsampling(self) -> int:
        """The factor by which the input size must be divisible."""
        return 1 << (len(self.channel_mults) - 1)


def _int_tuple(name: str, value: object, *, min: int, max: int | None = None) -> tuple[int, ...]:
    """``value``, a tuple or list of ints within ``[min, max]``, as a tuple of ints."""
    if not isinstance(value, (tuple, list)):
        raise InputTypeError(f"{name}: expected a tuple of ints, e.g. (1,), got {describe(value)}")
    return tuple(check_int(f"{name}[{i}]", v, min=min, max=max) for i, v in enumerate(value))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, the noise embedding, GroupNorm-SiLU-Dropout-Conv, plus a skip.

    With ``scale_shift`` (ADM's ``use_scale_shift_norm``, Dhariwal & Nichol 2021) the embedding
    modulates the second normalisation, ``GN(h) (1 + scale) + shift``, so the block can gate its
    inputs by noise level; otherwise it is added as a bias after the first convolution (DDPM).
    """

    def __init__(
        self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int, scale_shift: bool
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1)
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        out_conv = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(out_conv.weight)  # start as the identity (improved DDPM's zero_module)
        nn.init.zeros_(out_conv.bias)  # type: ignore[arg-type]
        self.out_norm = nn.GroupNorm(groups, cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), out_conv)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        out: Tensor = self.skip(x) + self.out_layers(h)
        return out


class UNet(nn.Module):
    """The reference network: ``net(x, t, *, class_labels, palette, context) -> (B, C_out, H, W)``.

    Args of :meth:`forward`:
        x: ``(B, in_channels, H, W)`` (conditions already concatenated, see
            :class:`imgdiff.conditioning.ConcatConditioning`).
        t: ``(B,)`` timesteps (``"timestep"``) or noise levels gamma in [0, 1] (``"gamma"``).
        class_labels: ``(B,)`` integer labels in ``[0, num_classes]`` (``num_classes`` = null) if
            configured.
        palette: ``(B, palette_colors, 3)`` Lab palettes, or ``None`` (all null), if configured.
        palette_null: ``(B,)`` flags marking samples without a palette (CFG's null half,
            condition dropout), if configured.
        context: ``(B, L, context_dim)`` if configured.
    Conditions the network was not configured for are refused. The values of gamma and of
    ``class_labels`` are checked when they are on the CPU; on other devices reading them would
    synchronise every call, so they are not.
    Returns ``(B, out_channels, H, W)``, or ``2 out_channels`` with a learned variance.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch0 = cfg.base_channels
        self.time_embed = TimestepEmbedding(
            ch0, scale=cfg.gamma_scale if cfg.noise_conditioning == "gamma" else 1.0
        )
        emb_dim = self.time_embed.out_dim
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.palette_embed = (
            PaletteEmbedding(emb_dim, num_colors=cfg.palette_colors) if cfg.palette_colors else None
        )
        self.input_conv = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.groups, cfg.scale_shift)

        def attention(ch: int, level: int) -> SpatialAttention | None:
            if level not in cfg.attention_levels:
                return None
            return SpatialAttention(
                ch, heads=cfg.heads, context_dim=cfg.context_dim, groups=cfg.groups
            )

        self.down = nn.ModuleList()
        skips = [ch0]
        ch = ch0
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleDict({"res": res(ch, ch0 * mult)})
                ch = ch0 * mult
                if (attn := attention(ch, level)) is not None:
                    block["attn"] = attn
                self.down.append(block)
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(
                    nn.ModuleDict({"downsample": nn.Conv2d(ch, ch, 3, stride=2, padding=1)})
                )
                skips.append(ch)
        self._encoder_channels = tuple(skips)
        self.middle = nn.ModuleDict(
            {
                "res1": res(ch, ch),
                "attn": SpatialAttention(
                    ch, heads=cfg.heads, context_dim=cfg.context_dim, groups=cfg.groups
                ),
                "res2": res(ch, ch),
            }
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                block = nn.ModuleDict({"res": res(ch + skips.pop(), ch0 * mult)})
                ch = ch0 * mult
                if (attn := attention(ch, level)) is not None:
                    block["attn"] = attn
                if level > 0 and i == cfg.num_res_blocks:
                    block["upsample"] = nn.Conv2d(ch, ch, 3, padding=1)
                self.up.append(block)
        out_ch = cfg.out_channels * (2 if cfg.learned_variance else 1)
        final = nn.Conv2d(ch, out_ch, 3, padding=1)
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)  # type: ignore[arg-type]
        self.output = nn.Sequential(nn.GroupNorm(cfg.groups, ch), nn.SiLU(), final)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        palette: Tensor | None = None,
        palette_null: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        emb = self._embedding(x, t, class_labels, palette, palette_null, context)
        hs = self._encode(x, emb, context)
        h = hs[-1]
        h = self.middle["res1"](h, emb)
        h = self.middle["attn"](h, context)
        h = self.middle["res2"](h, emb)
        for block in self._blocks(self.up):
            h = block["res"](torch.cat([h, hs.pop()], dim=1), emb)
            if "attn" in block:
                h = block["attn"](h, context)
            if "upsample" in block:
                h = block["upsample"](
                    nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
                )
        out: Tensor = self.output(h)
        return out

    def encoder_features(
        self,
        x: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        palette: Tensor | None = None,
        palette_null: Tensor | None = None,
        context: Tensor | None = None,
    ) -> list[Tensor]:
        """The encoder's feature maps: the input convolution's output, then every down block's.

        Same arguments as :meth:`forward`; the middle and decoder are not run (ZeCon's
        ``forward_enc``, spec 7.5). Returns ``1 + len(self.down)`` tensors ``(B, C_l, H_l, W_l)``
        (``len(self.encoder_channels)``), shallow to deep.
        """
        emb = self._embedding(x, t, class_labels, palette, palette_null, context)
        return self._encode(x, emb, context)

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        """Channels ``C_l`` of the maps :meth:`encoder_features` returns."""
        return self._encoder_channels

    def _embedding(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None,
        palette: Tensor | None,
        palette_null: Tensor | None,
        context: Tensor | None,
    ) -> Tensor:
        """Checks the inputs; the ``(B, emb_dim)`` timestep (+ class, palette) embedding."""
        cfg = self.config
        check_tensor("x", x, ndim=4, floating=True, nonempty=True)
        check_input_dtype("x", x, self.input_conv.weight.dtype)
        B, C, H, W = x.shape
        if cfg.in_channels != C:
            raise InputValueError(
                f"x: expected {cfg.in_channels} channels (UNetConfig.in_channels), got {C}"
            )
        if H % cfg.downsampling or W % cfg.downsampling:
            raise InputValueError(
                f"x: expected height and width divisible by {cfg.downsampling}, got {H}x{W}"
            )
        check_batch_timesteps(t, x)
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise InputTypeError(f"t: expected real timesteps or noise levels, got dtype {t.dtype}")
        if cfg.noise_conditioning == "gamma":
            if not t.dtype.is_floating_point:
                raise InputTypeError(
                    f"t: a gamma-conditioned UNet expects noise levels in [0, 1] (floating), got "
                    f"dtype {t.dtype}; wrap it in imgdiff.conditioning.NoiseLevelConditioning to "
                    "sample"
                )
            # values are read on the CPU only: elsewhere that would synchronise every call
            if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
                got = (
                    "NaN"
                    if bool(t.isnan().any())
                    else f"values from {float(t.min())} to {float(t.max())}"
                )
                raise InputValueError(
                    f"t: a gamma-conditioned UNet expects noise levels in [0, 1], got {got} "
                    "(timesteps? wrap the UNet in imgdiff.conditioning.NoiseLevelConditioning to "
                    "sample)"
                )
        self._check_unused(
            class_labels=class_labels, palette=palette, palette_null=palette_null, context=context
        )
        emb: Tensor = self.time_embed(t)
        if self.class_embed is not None:
            if (
                not isinstance(class_labels, Tensor)
                or class_labels.shape != (B,)
                or not is_integer_dtype(class_labels.dtype)
            ):
                raise InputValueError(
                    f"class_labels: expected ({B},) integer labels in [0, {cfg.num_classes}] "
                    f"(the last is null) for a class-conditional UNet, got {describe(class_labels)}"
                )
            # values are read on the CPU only: elsewhere that would synchronise every call
            null = self.class_embed.num_embeddings - 1  # = num_classes, the null label
            if (
                class_labels.device.type == "cpu"
                and B
                and (int(class_labels.min()) < 0 or int(class_labels.max()) > null)
            ):
                raise InputValueError(
                    f"class_labels: expected labels in [0, {null}] (the last, {null}, is null), "
                    f"got values from {int(class_labels.min())} to {int(class_labels.max())}"
                )
            emb = emb + self.class_embed(class_labels)
        if self.palette_embed is not None:
            emb = emb + self.palette_embed(
                palette,
                palette_null,
                batch_size=B,
                null_name="palette_null",
            )
        if context is not None:
            check_context(context, x, cfg.context_dim)
            check_input_dtype("context", context, self.input_conv.weight.dtype)
        return emb

    def _encode(self, x: Tensor, emb: Tensor, context: Tensor | None) -> list[Tensor]:
        h: Tensor = self.input_conv(x)
        hs = [h]
        for block in self._blocks(self.down):
            if "downsample" in block:
                h = block["downsample"](h)
            else:
                h = block["res"](h, emb)
                if "attn" in block:
                    h = block["attn"](h, context)
            hs.append(h)
        return hs

    def _check_unused(self, **conditions: Tensor | None) -> None:
        cfg = self.config
        configured = {
            "class_labels": cfg.num_classes is not None,
            "palette": cfg.palette_colors is not None,
            "palette_null": cfg.palette_colors is not None,
            "context": cfg.context_dim is not None,
        }
        for name, value in conditions.items():
            if value is not None and not configured[name]:
                raise InputValueError(
                    f"{name}: this UNet was not configured for it (see UNetConfig); expected None, "
                    f"got {describe(value)}"
                )

    @staticmethod
    def _blocks(blocks: nn.ModuleList) -> list[nn.ModuleDict]:
        return [b for b in blocks if isinstance(b, nn.ModuleDict)]

    def config_dict(self) -> dict[str, object]:
        """The configuration as a plain dict (for checkpoints)."""
        return asdict(self.config)
