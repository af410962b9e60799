"""Finding and fetching CLIP weights: local caches first, fast clear failure offline (internal)."""

from __future__ import annotations

import os
import socket
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor

from imgdiff.errors import InputValueError, WeightsUnavailableError

Precision = Literal["fp32", "fp16", "bf16"]
_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "bf16")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_HF_BIN = "open_clip_pytorch_model.bin"  # open_clip's default file names on the Hugging Face hub
_HF_SAFE = "open_clip_model.safetensors"
_CONNECT_TIMEOUT_S = 3.0
# entries of OpenAI's TorchScript CLIP archives that are not weights (open_clip drops them too)
_TORCHSCRIPT_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
# open_clip's preference among the checkpoints of a local-dir folder (factory._find_checkpoint_in_dir)
_PREFERRED = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def _env_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator for the block (models are initialised on the CPU), then restore it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _resolve_pretrained(
    open_clip: ModuleType,
    arch: str,
    pretrained: str | os.PathLike[str],
    cache: str | None,
    offline: bool,
) -> tuple[str, dict[str, Any]]:
    """The checkpoint file for a tag or a path, and the create_model options the tag implies."""
    value = os.fspath(pretrained)
    tag_cfg: dict[str, Any] = {}
    if isinstance(
        pretrained, str
    ):  # a known tag wins over a file of the same name, as in open_clip
        tag_cfg = open_clip.get_pretrained_cfg(arch, value)
    if not tag_cfg:
        path = Path(value).expanduser()
        if path.is_file():
            return str(path), {}
        if path.is_dir():
            raise InputValueError(
                f"pretrained: expected a checkpoint file, got the directory {str(path)!r}; for a "
                "folder with open_clip_config.json use model_name='local-dir:<folder>'"
            )
        if isinstance(pretrained, os.PathLike) or _looks_like_path(value):
            raise WeightsUnavailableError(
                f"no checkpoint file at {str(path)!r} (pretrained for CLIP model {arch!r}). "
                "Pass the path of an existing .pt/.bin/.safetensors file, or an open_clip tag."
            )
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise InputValueError(
            f"pretrained: expected None, a path to a checkpoint file, or an open_clip tag for "
            f"{arch!r} (known tags: {tags or 'none'}), got {value!r}"
        )
    options: dict[str, Any] = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        "force_preprocess_cfg": {
            key: tag_cfg[key]
            for key in ("mean", "std", "interpolation", "resize_mode", "fill_color")
            if key in tag_cfg
        },
    }
    return _fetch_tag(open_clip, arch, value, tag_cfg, cache, offline), options


def _safe_alternatives(filename: str) -> list[str]:
    """The ``.safetensors`` files tried before a hub file ``filename``, as open_clip's
    ``download_pretrained_from_hf``: its default name's, or the same name for a ``.bin``/``.pth``."""
    if filename == _HF_BIN:
        return [_HF_SAFE]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _fetch_tag(
    open_clip: ModuleType,
    arch: str,
    tag: str,
    cfg: dict[str, Any],
    cache: str | None,
    offline: bool,
) -> str:
    """Find (caches first) or download the checkpoint of an open_clip tag, else raise."""
    looked: list[str] = []
    if cfg.get("file"):
        if os.path.isfile(cfg["file"]):
            return str(cfg["file"])
        looked.append(f"the file {cfg['file']}: not found")
    repo, hf_files = "", []
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or _HF_BIN
        hf_files = [*_safe_alternatives(filename), filename]
    url = cfg.get("url", "")
    url_file = Path(cache or "~/.cache/clip").expanduser() / os.path.basename(url) if url else None

    for filename in hf_files:  # 1. the caches, no network
        found = _hf_file(repo, filename, cache, local_only=True)
        if isinstance(found, Path):
            return str(found)
        looked.append(
            f"Hugging Face hub {repo}, file {filename}, in the cache {_hf_cache(cache)}: not there"
        )
    if url_file is not None:
        if url_file.is_file():
            return str(url_file)
        looked.append(f"{url} cached as {url_file}: not there")

    if not offline:  # 2. the network
        if hf_files and not _reachable(_hf_endpoint(), looked):
            hf_files = []
        for filename in hf_files:
            found = _hf_file(repo, filename, cache, local_only=False)
            if isinstance(found, Path):
                return str(found)
            looked.append(f"download of {repo}/{filename}: {found}")
            if found.startswith(("LocalEntryNotFoundError", "OfflineModeIsEnabled")):
                break  # no connection: the other file names would fail the same way
        if url and _reachable(url, looked):
            try:
                return str(open_clip.download_pretrained_from_url(url, cache_dir=cache))
            except Exception as exc:
                looked.append(f"download of {url}: {exc}")
    raise WeightsUnavailableError(_unavailable_message(arch, tag, cache, offline, looked))


def _is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds a ``constants.pkl`` record).

    That is torch's own test (``torch.serialization._is_torchscript_zip``); ``torch.save`` zips
    hold ``data.pkl`` and no ``constants.pkl``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in names)


def _torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor] | None:
    """The weights of a TorchScript archive, on the CPU, or ``None`` for any other file.

    OpenAI's CLIP files (the URL files of the ``"openai"`` tags, cached as
    ``~/.cache/clip/ViT-B-32.pt`` & co.) are TorchScript archives, which open_clip's
    ``torch.load(weights_only=True)`` refuses. They are read with ``torch.jit.load``
    (TorchScript's own reader, not Python's pickle) and converted as open_clip's
    ``load_openai_model`` does: the module's ``state_dict()``, less the non-weight entries
    ``input_resolution``, ``context_length`` and ``vocab_size``. The names are then those of
    open_clip's ``CLIP`` (OpenAI's layout).
    """
    if not _is_torchscript_archive(path):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated in torch >= 2.9
        module = torch.jit.load(os.fspath(path), map_location="cpu")  # type: ignore[no-untyped-call]
    state = {key: value for key, value in module.state_dict().items()}
    for key in _TORCHSCRIPT_NON_WEIGHTS:
        state.pop(key, None)
    return state


def _fetch_hf_repo(model_name: str, cache: str | None, offline: bool) -> str:
    """The local snapshot folder of an ``hf-hub:`` open_clip repo (config + weights), else raise."""
    repo = model_name.removeprefix("hf-hub:")
    looked: list[str] = []
    asked_offline = offline
    if not offline and not _reachable(_hf_endpoint(), looked):
        offline = True
    folder: Path | None = None
    for filename in ("open_clip_config.json", _HF_SAFE, _HF_BIN):
        found = _hf_file(repo, filename, cache, local_only=True)
        if not isinstance(found, Path) and not offline:
            found = _hf_file(repo, filename, cache, local_only=False)
        if isinstance(found, Path):
            if filename == "open_clip_config.json":
                folder = found.parent
            elif folder is not None and found.parent == folder:
                return str(folder)
        else:
            reason = "not there" if found.startswith("LocalEntryNotFoundError") else found
            looked.append(
                f"Hugging Face hub {repo}, file {filename}, in the cache {_hf_cache(cache)}: {reason}"
            )
    raise WeightsUnavailableError(
        _unavailable_message(model_name, None, cache, asked_offline, looked)
    )


def _local_dir_checkpoint(model_name: str, folder: Path) -> str:
    """The checkpoint open_clip will load from a ``local-dir:`` folder (its order of preference)."""
    config = folder / "open_clip_config.json"
    rank = {name: i for i, name in enumerate(_PREFERRED)}
    weights = sorted(
        (p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pth")),
        key=lambda p: (rank.get(p.name, len(rank)), p.suffix != ".safetensors", p.name),
    )
    if not config.is_file() or not weights:
        raise WeightsUnavailableError(
            f"the folder {str(folder)!r} (from model_name {model_name!r}) needs open_clip_config.json "
            f"and a checkpoint (.safetensors, .bin or .pth); found config: {config.is_file()}, "
            f"checkpoints: {[p.name for p in weights]}"
        )
    return str(weights[0])


def _hf_file(repo: str, filename: str, cache: str | None, *, local_only: bool) -> Path | str:
    """The cached/downloaded path of a hub file, or the reason it could not be had.

    ``local_only`` reads the cache alone: ``hf_hub_download(local_files_only=True)`` still builds
    request headers, and recent huggingface_hub (2.4 here) fetches an agent registry from the hub for them
    (a network connection, unless HF_HUB_OFFLINE was set before it was imported)."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return "huggingface_hub is not installed"
    if local_only:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        return Path(found) if isinstance(found, str) else "not there"
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache, local_files_only=local_only))
    except Exception as exc:  # huggingface_hub raises many kinds; the message is what matters
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _hf_cache(cache: str | None) -> str:
    if cache is not None:
        return cache
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
    return str(constants.HF_HUB_CACHE)


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def _reachable(url: str, looked: list[str]) -> bool:
    """Whether a TCP connection to ``url``'s host opens within a few seconds (True behind a proxy).

    Without this probe an unreachable hub costs ~25 s of huggingface_hub retries per file.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    if not host:
        return True
    try:
        socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        looked.append(f"network: {host}:{port} not reachable ({exc})")
        return False
    return True


def _unavailable_message(
    model_name: str, tag: str | None, cache: str | None, offline: bool, looked: list[str]
) -> str:
    what = f"CLIP model {model_name!r}" + (f" with pretrained={tag!r}" if tag is not None else "")
    mode = (
        "offline (offline=True or HF_HUB_OFFLINE=1), so only the caches were searched"
        if offline
        else "online (caches, then downloads)"
    )
    lines = "\n".join(f"  - {item}" for item in looked) or "  - nothing to look for"
    if tag is None:
        local = (
            "pass model_name='local-dir:/path/to/folder' (a folder holding open_clip_config.json "
            "and the checkpoint)"
        )
        example = f"load_clip({model_name!r}, cache_dir='DIR')"
    else:
        local = (
            "pass pretrained='/path/to/checkpoint.(pt|bin|safetensors)' (a local file for this "
            "architecture)"
        )
        example = f"load_clip({model_name!r}, {tag!r}, cache_dir='DIR')"
    return (
        f"the weights of the {what} are not available; mode: {mode}; cache_dir={cache!r}.\n"
        f"Looked for:\n{lines}\n"
        f"To provide them: {local}, or fill a cache directory on a machine with network access "
        f"({example}), copy it here and pass cache_dir='DIR'. Set HF_HUB_OFFLINE=1 (or "
        "offline=True) to fail fast without trying the network."
    )
