"""The CLIP text side: prompts to token-level context and pooled embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from imgdiff._checks import describe
from imgdiff.clip.model import LoadedCLIP, load_clip
from imgdiff.errors import InputTypeError, InputValueError

__all__ = ["CLIPTextEncoder", "TextEmbedding"]


@dataclass(frozen=True, eq=False)
class TextEmbedding:
    """Encoded prompts.

    Attributes:
        context: ``(B, L, d)`` token-level states, the cross-attention context.
        pooled: ``(B, d_embed)`` the pooled, projected text embedding (CLIP's ``encode_text``).
        tokens: ``(B, L)`` the token ids, or ``None``.
    """

    context: Tensor
    pooled: Tensor
    tokens: Tensor | None = None

    def __post_init__(self) -> None:
        for name, value, ndim in (("context", self.context, 3), ("pooled", self.pooled, 2)):
            if not isinstance(value, Tensor) or value.ndim != ndim:
                raise InputValueError(f"{name}: expected a {ndim}-d tensor, got {describe(value)}")
        if self.pooled.shape[0] != self.context.shape[0]:
            raise InputValueError(
                f"pooled: expected batch {self.context.shape[0]} (the context's), "
                f"got shape {tuple(self.pooled.shape)}"
            )
        if self.tokens is not None and (
            not isinstance(self.tokens, Tensor) or self.tokens.shape != self.context.shape[:2]
        ):
            raise InputValueError(
                f"tokens: expected None or shape {tuple(self.context.shape[:2])}, got {describe(self.tokens)}"
            )

    @property
    def batch_size(self) -> int:
        """``B``, the number of prompts embedded."""
        return int(self.context.shape[0])


@dataclass(frozen=True, eq=False)
class CLIPTextEncoder:
    """The text tower of a :class:`LoadedCLIP`: prompts -> :class:`TextEmbedding`.

    ``encode(prompts)`` runs without gradients and returns float32 tensors on the model's device.
    The token states are read by a forward hook on the final layer norm during ``encode_text``,
    so one model should not be encoded from several threads at once. Models whose text tower has
    no final layer norm over all tokens (Hugging Face text towers, CoCa) are refused at
    construction.
    """

    clip: LoadedCLIP

    def __post_init__(self) -> None:
        if not isinstance(self.clip, LoadedCLIP):
            raise InputTypeError(
                f"clip: expected a LoadedCLIP (see load_clip), got {describe(self.clip)}"
            )
        self._final_norm()

    @classmethod
    def load(
        cls,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> CLIPTextEncoder:
        """``CLIPTextEncoder(load_clip(model_name, pretrained, **kwargs))``."""
        return cls(load_clip(model_name, pretrained, **kwargs))

    def _final_norm(self) -> nn.Module:
        model = self.clip.model
        text = getattr(model, "text", None)
        norm = getattr(model, "ln_final", None)
        if norm is None:
            norm = getattr(text, "ln_final", None)
        if not isinstance(norm, nn.Module) or getattr(text, "cls_emb", None) is not None:
            raise InputValueError(
                f"clip: the text tower of {self.clip.model_name!r} has no final layer norm over all "
                "tokens (Hugging Face or CoCa text towers are not supported)"
            )
        return norm

    @property
    def context_length(self) -> int:
        """``L``, tokens per prompt."""
        return self.clip.context_length

    @property
    def width(self) -> int:
        """``d``, the width of the token states (768 for ViT-L/14, 512 for ViT-B/32)."""
        shape = getattr(self._final_norm(), "normalized_shape", None)
        if not shape:  # pragma: no cover - every open_clip text tower uses nn.LayerNorm
            raise InputValueError("clip: cannot read the text width from the final norm")
        return int(shape[-1])

    def encode(self, prompts: str | Sequence[str]) -> TextEmbedding:
        """Encode ``prompts`` (a string or a list of ``B`` strings) -> :class:`TextEmbedding`.

        ``context`` ``(B, L, d)`` and ``pooled`` ``(B, d_embed)``, float32, without gradients.
        """
        tokens = self.clip.tokenize(prompts)
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _args: Any, output: Tensor) -> None:
            captured.append(output)

        handle = self._final_norm().register_forward_hook(keep)
        try:
            with torch.no_grad():
                pooled = self.clip.model.encode_text(tokens)  # type: ignore[operator]
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].shape[:2] != tokens.shape:  # pragma: no cover
            raise InputValueError(
                f"clip: could not read the token states of {self.clip.model_name!r} "
                f"(final norm saw {[tuple(c.shape) for c in captured]})"
            )
        return TextEmbedding(context=captured[0].float(), pooled=pooled.float(), tokens=tokens)

    __call__ = encode
