"""Fused CPU kernels: ``cpu_kernels.c`` compiled on first use and called from Python.

One pass over memory per update (each input read once, each output written once), float32
arithmetic for float32 and bfloat16 storage, OpenMP threads (up to ``torch.get_num_threads()``,
16384 elements or more each; one thread calls no OpenMP at all). The torch path needs two to six
passes and as many dispatches for the same updates (``benchmarks/kernels.py``).

The kernels are built with the C compiler named by ``$CC`` (default ``cc``) into a cache folder
(``$IMGDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgdiff``, else ``~/.cache/imgdiff``), keyed by
the sources, compiler and flags; a build takes about a second and happens once per machine (and
Python version). Where this interpreter's headers (``Python.h``) are installed they are built as
a CPython extension module (``cpu_module.c``: a call costs ~0.05 us), else as a plain shared
library called through ctypes (~1.3 us a call); :func:`binding` says which. Without a working
compiler :func:`available` is ``False``, ``backend="auto"`` uses the torch path and
:func:`build_error` says why. ``IMGDIFF_CPU_KERNELS=0`` (or ``off``, ``false``, ``no``) turns the
kernels off, ``IMGDIFF_CPU_KERNELS=ctypes`` skips the extension module (another value turns them
off with a warning). ``$CC`` may carry arguments (``CC="ccache gcc"``); an unwritable cache folder
makes :func:`available` ``False`` with the reason in :func:`build_error`. bfloat16 outputs are stored with the
processor's AVX512-BF16 conversion where it has one (:func:`bf16_isa`;
``IMGDIFF_CPU_BF16_ISA=0`` turns that off).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from imgdiff._warnings import warn_user
from imgdiff.buffers import empty_like
from imgdiff.errors import PerformanceWarning
from imgdiff.kernels._layout import (
    MASK_BROADCAST_CONTIGUOUS,
    MASK_FULL,
    aligned,
    aligned_to,
    dense_alike,
    mask_operand,
    substep_mix_outputs,
)

__all__ = [
    "DTYPES",
    "Binding",
    "available",
    "bf16_isa",
    "binding",
    "build_error",
    "build_notes",
    "edict_substep_mix",
    "inpaint_blend",
    "library_path",
    "lincomb3",
    "mix_pair",
]

DTYPES = (torch.float32, torch.bfloat16)
"""Storage dtypes the CPU kernels take (others use the torch path)."""

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared")
_BUILD_TIMEOUT_S = 300

_MODULE_SOURCE = Path(__file__).with_name("cpu_module.c")
_EXT_SUFFIX = str(sysconfig.get_config_var("EXT_SUFFIX") or ".so")

_P, _F, _I64, _INT = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "lincomb3": [_P, _F, _P, _F, _P, _F, _P, _I64, _INT],
    "edict_mix": [_P, _P, _F, _F, _P, _P, _I64, _INT],
    "edict_substep_mix": [_P, _P, _P, _F, _F, _F, _F, _INT, _P, _P, _I64, _INT],
}
# one function per storage, mask storage (float32 or the storage's) and with or without noise
_BLEND_ARGTYPES = [_P, _P, _F, _P, _F, _P, _INT, _I64, _I64, _I64, _P, _INT]
_BLEND_VARIANTS = [
    f"inpaint_blend_{s}_{m}_{z}"
    for s, m in (("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16"))
    for z in ("z", "nz")
]
_ARGTYPES = {
    **{
        f"{name}_{suffix}": argtypes
        for name, argtypes in _SIGNATURES.items()
        for suffix in ("f32", "bf16")
    },
    **dict.fromkeys(_BLEND_VARIANTS, _BLEND_ARGTYPES),
}
_FUNCTION_NAMES = tuple(_ARGTYPES)


Binding = Literal["extension", "ctypes"]
"""How the kernels are called: a CPython extension module, or ctypes."""


@dataclass(frozen=True)
class _Library:
    path: Path
    functions: dict[str, Any]  # name -> callable taking the kernel's arguments in order
    threads: bool  # built with OpenMP (else one thread)
    binding: Binding
    bf16_isa: bool
    flags: tuple[str, ...]  # the entry of _FLAG_CHAIN it was built with
    clones_here: bool  # whether per-CPU versions are built on this platform and compiler


def _cache_dir() -> Path:
    explicit = os.environ.get("IMGDIFF_CACHE_DIR")
    if explicit:
        return Path(explicit) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "imgdiff" / "kernels"


def _compile(
    compiler: tuple[str, ...], flags: tuple[str, ...], source: Path, target: Path
) -> str | None:
    """Build ``target`` atomically; the compiler's complaint on failure, else ``None``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
    except OSError as exc:
        return (
            f"cannot write to {target.parent} ({exc}); set IMGDIFF_CACHE_DIR to a writable folder"
        )
    try:
        done = subprocess.run(
            [*compiler, *flags, str(source), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-2000:] or f"exit {done.returncode}"
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) cannot clash
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# OpenMP and per-CPU clones when the compiler has them (each fallback is its own build)
_FLAG_CHAIN: tuple[tuple[str, ...], ...] = (
    ("-fopenmp",),
    ("-fopenmp", "-DIMGDIFF_NO_CLONES"),
    (),
    ("-DIMGDIFF_NO_CLONES",),
)


@dataclass(frozen=True)
class _Builder:
    compiler: tuple[str, ...]  # the compiler's path, then any arguments $CC carries
    cache: Path

    def build(
        self, source: Path, flags: tuple[str, ...], tag: str, errors: list[str]
    ) -> Path | None:
        """``source`` built with ``flags`` into the cache (once per source, compiler, flags and
        ``tag``), or ``None`` with the reason appended to ``errors``."""
        cc = " ".join(self.compiler)
        parts = [_SOURCE.read_bytes(), source.read_bytes(), cc.encode(), " ".join(flags).encode()]
        key = hashlib.sha256(b"\0".join([*parts, platform.machine().encode(), tag.encode()]))
        stem, suffix = ("kernels", ".so") if source == _SOURCE else ("ext", _EXT_SUFFIX)
        target = self.cache / f"imgdiff_cpu_{stem}-{key.hexdigest()[:16]}{suffix}"
        if not target.exists():
            error = _compile(self.compiler, flags, source, target)
            if error is not None:
                errors.append(f"{cc} {' '.join(flags)} {source.name}: {error}")
                return None
        return target


def _load_extension(builder: _Builder, errors: list[str]) -> _Library | None:
    """The kernels as a CPython extension module, built against this interpreter's headers."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        errors.append(f"no Python.h in {include!r} (install the Python development headers)")
        return None
    tag = f"{sys.implementation.cache_tag} {_EXT_SUFFIX} {include}"
    for extra in _FLAG_CHAIN:
        flags = (*_BASE_FLAGS, *extra, f"-I{include}", f"-I{_SOURCE.parent}")
        target = builder.build(_MODULE_SOURCE, flags, tag, errors)
        if target is None:
            continue
        try:
            spec = importlib.util.spec_from_file_location("imgdiff_cpu_ext", target)
            if spec is None or spec.loader is None:
                raise ImportError(f"no loader for {target}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        functions = {name: getattr(module, name) for name in _FUNCTION_NAMES}
        threads, bf16 = bool(module.has_openmp()), bool(module.bf16_isa())
        here = bool(module.clones_here())
        return _Library(target, functions, threads, "extension", bf16, extra, here)
    return None


def _load_ctypes(builder: _Builder, errors: list[str]) -> _Library | None:
    """The kernels as a shared library called through ctypes."""
    for extra in _FLAG_CHAIN:
        target = builder.build(_SOURCE, (*_BASE_FLAGS, *extra), "ctypes", errors)
        if target is None:
            continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        functions = {}
        for name, argtypes in _ARGTYPES.items():
            fn = getattr(lib, f"imgdiff_{name}")
            fn.argtypes = argtypes
            fn.restype = None
            functions[name] = fn
        threads, bf16 = bool(lib.imgdiff_has_openmp()), bool(lib.imgdiff_bf16_isa())
        here = bool(lib.imgdiff_clones_here())
        return _Library(target, functions, threads, "ctypes", bf16, extra, here)
    return None


def _loaded() -> tuple[_Library | None, str | None]:
    """:func:`_load`'s result, after saying once per load what a fallback build lacks (outside
    the cache: under ``-W error`` the warning raises once and the kernels still load)."""
    result = _load()
    if _PENDING_WARNING:
        message = _PENDING_WARNING.pop()
        warn_user(message, PerformanceWarning)
    return result


@functools.cache
def _load() -> tuple[_Library | None, str | None]:
    _NOTES.clear()
    _PENDING_WARNING.clear()
    raw = os.environ.get("IMGDIFF_CPU_KERNELS", "")
    choice = raw.strip().lower()
    if choice in _OFF:
        return None, f"turned off by IMGDIFF_CPU_KERNELS={raw}"
    if choice not in _ON and choice != "ctypes":
        _PENDING_WARNING.append(
            f"IMGDIFF_CPU_KERNELS={raw!r} is none of {sorted(_OFF)} (off), 'ctypes' or "
            f"{sorted(_ON - {''})} (on): the CPU kernels stay off"
        )
        return None, f"IMGDIFF_CPU_KERNELS={raw!r} is not a known setting"
    if sys.platform == "win32":
        return None, "the CPU kernels are built with a POSIX C compiler; not on Windows"
    cc = os.environ.get("CC", "").strip() or "cc"
    try:
        argv = shlex.split(cc)  # $CC may carry arguments ("ccache gcc", "gcc -m64")
    except ValueError as exc:
        return None, f"CC={cc!r} cannot be split into a command ({exc})"
    compiler = shutil.which(argv[0]) if argv else None
    if compiler is None:
        return None, f"no C compiler found (looked for {cc!r}; set $CC)"
    try:
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)  # an existing read-only one may hold builds
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() without a home
        return None, (
            f"no folder for the built kernels ({type(exc).__name__}: {exc}); set "
            "IMGDIFF_CACHE_DIR to a writable folder"
        )
    builder = _Builder((compiler, *argv[1:]), cache)
    errors: list[str] = []
    lib = None if choice == "ctypes" else _load_extension(builder, errors)
    lib = lib or _load_ctypes(builder, errors)
    if lib is None:
        return None, "; ".join(errors)
    _NOTES.extend(_shortfalls(lib, asked_ctypes=choice == "ctypes"))
    if _NOTES:
        _PENDING_WARNING.append(
            f"imgdiff's CPU kernels are built {'; '.join(_NOTES)}. They work, only slower; "
            f"the build said: {'; '.join(errors)[-600:]}"
        )
    return lib, None


def _shortfalls(lib: _Library, *, asked_ctypes: bool) -> list[str]:
    """What the loaded build lacks that the first of :data:`_FLAG_CHAIN` has, each with its
    cost."""
    notes = []
    if not lib.threads:
        notes.append("without OpenMP (one thread)")
    if lib.clones_here and "-DIMGDIFF_NO_CLONES" in lib.flags:
        notes.append("without per-CPU versions (baseline instructions: bfloat16 up to 1.8x slower)")
    if lib.binding == "ctypes" and not asked_ctypes:
        notes.append("as a plain library called through ctypes (~1.3 us a call)")
    return notes


_OFF = frozenset({"0", "off", "false", "no"})
_ON = frozenset({"", "1", "on", "true", "yes"})

_NOTES: list[str] = []
"""What the loaded build lacks (:func:`build_notes`)."""
_PENDING_WARNING: list[str] = []
"""The warning :func:`_loaded` gives once after a load that found a shortfall."""


def build_notes() -> tuple[str, ...]:
    """What the loaded kernels lack against the best build, each with its cost: no OpenMP (the
    compiler has none), no per-CPU versions, the ctypes binding (no ``Python.h``); empty when
    nothing is missing or the kernels are not available. A :class:`PerformanceWarning` says the
    same, with the compiler's complaints, when the kernels load."""
    _loaded()
    return tuple(_NOTES)


def available() -> bool:
    """Whether the CPU kernels are built and loaded (builds them on the first call)."""
    return _loaded()[0] is not None


def build_error() -> str | None:
    """Why the CPU kernels are not available (``None`` when they are)."""
    return _loaded()[1]


def binding() -> Binding | None:
    """How the loaded kernels are called (``None`` when they are not available)."""
    lib = _loaded()[0]
    return None if lib is None else lib.binding


def bf16_isa() -> bool:
    """Whether the loaded kernels store bfloat16 with the processor's AVX512-BF16 conversion
    (x86-64 with GCC 11 or later, on processors that have it; ``IMGDIFF_CPU_BF16_ISA=0`` turns it
    off), rather than with the portable rounding code. Both round to nearest even; the instruction
    reads values below bfloat16's normal range as zero."""
    lib = _loaded()[0]
    return lib is not None and lib.bf16_isa


def library_path() -> Path | None:
    """The loaded shared library, if any."""
    lib = _loaded()[0]
    return None if lib is None else lib.path


def _library() -> _Library:
    lib, error = _loaded()
    if lib is None:
        raise RuntimeError(f"imgdiff CPU kernels unavailable: {error}")
    return lib


def _threads(lib: _Library) -> int:
    # an OpenMP team created before a fork() is unusable in the child (and torch's libgomp may
    # have made one): run single-threaded in any forked child
    if not lib.threads or _FORKED:
        return 1
    return torch.get_num_threads()


_FORKED = False
"""Set in a forked child (cheaper than comparing process ids on every call)."""


def _mark_forked() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, "register_at_fork"):  # POSIX; the kernels are not built elsewhere
    os.register_at_fork(after_in_child=_mark_forked)


# kernel names per storage dtype (and, for the blend, mask storage and noise): no string
# formatting per call
_LINCOMB3 = {dtype: f"lincomb3_{suffix}" for dtype, suffix in _SUFFIX.items()}
_EDICT_MIX = {dtype: f"edict_mix_{suffix}" for dtype, suffix in _SUFFIX.items()}
_SUBSTEP_MIX = {dtype: f"edict_substep_mix_{suffix}" for dtype, suffix in _SUFFIX.items()}
_BLEND = {
    (dtype, mask_f32, has_noise): (
        f"inpaint_blend_{suffix}_{'f32' if mask_f32 else suffix}_{'z' if has_noise else 'nz'}"
    )
    for dtype, suffix in _SUFFIX.items()
    for mask_f32 in (True, False)
    for has_noise in (True, False)
}


def lincomb3(
    x: Tensor,
    a: float,
    y: Tensor,
    b: float,
    noise: Tensor | None = None,
    c: float = 0.0,
    *,
    in_place: bool = False,
) -> Tensor:
    """``a x + b y + c noise`` in one pass: ``x``, ``y``, ``noise`` ``(B, ...)`` of one shape, float32
    or bfloat16 CPU tensors (``y``, ``noise`` converted to ``x``'s dtype); a new ``(B, ...)``, or
    ``x`` itself overwritten with ``in_place`` (where ``x`` is dense)."""
    lib = _library()
    z = noise if c != 0.0 else None  # as the reference: c = 0 reads no noise (nor its infs)
    if not dense_alike(x, y, z, cast=True):  # the common case skips aligned's work
        fmt, x, (y,) = aligned(x, y, cast=True)
        z = None if z is None else aligned_to(z, x, fmt, cast=True)
    out = x if in_place else empty_like(x)
    lib.functions[_LINCOMB3[x.dtype]](
        x.data_ptr(),
        a,
        y.data_ptr(),
        b,
        None if z is None else z.data_ptr(),
        c,
        out.data_ptr(),
        x.numel(),
        _threads(lib),
    )
    return out


def mix_pair(u: Tensor, v: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """EDICT's mixing pair in its general form, ``u' = alpha u + beta v`` then
    ``v' = alpha v + beta u'``, in one pass, for ``u``, ``v`` ``(B, ...)``; two new tensors of
    ``u``'s shape and dtype (see :func:`imgdiff.kernels.fused_edict_mix` for the weights)."""
    lib = _library()
    if not dense_alike(u, v, cast=True):
        _, u, (v,) = aligned(u, v, cast=True)
    u_out, v_out = empty_like(u), empty_like(u)
    lib.functions[_EDICT_MIX[u.dtype]](
        u.data_ptr(),
        v.data_ptr(),
        alpha,
        beta,
        u_out.data_ptr(),
        v_out.data_ptr(),
        u.numel(),
        _threads(lib),
    )
    return u_out, v_out


def edict_substep_mix(
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    a: float,
    b: float,
    p: float,
    update_x: bool,
    c: float = 0.0,
    *,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """EDICT's second sub-step (``x`` or ``y`` becomes ``a z + b eps + c w``, ``w`` the other one)
    and mixing pair in one pass, for ``x``, ``y``, ``eps`` ``(B, ...)``; two new tensors of
    ``x``'s shape and dtype, or with ``in_place`` the sequence the sub-step does not move (``y``
    with ``update_x``, else ``x``) overwritten with its mixed value (where it is laid out as
    ``x``) and one new tensor."""
    lib = _library()
    if not dense_alike(x, y, eps, cast=True):
        _, x, (y, eps) = aligned(x, y, eps, cast=True)
    x_out, y_out = substep_mix_outputs(x, y, update_x, in_place, empty_like)
    lib.functions[_SUBSTEP_MIX[x.dtype]](
        x.data_ptr(),
        y.data_ptr(),
        eps.data_ptr(),
        a,
        b,
        c,
        p,
        update_x,
        x_out.data_ptr(),
        y_out.data_ptr(),
        x.numel(),
        _threads(lib),
    )
    return x_out, y_out


def inpaint_blend(
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    *,
    known_scale: float = 1.0,
    noise: Tensor | None = None,
    noise_scale: float = 0.0,
    into_noise: bool = False,
) -> Tensor:
    """``(1 - m) x + m (known_scale known + noise_scale noise)`` in one pass.

    ``x``, ``known``, ``noise``: ``(B, C, ...)``; ``mask``: ``x``'s shape or ``(B, 1, ...)``,
    float32 or ``x``'s dtype (others are converted to float32). A new tensor, or with
    ``into_noise`` ``noise`` itself overwritten (where it is laid out as ``x``, in its dtype, and
    ``noise_scale`` is not 0).
    """
    lib = _library()
    z = None if noise_scale == 0.0 else noise
    fmt = torch.contiguous_format
    if not dense_alike(x, known, z, cast=True):
        fmt, x, (known,) = aligned(x, known, cast=True)
        z = None if z is None else aligned_to(z, x, fmt, cast=True)
    if mask.dtype not in (torch.float32, x.dtype):
        mask = mask.to(torch.float32)
    m, mode = mask_operand(mask, x, fmt)
    # how the mask broadcasts: channels for modes 1 and 2, the plane for mode 1 (where x is
    # contiguous with C > 1, so dim 1's stride is the plane)
    channels = 1 if mode == MASK_FULL else x.shape[1]
    plane = x.stride(1) if mode == MASK_BROADCAST_CONTIGUOUS else 1
    out = z if into_noise and z is not None else empty_like(x)
    lib.functions[_BLEND[x.dtype, m.dtype == torch.float32, z is not None]](
        x.data_ptr(),
        known.data_ptr(),
        known_scale,
        None if z is None else z.data_ptr(),
        noise_scale,
        m.data_ptr(),
        mode,
        x.numel(),
        channels,
        plane,
        out.data_ptr(),
        _threads(lib),
    )
    return out
