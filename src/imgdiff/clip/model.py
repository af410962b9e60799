"""Building open_clip models with optional pretrained weights (see :func:`load_clip`)."""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from imgdiff._checks import check_choice, check_seed, describe
from imgdiff.clip.weights import (
    _env_offline,
    _fetch_hf_repo,
    _local_dir_checkpoint,
    _resolve_pretrained,
    _seeded,
    _torchscript_state_dict,
)
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError

__all__ = ["LoadedCLIP", "as_prompts", "load_clip", "register_clip_config", "tiny_clip_config"]


Precision = Literal["fp32", "fp16", "bf16"]
_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "bf16")


def tiny_clip_config() -> dict[str, Any]:
    """A tiny open_clip architecture (32-d embeddings, one layer per tower, 32 px images).

    It keeps CLIP's tokenizer (vocabulary 49408, context 77), so prompts tokenize as for the real
    models; random weights build in milliseconds. For tests and examples, after
    :func:`register_clip_config`.
    """
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 64,
            "head_width": 32,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }


def _open_clip() -> ModuleType:
    """open_clip, imported on first use (never at ``import imgdiff``)."""
    try:
        return importlib.import_module("open_clip")
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise ImportError(
            "imgdiff.clip needs open_clip_torch: pip install 'imgdiff[clip]'"
        ) from exc


def register_clip_config(name: str, config: dict[str, Any]) -> None:
    """Make an open_clip architecture ``config`` available to :func:`load_clip` as ``name``.

    ``config`` is an open_clip model config (keys ``embed_dim``, ``vision_cfg``, ``text_cfg``),
    e.g. :func:`tiny_clip_config`. Registering the same config twice is a no-op; a different
    config under a name already known to open_clip (a built-in one included) is refused.
    """
    if not isinstance(name, str) or not name or "/" in name or ":" in name:
        raise InputValueError(
            f"name: expected a non-empty architecture name without '/' or ':', got {describe(name)}"
        )
    if not isinstance(config, dict):
        raise InputTypeError(f"config: expected a dict, got {describe(config)}")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise InputValueError(
            f"config: expected the keys embed_dim, vision_cfg, text_cfg; missing {missing}"
        )
    try:
        normalised = json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise InputValueError(f"config: expected a JSON-serialisable dict ({exc})") from exc
    open_clip = _open_clip()
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing == normalised:
            return
        raise InputValueError(
            f"name: open_clip already has a different architecture called {name!r}; pick another name"
        )
    # open_clip's public registry API reads JSON files; the registry keeps the entry afterwards.
    with tempfile.TemporaryDirectory(prefix="imgdiff-clip-") as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(normalised))
        open_clip.add_model_config(path)
    if open_clip.get_model_config(name) is None:  # pragma: no cover - open_clip API change
        raise RuntimeError(f"open_clip did not register the architecture {name!r}")


@dataclass(frozen=True, eq=False)
class LoadedCLIP:
    """An open_clip model in eval mode with frozen parameters, and its tokenizer.

    Gradients still flow to the inputs (for CLIP losses); the parameters do not require them.

    Attributes:
        model: the open_clip model (``encode_text``, ``encode_image``, ...).
        tokenizer: prompts -> ``(B, context_length)`` int64 token ids (open_clip's tokenizer).
        model_name: the architecture name as given.
        pretrained: the tag or path asked for (``None`` for random weights).
        checkpoint: the file the weights were loaded from (``None`` for random weights).
    """

    model: nn.Module
    tokenizer: Callable[..., Tensor]
    model_name: str
    pretrained: str | None = None
    checkpoint: str | None = None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Tokens per prompt ``L`` (77 for the CLIP models)."""
        return int(getattr(self.model, "context_length", 0) or self.tokenizer.context_length)  # type: ignore[attr-defined]

    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        """``(B, L)`` int64 token ids on the model's device (long prompts are truncated)."""
        return self.tokenizer(as_prompts("prompts", prompts)).to(self.device)


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    precision: Precision = "fp32",
    seed: int | None = None,
) -> LoadedCLIP:
    """Build an open_clip model, with pretrained weights if asked, frozen and in eval mode.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``, ``"ViT-L-14"``, one registered with
            :func:`register_clip_config`), ``"local-dir:/path"`` (a folder with
            ``open_clip_config.json`` and a checkpoint) or ``"hf-hub:org/repo"``.
        pretrained: ``None`` for random weights; an open_clip tag (``"openai"``,
            ``"laion2b_s34b_b79k"``, see ``open_clip.list_pretrained()``); or a path to a
            checkpoint file (``.pt``, ``.bin``, ``.safetensors``). Must be ``None`` with a
            ``local-dir:`` or ``hf-hub:`` name.
        device: where the model goes.
        cache_dir: where downloads are looked for and stored (default: the Hugging Face cache
            for hub files, ``~/.cache/clip`` for URL files, as open_clip does).
        offline: never touch the network; ``None`` reads ``HF_HUB_OFFLINE`` /
            ``TRANSFORMERS_OFFLINE`` at call time.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (open_clip's mixed precision).
        seed: seeds the random initialisation (without touching the global generator).

    Tags whose weights were trained with QuickGELU (the OpenAI ones) get QuickGELU activations.
    Without network the weights come only from the caches or a path; when they cannot be found
    a :class:`WeightsUnavailableError` lists where it looked. Before downloading, the host is
    probed with a 3-second connection, so an unreachable network fails in seconds.
    """
    if not isinstance(model_name, str):
        raise InputTypeError(f"model_name: expected a string, got {describe(model_name)}")
    if not model_name:
        raise InputValueError("model_name: expected an open_clip architecture name, got ''")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise InputTypeError(
            f"pretrained: expected None, a tag or a checkpoint path, got {describe(pretrained)}"
        )
    if isinstance(pretrained, str) and not pretrained:
        raise InputValueError("pretrained: expected None, a tag or a checkpoint path, got ''")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise InputTypeError(f"cache_dir: expected None or a path, got {describe(cache_dir)}")
    if offline is not None and not isinstance(offline, bool):
        raise InputTypeError(f"offline: expected None or a bool, got {describe(offline)}")
    precision = check_choice("precision", precision, _PRECISIONS)
    if seed is not None:
        seed = check_seed("seed", seed)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputValueError(f"device: expected a torch device, got {describe(device)}") from exc
    cache = None if cache_dir is None else os.fspath(cache_dir)
    is_offline = _env_offline() if offline is None else offline

    open_clip = _open_clip()
    name = model_name
    checkpoint: str | None = None
    kwargs: dict[str, Any] = {}
    if model_name.startswith(("local-dir:", "hf-hub:")):
        if pretrained is not None:
            raise InputValueError(
                f"pretrained: expected None with model_name {model_name!r} (the weights come from "
                f"there), got {describe(os.fspath(pretrained))}"
            )
        if model_name.startswith("hf-hub:"):
            name = "local-dir:" + _fetch_hf_repo(model_name, cache, is_offline)
        folder = Path(name.removeprefix("local-dir:"))
        checkpoint = _local_dir_checkpoint(model_name, folder)
    else:
        arch = model_name.replace("/", "-")
        if open_clip.get_model_config(arch) is None:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
            raise InputValueError(
                f"model_name: expected an open_clip architecture (open_clip.list_models(), or one "
                f"added with register_clip_config), got {model_name!r}; close names: {close}"
            )
        name = arch
        if pretrained is not None:
            checkpoint, kwargs = _resolve_pretrained(open_clip, arch, pretrained, cache, is_offline)
    try:
        # a checkpoint file for open_clip to load; OpenAI's TorchScript files (the "openai"
        # tags' URL files), which open_clip's torch.load(weights_only=True) refuses, are read here
        file = None if name.startswith("local-dir:") else checkpoint
        scripted = None if file is None else _torchscript_state_dict(file)
        with _seeded(seed), _no_random_init_warning(scripted is not None):
            model = open_clip.create_model(
                name,
                pretrained=file if scripted is None else None,
                precision=precision,
                device=dev,
                cache_dir=cache,
                pretrained_image=False,
                pretrained_text=False,
                **kwargs,
            )
        if scripted is not None:
            _load_openai_state_dict(model, scripted)
    except pickle.UnpicklingError as exc:
        if checkpoint is None:
            raise
        raise WeightsUnavailableError(
            f"the checkpoint {checkpoint} could not be read with torch.load(weights_only=True) "
            f"({_unpickler_detail(exc)}): the file is corrupt, or it pickles more than tensors. "
            "imgdiff never unpickles arbitrary objects; re-save a checkpoint you trust as a state "
            "dict (torch.save(model.state_dict(), path)) or as .safetensors."
        ) from exc
    except Exception as exc:
        if checkpoint is None:
            raise
        raise WeightsUnavailableError(
            f"the checkpoint {checkpoint} could not be loaded into the CLIP model {model_name!r}: "
            f"{exc}. Check that it was saved for this architecture (model_name)."
        ) from exc
    model.eval().requires_grad_(False)
    try:
        extra = (
            {} if cache is None else {"cache_dir": cache}
        )  # only used by Hugging Face tokenizers
        tokenizer = open_clip.get_tokenizer(name, **extra)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"the tokenizer of the CLIP model {model_name!r} could not be built: {exc}"
        ) from exc
    label = None if pretrained is None else os.fspath(pretrained)
    return LoadedCLIP(model, tokenizer, model_name, label, checkpoint)


def _unpickler_detail(exc: pickle.UnpicklingError) -> str:
    """The reason in torch's weights-only refusal, without its advice to unpickle anyway."""
    text = str(exc)
    _, found, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in after.splitlines() if line.strip()] if found else []
    return lines[0] if lines else type(exc).__name__


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def _no_random_init_warning(active: bool) -> Iterator[None]:
    """Silence open_clip's "initialized randomly" warning while weights are loaded afterwards."""
    if not active:
        yield
        return
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _load_openai_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load the weights of a TorchScript CLIP (OpenAI's layout) into ``model``, strictly.

    As open_clip's ``load_checkpoint``: the text tower moves under ``text.`` for models that keep
    it there (``CustomTextCLIP``); a scalar ``logit_scale`` takes the model's shape. Entries that
    are the model's non-persistent buffers (a scripted open_clip model saves its ``attn_mask``)
    are computed by the model, not loaded. Values are cast to the model's dtypes (OpenAI's files
    are mostly float16); any other missing or unexpected key is an error.
    """
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        convert = importlib.import_module("open_clip.model").convert_to_custom_text_state_dict
        state = convert(state)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, Tensor) and "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(scale.shape)
    # a scripted module also saves its non-persistent buffers (open_clip's attn_mask): computed
    # by the model itself, not weights
    saved = model.state_dict().keys()
    computed = {key for key, _ in model.named_buffers() if key not in saved}
    model.load_state_dict({k: v for k, v in state.items() if k not in computed}, strict=True)


def as_prompts(name: str, prompts: object) -> list[str]:
    """A list of strings from one string or a non-empty sequence of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise InputTypeError(
            f"{name}: expected a string or a list of strings, got {describe(prompts)}"
        )
    if len(prompts) == 0:
        raise InputValueError(f"{name}: expected at least one prompt, got an empty sequence")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputTypeError(f"{name}[{i}]: expected a string, got {describe(p)}")
    return list(prompts)


# --------------------------------------------------------------------------------------------
# Loading
