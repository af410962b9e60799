"""Shared test helpers: deterministic weight-free model functions, and thread settings."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

# Without a GPU the Triton kernels run under Triton's interpreter; the variable must be set before
# Triton is first imported (it decides how @triton.jit functions, its own included, are built).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def backends_here() -> list[str]:
    """``"torch"`` and the fused backends that run here: ``"cpu"`` where the C kernels build,
    ``"triton"`` where triton is importable (on CPU tensors through its interpreter, set above)."""
    import importlib.util

    from imgdiff import kernels

    found = ["torch"]
    if kernels.cpu.available():
        found.append("cpu")
    if importlib.util.find_spec("triton") is not None:
        found.append("triton")
    return found


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` give each worker one intra-op thread.

    Several workers each running several OpenMP threads on a small machine slow each other down
    4-20x (measured on 2 cores: a 1000-step oracle test took 75 s instead of 4 s).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def child_env() -> dict[str, str]:
    """The environment for a child Python process: one intra-op thread when this test runs in a
    pytest worker beside others (as :func:`pytest_configure` gives each worker), else as is."""
    env = dict(os.environ)
    if env.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"
    return env


def device_for(backend: str) -> str:
    """Where a test runs ``backend``: Triton on the GPU where there is one (it runs on CPU tensors
    only under its interpreter, which this file turns on where there is no GPU), the rest on the
    CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


class TanhModel:
    """A fixed random nonlinear model ``out = scale * tanh(W vec(x) (1 + t/1000))``.

    Deterministic, depends on both ``x`` and ``t``, works in any dtype (the spec's EDICT test
    model, spec 4.8).
    """

    def __init__(self, shape: tuple[int, ...], *, seed: int = 0, scale: float = 1.0) -> None:
        D = 1
        for s in shape:
            D *= s
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
        self.scale = scale
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        flat = x.reshape(x.shape[0], -1)
        W = self.W.to(device=x.device, dtype=x.dtype)
        h = flat @ W.T * (1.0 + t.to(x.dtype).reshape(-1, 1) / 1000.0)
        return (self.scale * torch.tanh(h)).reshape(x.shape)


class TimeOnlyModel:
    """A model whose output depends only on ``t``: ``c_t``, fixed random tensors per timestep."""

    def __init__(self, item_shape: tuple[int, ...], *, T: int = 1000, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(T, *item_shape, generator=g, dtype=torch.float64)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.table[t.cpu()].to(device=x.device, dtype=x.dtype)


@pytest.fixture
def tanh_model() -> TanhModel:
    return TanhModel((3, 4, 4))


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection attempted while the test runs (each refused with ``OSError``): an offline
    failure path must leave it empty, which says more than a bound on its time."""
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1] if len(args) > 1 else args)
        raise OSError("network refused by the network_attempts fixture")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a, **k))
    return attempts


def tiny_cross_attention_unet() -> torch.nn.Module:
    """A small random diffusers ``UNet2DConditionModel``: 4 channels, 8x8, context width 12."""
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=8,
        layers_per_block=1,
        attention_head_dim=8,
    )
