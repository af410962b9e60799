"""The imgdiff error hierarchy.

Every error raised for bad input is a subclass of both :class:`ImgdiffError` and the built-in
``ValueError`` or ``TypeError``, so ``except ValueError`` keeps working while
``except imgdiff.ImgdiffError`` catches only what imgdiff raised. Messages name the argument,
what was expected and what came.
"""

from __future__ import annotations

__all__ = [
    "GraphCaptureError",
    "ImgdiffError",
    "ImgdiffWarning",
    "InputTypeError",
    "InputValueError",
    "PerformanceWarning",
    "PrecisionWarning",
    "WeightsUnavailableError",
]


class ImgdiffError(Exception):
    """Base class of all errors raised by imgdiff."""


class InputValueError(ImgdiffError, ValueError):
    """An argument has the right type but a wrong value, shape, range or size."""


class InputTypeError(ImgdiffError, TypeError):
    """An argument has the wrong type or dtype."""


class ImgdiffWarning(UserWarning):
    """Base class of the warnings imgdiff issues."""


class PrecisionWarning(ImgdiffWarning):
    """A configuration that works but loses precision the user may rely on (e.g. EDICT in float32)."""


class PerformanceWarning(ImgdiffWarning):
    """A configuration that works but runs slower than it could (e.g. the CPU kernels built
    without OpenMP, where the compiler lacks it)."""


class WeightsUnavailableError(ImgdiffError, RuntimeError):
    """Pretrained weights (or the files describing them) could not be found locally or fetched."""


class GraphCaptureError(ImgdiffError, RuntimeError):
    """A sampling loop could not be recorded as a CUDA graph (something in it is not graph-safe)."""
