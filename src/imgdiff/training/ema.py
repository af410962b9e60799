"""Exponential moving average of a model's weights through ``torch.optim.swa_utils``."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgdiff._checks import check_float, describe
from imgdiff.errors import InputTypeError

__all__ = ["ema_model"]


def ema_model(model: nn.Module, decay: float = 0.999) -> AveragedModel:
    """An ``AveragedModel`` keeping ``ema = decay ema + (1 - decay) weights`` (buffers averaged too).

    Call ``ema.update_parameters(model)`` after each optimiser step and sample with ``ema.module``.
    Palette uses ``decay = 0.9999`` over ~1M steps; short runs want less (e.g. 0.995).
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model: expected a torch.nn.Module, got {describe(model)}")
    decay = check_float("decay", decay, min=0.0, max=1.0, max_open=True)
    avg_fn = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
    return AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=True)
