"""Training checkpoints in safetensors, written atomically (a crash never leaves a torn file)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from imgdiff._checks import describe
from imgdiff.errors import ImgdiffError, InputTypeError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ImgdiffError, RuntimeError):
    """A checkpoint file is missing, unreadable or not one imgdiff wrote."""


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` (flat name -> tensor) and JSON-able ``metadata`` to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk, then renamed over
    ``path`` (``os.replace``), so readers see either the old or the new checkpoint.
    """
    from safetensors.torch import save_file

    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise InputTypeError(f"tensors[{name!r}]: expected a tensor, got {describe(value)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    contiguous = _unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={"imgdiff": json.dumps(dict(metadata))})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0o600 -> what open() would have given
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    return out


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy every tensor whose memory an earlier one shares (tied weights): safetensors refuses
    to write shared memory, and a load then fills the tied parameter twice with equal values."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, value in tensors.items():
        key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        out[name] = value.clone() if key in seen else value
        seen.add(key)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, metadata)``."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"path: no checkpoint at {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API
    except Exception as exc:
        raise CheckpointError(
            f"path: {str(p)!r} is not a readable safetensors checkpoint ({exc})"
        ) from exc
    if "imgdiff" not in meta:
        raise CheckpointError(
            f"path: {str(p)!r} has no imgdiff metadata; not a checkpoint written by imgdiff"
        )
    return tensors, json.loads(meta["imgdiff"])
