"""Finding torchvision's ImageNet backbone weights: a file, the torch hub cache, a download (internal).

The perceptual losses (:mod:`imgdiff.losses.perceptual`) need the ImageNet weights of a
torchvision backbone's ``features`` stack. :func:`load_backbone_state_dict` resolves them in this
order, without importing torchvision at ``import imgdiff``:

1. an explicit file (``weights_path=``), read with ``torch.load(weights_only=True)`` or safetensors;
2. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file name of the torchvision URL>``
   (``$TORCH_HOME/hub/checkpoints`` by default), where torchvision itself stores downloads;
3. unless offline (``offline=True``, or ``offline=None`` with ``HF_HUB_OFFLINE=1`` /
   ``TRANSFORMERS_OFFLINE=1``) and if the host answers a 3-second TCP probe, a download with
   ``torch.hub.load_state_dict_from_url`` into that cache.

Otherwise it raises :class:`~imgdiff.errors.WeightsUnavailableError`, listing what was looked for
and how to provide the file. Offline it fails without touching the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from imgdiff._checks import describe
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError

__all__ = [
    "BACKBONES",
    "Backbone",
    "backbone_weights_url",
    "features_state_dict",
    "hub_cache_file",
    "load_backbone_state_dict",
    "resolve_offline",
]

Backbone = Literal["alexnet", "vgg16", "vgg19", "squeezenet1_1"]
BACKBONES: tuple[Backbone, ...] = get_args(Backbone)

# torchvision's IMAGENET1K_V1 URLs, used when torchvision is not importable (VGGFeatures does not
# need it otherwise). tests/test_losses_perceptual.py checks them against torchvision.
_KNOWN_URLS: dict[Backbone, str] = {
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "squeezenet1_1": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
_FEATURE_KEY = re.compile(r"^(\d+)\.(.+)$")


def backbone_weights_url(name: Backbone) -> str:
    """The URL of torchvision's ImageNet (``IMAGENET1K_V1``, else ``DEFAULT``) weights of ``name``."""
    try:
        from torchvision.models import get_model_weights
    except ImportError:
        return _KNOWN_URLS[name]
    weights = get_model_weights(name)
    chosen = getattr(weights, "IMAGENET1K_V1", None) or weights.DEFAULT
    return str(chosen.url)


def hub_cache_file(name: Backbone) -> Path:
    """Where torchvision (and this module) caches the weights: ``<hub dir>/checkpoints/<file>``."""
    filename = os.path.basename(backbone_weights_url(name))
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_offline(offline: object) -> bool:
    """``offline`` as a bool; ``None`` reads ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``."""
    if offline is None:
        from imgdiff.clip.weights import _env_offline

        return _env_offline()
    if not isinstance(offline, bool):
        raise InputTypeError(f"offline: expected None or a bool, got {describe(offline)}")
    return offline


def _read_file(path: Path, argument: str | None) -> dict[str, Tensor]:
    """A state dict (name -> tensor) from a ``.safetensors`` file or a ``torch.save`` file."""
    where = f"{argument}: " if argument else ""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many kinds; the message is what matters
        message = (
            f"{where}could not read {str(path)!r} as a state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        if argument:
            raise InputValueError(message) from exc
        raise WeightsUnavailableError(
            message + "; the cached file may be a partial download: delete it and try again"
        ) from exc
    if isinstance(loaded, Mapping) and "state_dict" in loaded and len(loaded) == 1:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        message = (
            f"{where}expected {str(path)!r} to hold a state dict (a mapping from parameter "
            f"names to tensors), got {describe(loaded)}"
        )
        raise InputValueError(message) if argument else WeightsUnavailableError(message)
    return dict(loaded)


def features_state_dict(
    state: Mapping[str, Tensor], name: str, source: str, argument: str | None
) -> dict[str, Tensor]:
    """The ``features`` part of a torchvision state dict, keyed ``"<index>.<rest>"``.

    Accepts a whole-model state dict (keys ``features.<i>.weight``, ``classifier...``) or one of
    the ``features`` module alone (keys ``<i>.weight``).
    """
    prefixed = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    features = prefixed or dict(state)
    bad = [k for k in features if not _FEATURE_KEY.match(k)]
    if not features or bad:
        where = f"{argument}: " if argument else ""
        message = (
            f"{where}the state dict from {source} is not one of torchvision's {name} (expected "
            f"keys 'features.<index>.weight' or '<index>.weight'; got "
            f"{sorted(bad or state)[:5]}{' ...' if len(bad or state) > 5 else ''})"
        )
        raise InputValueError(message) if argument else WeightsUnavailableError(message)
    return features


def load_backbone_state_dict(
    name: Backbone,
    *,
    path: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    purpose: str = "",
) -> tuple[dict[str, Tensor], str]:
    """The ImageNet ``features`` state dict of torchvision's ``name`` and where it came from.

    Keys are ``"<module index>.<parameter>"`` (``"0.weight"``, ``"3.squeeze.bias"``, ...), as in
    ``torchvision.models.<name>().features.state_dict()``. ``purpose`` names the caller in error
    messages (``"LPIPSLoss(net='alex')"``). Raises :class:`WeightsUnavailableError` when the
    weights are in none of the places it looks, :class:`InputValueError` for a ``path`` that is
    not a usable file.
    """
    if name not in BACKBONES:
        raise InputValueError(f"name: expected one of {BACKBONES}, got {describe(name)}")
    is_offline = resolve_offline(offline)
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError(
                f"weights_path: expected None or a path (str or os.PathLike), got {describe(path)}"
            )
        file = Path(os.fspath(path)).expanduser()
        if file.is_dir():
            raise InputValueError(
                f"weights_path: expected a file with the state dict of torchvision's {name}, "
                f"got the directory {str(file)!r}"
            )
        if not file.is_file():
            raise WeightsUnavailableError(
                f"weights_path: no file at {str(file)!r} (the ImageNet weights of torchvision's "
                f"{name}{' for ' + purpose if purpose else ''}). Pass the path of an existing "
                f"file such as {os.path.basename(_KNOWN_URLS[name])} from "
                f"{_KNOWN_URLS[name]}, or weights_path=None to use the torch hub cache."
            )
        state = _read_file(file, "weights_path")
        return features_state_dict(state, name, repr(str(file)), "weights_path"), str(file)

    url = backbone_weights_url(name)
    cached = hub_cache_file(name)
    if cached.is_file():
        return features_state_dict(_read_file(cached, None), name, repr(str(cached)), None), str(
            cached
        )
    looked = [f"the torch hub cache file {cached} (from {url}): not there"]
    if not is_offline:
        from imgdiff.clip.weights import _reachable

        if _reachable(url, looked):
            try:
                state = torch.hub.load_state_dict_from_url(
                    url, map_location="cpu", progress=True, check_hash=True, weights_only=True
                )
            except Exception as exc:  # network and hash errors come in many kinds
                looked.append(f"download of {url}: {type(exc).__name__}: {exc}")
            else:
                return features_state_dict(state, name, url, None), url
    raise WeightsUnavailableError(
        _unavailable_message(name, purpose, url, cached, is_offline, looked)
    )


def _unavailable_message(
    name: str, purpose: str, url: str, cached: Path, offline: bool, looked: list[str]
) -> str:
    what = f"the ImageNet weights of torchvision's {name}" + (
        f" (for {purpose})" if purpose else ""
    )
    mode = (
        "offline (offline=True, or HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 with offline=None), "
        "so only the cache was searched"
        if offline
        else "online (cache, then download)"
    )
    lines = "\n".join(f"  - {item}" for item in looked)
    fail_fast = (
        ""
        if offline
        else " Set HF_HUB_OFFLINE=1 (or offline=True) to fail fast without trying the network."
    )
    return (
        f"{what} are not available; mode: {mode}.\n"
        f"Looked for:\n{lines}\n"
        f"To provide them: download {url} on a machine with network access, then either pass "
        f"weights_path='/path/to/{cached.name}', or put the file at {cached} (the torch hub cache "
        "is $TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch; set TORCH_HOME "
        f"to use another directory).{fail_fast}"
    )
