"""CLIP encoders on open_clip: a loader that fails fast and clearly offline, and the text side.

:func:`load_clip` builds an open_clip model from an architecture name and, optionally, pretrained
weights given as an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...) or a local
checkpoint file. It looks in the local caches first and only then (unless offline) downloads;
when the weights cannot be had it raises :class:`WeightsUnavailableError`, which lists every
place it looked and how to provide the weights. ``pretrained=None`` gives random weights (tests).

:class:`CLIPTextEncoder` turns prompts into a :class:`TextEmbedding`: the token-level context
``(B, L, d)`` for cross-attention (the text transformer's last hidden states after its final
layer norm, as Stable Diffusion 1.x uses, spec 8.4) and the pooled, projected embedding
``(B, d_embed)`` that ``encode_text`` returns, both float32.

:class:`CLIPEncoder` is both towers for losses: images in ``[-1, 1]`` are preprocessed
differentiably inside (resize or pool to the model's size, CLIP normalisation), prompts can be
averaged over templates, embeddings are float32.

open_clip (the ``clip`` extra) is imported inside the functions: ``import imgdiff`` never loads it.
"""

from imgdiff.clip.encoder import IMAGENET_TEMPLATES, CLIPEncoder, Resize
from imgdiff.clip.model import LoadedCLIP, load_clip, register_clip_config, tiny_clip_config
from imgdiff.clip.text import CLIPTextEncoder, TextEmbedding
from imgdiff.errors import WeightsUnavailableError

__all__ = [
    "IMAGENET_TEMPLATES",
    "CLIPEncoder",
    "CLIPTextEncoder",
    "LoadedCLIP",
    "Resize",
    "TextEmbedding",
    "WeightsUnavailableError",
    "load_clip",
    "register_clip_config",
    "tiny_clip_config",
]
