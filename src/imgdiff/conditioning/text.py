"""Text conditioning: prompts -> the keyword tensors of a cross-attention model, with a cached null.

A text-conditioned network in imgdiff's contract is called ``model(x, t, context=c)`` with ``c``
the token-level text states ``(B, L, d)`` its cross-attention layers attend to (spec 8.4).
:class:`TextConditioning` makes those keyword arguments from prompts through a text encoder (e.g.
:class:`imgdiff.clip.CLIPTextEncoder`), and the unconditional ones, the embedding of the empty
prompt "" (or of a negative prompt), for classifier-free guidance (spec 8.2), computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from imgdiff._checks import describe
from imgdiff.clip import TextEmbedding
from imgdiff.clip.model import as_prompts
from imgdiff.conditioning.cfg import ClassifierFreeGuidance
from imgdiff.errors import InputTypeError, InputValueError
from imgdiff.models import Model

__all__ = ["TextConditioning", "TextEncoder"]


class TextEncoder(Protocol):
    """Anything with ``encode(prompts) -> TextEmbedding`` (e.g. :class:`imgdiff.clip.CLIPTextEncoder`)."""

    def encode(self, prompts: Sequence[str]) -> TextEmbedding: ...


@dataclass(frozen=True, eq=False)
class TextConditioning:
    """Prompts -> model keyword conditions ``{key: context (B, L, d)}``, and the null condition.

    Args:
        encoder: the text encoder.
        key: the keyword under which the model takes the token states (``"context"``).
        pooled_key: if set, the pooled embedding ``(B, d_embed)`` is passed under this keyword too
            (for networks that add it to the timestep embedding).
        null_prompt: the unconditional prompt: ``""`` (classifier-free guidance as trained), or a
            negative prompt.

    ``conditioning(prompts)`` returns a new dict of float32 tensors on the encoder's device;
    ``conditioning.null()`` the same for ``null_prompt`` with batch 1, encoded on first use and
    cached (the tensors are shared between calls; do not modify them in place).
    ``conditioning.guidance(model, scale)`` wraps ``model`` into
    :class:`imgdiff.ClassifierFreeGuidance` with that null.
    """

    encoder: TextEncoder
    key: str = "context"
    pooled_key: str | None = None
    null_prompt: str = ""
    _null_cache: dict[str, dict[str, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(getattr(self.encoder, "encode", None)):
            raise InputTypeError(
                f"encoder: expected an object with encode(prompts) -> TextEmbedding, "
                f"got {describe(self.encoder)}"
            )
        for name, value in (("key", self.key), ("pooled_key", self.pooled_key)):
            if value is None and name == "pooled_key":
                continue
            if not isinstance(value, str) or not value.isidentifier():
                raise InputValueError(
                    f"{name}: expected a keyword-argument name, got {describe(value)}"
                )
        if self.pooled_key == self.key:
            raise InputValueError(
                f"pooled_key: expected a keyword different from key ({self.key!r}), "
                f"got {self.pooled_key!r}"
            )
        if not isinstance(self.null_prompt, str):
            raise InputTypeError(
                f"null_prompt: expected a string, got {describe(self.null_prompt)}"
            )

    def __call__(self, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        """``{key: (B, L, d)}`` (and ``{pooled_key: (B, d_embed)}``) for ``B`` prompts."""
        batch = as_prompts("prompts", prompts)
        return self._conditions(self.encoder.encode(batch), len(batch))

    def null(self) -> dict[str, Tensor]:
        """The unconditional keywords, batch 1: the encoding of ``null_prompt`` (cached)."""
        cached = self._null_cache.get("null")
        if cached is None:
            cached = self._conditions(self.encoder.encode([self.null_prompt]), 1)
            self._null_cache["null"] = cached
        return dict(cached)

    def guidance(self, model: Model, scale: float, **kwargs: Any) -> ClassifierFreeGuidance:
        """``ClassifierFreeGuidance(model, scale, null=self.null(), **kwargs)``."""
        return ClassifierFreeGuidance(model, scale, self.null(), **kwargs)

    def _conditions(self, embedding: object, batch: int) -> dict[str, Tensor]:
        if not isinstance(embedding, TextEmbedding):
            raise InputTypeError(
                f"encoder: expected encode() to return a TextEmbedding, got {describe(embedding)}"
            )
        if embedding.batch_size != batch:
            raise InputValueError(
                f"encoder: expected an embedding of batch {batch} (one per prompt), "
                f"got {embedding.batch_size}"
            )
        out = {self.key: embedding.context}
        if self.pooled_key is not None:
            out[self.pooled_key] = embedding.pooled
        return out
