"""Fused kernels equal their torch references: the Triton kernels on a GPU when there is one, else
through Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by conftest before Triton is
imported), and the compiled CPU kernels (``backend="cpu"``) on the CPU."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import imgdiff
from imgdiff import kernels
from imgdiff.errors import InputValueError
from imgdiff.kernels import reference

CUDA = torch.cuda.is_available()
if not CUDA:  # conftest sets it before anything imports Triton; this guards a direct run
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
IVE = imgdiff.InputValueError
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
# every fused implementation this machine runs; the CPU kernels need a C compiler (CI has one)
FUSED = (["triton"] if HAS_TRITON else []) + ["cpu"]


def _device(backend: str) -> str:
    return "cpu" if backend == "cpu" else DEVICE


def _tol(dtype: torch.dtype, ref: Tensor) -> float:
    """float32: 1e-6 relative to the values; half types: one rounding step of the largest value."""
    scale = float(ref.float().abs().max()) + 1e-30
    return (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps) * scale


def _close(got: Tensor, want: Tensor, *operands: Tensor) -> None:
    """``got`` equals ``want`` within :func:`_tol` of the values, or of ``operands`` where larger
    (an update that cancels, such as the unmixing, rounds at its operands' scale)."""
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
    tol = max(_tol(want.dtype, t) for t in (want, *operands))
    assert err <= tol, err


@st.composite
def _case(draw: st.DrawFn) -> tuple[tuple[int, ...], torch.dtype, bool, int]:
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 19)),
        draw(st.integers(1, 23)),
    )
    return shape, draw(st.sampled_from(DTYPES)), draw(st.booleans()), draw(st.integers(0, 10**6))


def _tensors(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    seed: int,
    n: int,
    device: str = DEVICE,
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last else t)
    return out


COEF = st.floats(-3.0, 3.0, allow_nan=False)


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=25, deadline=None)
@given(_case(), COEF, COEF, COEF)
def test_lincomb3_equals_reference(backend: str, case: tuple, a: float, b: float, c: float) -> None:
    shape, dtype, channels_last, seed = case
    x, y, n = _tensors(shape, dtype, channels_last, seed, 3, _device(backend))
    before = [t.clone() for t in (x, y, n)]
    got = kernels.lincomb3(x, a, y, b, n, c, backend=backend)  # type: ignore[arg-type]
    # rounding at the terms' scale: the sum may cancel
    _close(got, reference.lincomb3(x, a, y, b, n, c), a * x, b * y, c * n)
    got = kernels.lincomb3(x, a, y, b, backend=backend)  # type: ignore[arg-type]
    _close(got, reference.lincomb3(x, a, y, b), a * x, b * y)
    assert got.stride() == x.stride()  # the output keeps x's layout
    for t, t0 in zip((x, y, n), before, strict=True):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("backend", FUSED)
def test_lincomb3_with_a_zero_noise_weight_reads_no_noise(backend: str) -> None:
    """``c = 0`` leaves the noise out, as the reference does: an inf in it gives no NaN (and the
    kernel does not read it)."""
    device = _device(backend)
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device)
    noise = torch.full_like(x, float("inf"))
    got = kernels.lincomb3(x, 0.7, y, -0.3, noise, 0.0, backend=backend)  # type: ignore[arg-type]
    assert torch.isfinite(got).all()
    _close(got, reference.lincomb3(x, 0.7, y, -0.3, noise, 0.0))


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=20, deadline=None)
@given(
    _case(),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["same", "float32", "bool", "fraction"]),
)
def test_inpaint_blend_equals_reference(
    backend: str,
    case: tuple,
    ks: float,
    ns: float,
    single_channel_mask: bool,
    with_noise: bool,
    mask_kind: str,
) -> None:
    shape, dtype, channels_last, seed = case
    device = _device(backend)
    x, known, noise = _tensors(shape, dtype, channels_last, seed, 3, device)
    g = torch.Generator().manual_seed(seed + 1)
    mshape = (shape[0], 1, *shape[2:]) if single_channel_mask else shape
    u = torch.rand(mshape, generator=g)
    mask = {
        "same": (u > 0.5).to(dtype),
        "float32": (u > 0.5).float(),
        "bool": u > 0.5,
        "fraction": u.to(dtype),  # soft masks: exactly representable in x's dtype
    }[mask_kind].to(device)
    kw = {"known_scale": ks, "noise": noise if with_noise else None, "noise_scale": ns}
    got = kernels.inpaint_blend(x, known, mask, backend=backend, **kw)  # type: ignore[arg-type]
    want = reference.inpaint_blend(x, known, mask.to(x.dtype), **kw)  # type: ignore[arg-type]
    _close(got, want, x, ks * known, ns * noise)  # rounding at the terms' scale (they may cancel)
    assert got.stride() == x.stride()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((2, 3, 37, 29), False),  # planes of 1073: runs of 512, 512, 49 per row
        ((2, 7, 19, 11), True),  # 418 sites of 7 channels: runs of 73 sites, a short last one
        ((1, 600, 3, 2), True),  # sites of 600 channels: longer than a run
        ((5, 700), False),  # planes of one element, walked as sites: 700 channels, two runs
        ((3, 6, 1, 1), False),  # the same with trailing 1s: sites of 6 channels
    ],
)
def test_inpaint_blend_runs_cover_long_rows_and_sites(
    backend: str, dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool
) -> None:
    """The blend's broadcast modes split rows and sites into runs of at most a block (512):
    every element, including each run's last, equals the reference."""
    x, known, noise = _tensors(shape, dtype, channels_last, 3, 3, _device(backend))
    g = torch.Generator().manual_seed(4)
    for mshape in ((shape[0], 1, *shape[2:]), shape):
        for mask in (torch.rand(mshape, generator=g).to(dtype), torch.rand(mshape, generator=g)):
            mask = mask.to(x.device)
            for z in (noise, None):
                kw = {"known_scale": 0.8, "noise": z, "noise_scale": 0.6 if z is not None else 0.0}
                got = kernels.inpaint_blend(x, known, mask, backend=backend, **kw)  # type: ignore[arg-type]
                _close(got, reference.inpaint_blend(x, known, mask.to(dtype), **kw))  # type: ignore[arg-type]


def test_a_plane_of_one_element_takes_the_channels_last_mask_walk() -> None:
    """(B, C) and (B, C, 1, 1) inputs hold each sample's C values together, as channels-last
    memory does: the mask's layout decision gives them that mode (one mask value per C values),
    not mode 1's rows of one element; wider planes keep mode 1."""
    from imgdiff.kernels import _layout

    fmt = torch.contiguous_format
    for shape in [(4, 7), (4, 7, 1, 1), (4, 7, 1)]:
        x, mask = torch.randn(shape), torch.ones(4, 1, *shape[2:])
        assert _layout.mask_operand(mask, x, fmt)[1] == _layout.MASK_BROADCAST_CHANNELS_LAST
    x, mask = torch.randn(4, 7, 2, 3), torch.ones(4, 1, 2, 3)
    assert _layout.mask_operand(mask, x, fmt)[1] == _layout.MASK_BROADCAST_CONTIGUOUS
    assert _layout.mask_operand(torch.ones(4, 7, 2, 3), x, fmt)[1] == _layout.MASK_FULL


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["edict_mix", "edict_unmix"])
@settings(max_examples=20, deadline=None)
@given(_case(), st.floats(0.5, 1.0))
def test_edict_mix_and_unmix_equal_reference(
    backend: str, name: str, case: tuple, p: float
) -> None:
    shape, dtype, channels_last, seed = case
    x, y = _tensors(shape, dtype, channels_last, seed, 2, _device(backend))
    gx, gy = getattr(kernels, name)(x, y, p, backend=backend)
    rx, ry = getattr(reference, name)(x, y, p)
    # unmixing cancels: (y - (1 - p) x) / p can be far smaller than x and y
    _close(gx, rx, x / p, y / p)
    _close(gy, ry, x / p, y / p)
    assert gx.stride() == x.stride()


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_edict_unmix_undoes_the_mix(backend: str) -> None:
    """unmix(mix(x, y)) == (x, y): exactly up to rounding (float64 on the reference, float32 on
    the kernels, whose float32 result is within a few roundings of the mixed values' size)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 3, 9, 7, generator=g, dtype=dtype).to(_device(backend)) for _ in "xy")
    for p in (0.93, 0.5, 1.0):
        mixed = kernels.edict_mix(x, y, p, backend=backend)  # type: ignore[arg-type]
        back = kernels.edict_unmix(*mixed, p, backend=backend)  # type: ignore[arg-type]
        tol = 1e-13 if dtype == torch.float64 else 1e-5
        for got, want in zip(back, (x, y), strict=True):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with pytest.raises(IVE, match="p: expected"):
        kernels.edict_unmix(x, y, 0.0)
    with pytest.raises(IVE, match="y: expected shape"):
        kernels.edict_unmix(x, y[:1], 0.9)
    with pytest.raises(imgdiff.InputTypeError, match="y: expected x's dtype"):
        kernels.edict_unmix(x, y.half(), 0.9)


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=20, deadline=None)
@given(
    _case(),
    st.floats(-2.0, 2.0),
    st.floats(-2.0, 2.0),
    st.floats(0.5, 0.99),
    st.booleans(),
    st.sampled_from([0.0, 0.3, -1.7]),
)
def test_edict_substep_mix_equals_reference(
    backend: str, case: tuple, a: float, b: float, p: float, update_x: bool, c: float
) -> None:
    shape, dtype, channels_last, seed = case
    x, y, eps = _tensors(shape, dtype, channels_last, seed, 3, _device(backend))
    update = "x" if update_x else "y"
    gx, gy = kernels.edict_substep_mix(x, y, eps, a, b, p, update=update, c=c, backend=backend)  # type: ignore[arg-type]
    rx, ry = reference.edict_substep_mix(x, y, eps, a, b, p, update_x=update_x, c=c)
    terms = (x, y, a * x, a * y, b * eps, c * x, c * y)  # rounding at their scale: sums cancel
    _close(gx, rx, *terms)
    _close(gy, ry, *terms)
    assert gx.stride() == x.stride()


def test_edict_substep_mix_is_a_substep_then_the_mixing_pair() -> None:
    """The reference equals lincomb3 then edict_mix (float64: no rounding in between)."""
    g = torch.Generator().manual_seed(0)
    x, y, eps = (torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    for update in ("x", "y"):
        got = kernels.edict_substep_mix(x, y, eps, 0.97, -0.2, 0.93, update=update, c=0.4)  # type: ignore[arg-type]
        if update == "x":  # the partner term c w: w is the sequence not updated
            want = reference.edict_mix(reference.lincomb3(x, 0.97, eps, -0.2, y, 0.4), y, 0.93)
        else:
            want = reference.edict_mix(x, reference.lincomb3(y, 0.97, eps, -0.2, x, 0.4), 0.93)
        for g_, w in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w, rtol=1e-13, atol=1e-13)
    with pytest.raises(IVE, match="update: expected one of"):
        kernels.edict_substep_mix(x, y, eps, 1.0, 0.0, 0.9, update="z")  # type: ignore[arg-type]
    with pytest.raises(IVE, match="eps: expected shape"):
        kernels.edict_substep_mix(x, y, eps[:1], 1.0, 0.0, 0.9, update="x")
    with pytest.raises(imgdiff.InputTypeError, match="eps: expected x's dtype"):
        kernels.edict_substep_mix(x, y, eps.float(), 1.0, 0.0, 0.9, update="x")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_place_outputs_equal_new_ones(
    backend: str, dtype: torch.dtype, channels_last: bool
) -> None:
    """The loops' in-place variants (``in_place``, ``into_noise``) write the same values into the
    operand's memory: each element is read before it is written."""
    impl: kernels.Fused = backend  # type: ignore[assignment]
    x, y, w = _tensors((2, 3, 11, 13), dtype, channels_last, 7, 3, _device(backend))
    mask = (torch.rand(2, 1, 11, 13, generator=torch.Generator().manual_seed(1)) > 0.5).to(x)

    def same(got: Tensor, want: Tensor, into: Tensor) -> None:
        assert torch.equal(got, want)
        assert got.data_ptr() == into.data_ptr()
        assert got.stride() == into.stride()

    for noise in (None, w):
        want = kernels.fused_lincomb3(impl, x, 0.9, y, -0.3, noise, 0.2)
        z = x.clone()
        same(kernels.fused_lincomb3(impl, z, 0.9, y, -0.3, noise, 0.2, in_place=True), want, z)
    for update_x in (True, False):
        want_x, want_y = kernels.fused_edict_substep_mix(
            impl, x, y, w, 0.97, -0.2, 0.93, update_x, 0.4
        )
        u, v = x.clone(), y.clone()
        got_x, got_y = kernels.fused_edict_substep_mix(
            impl, u, v, w, 0.97, -0.2, 0.93, update_x, 0.4, in_place=True
        )
        assert torch.equal(got_x, want_x)
        assert torch.equal(got_y, want_y)
        # the sequence the sub-step does not move holds its mixed value; the moved one is intact
        kept, moved, moved_copy = (v, u, x) if update_x else (u, v, y)
        assert (got_y if update_x else got_x).data_ptr() == kept.data_ptr()
        assert torch.equal(moved, moved_copy)
    want = kernels.fused_inpaint_blend(impl, x, y, mask, 0.8, w, 0.6)
    z = w.clone()
    same(kernels.fused_inpaint_blend(impl, x, y, mask, 0.8, z, 0.6, into_noise=True), want, z)
    # no noise to write into: a new tensor
    want = kernels.fused_inpaint_blend(impl, x, y, mask, 1.0, None, 0.0)
    got = kernels.fused_inpaint_blend(impl, x, y, mask, 1.0, None, 0.0, into_noise=True)
    assert torch.equal(got, want)
    assert got.data_ptr() not in {t.data_ptr() for t in (x, y, w)}


@needs_triton
def test_in_kernel_noise_is_seeded_standard_normal() -> None:
    x = torch.zeros(4, 4, 64, 64, device=DEVICE)
    a = kernels.lincomb3(x, 1.0, x, 1.0, c=1.0, seed=3, backend="triton")
    b = kernels.lincomb3(x, 1.0, x, 1.0, c=1.0, seed=3, backend="triton")
    other = kernels.lincomb3(x, 1.0, x, 1.0, c=1.0, seed=4, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert abs(float(a.mean())) < 0.02
    assert abs(float(a.std()) - 1.0) < 0.02
    blended = kernels.inpaint_blend(
        x, x, torch.ones_like(x), noise_scale=0.5, seed=3, backend="triton"
    )
    torch.testing.assert_close(blended, 0.5 * a)  # the same stream for the same elements


@pytest.mark.parametrize("backend", FUSED)
def test_non_dense_inputs_and_float64_fall_back_correctly(backend: str) -> None:
    device = _device(backend)
    x = torch.randn(2, 3, 8, 9, device=device).transpose(2, 3)  # neither layout
    y = torch.randn(2, 3, 9, 8, device=device)
    got = kernels.lincomb3(x, 0.5, y, -1.5, backend=backend)  # type: ignore[arg-type]
    _close(got, reference.lincomb3(x, 0.5, y, -1.5))
    x64, y64 = x.double(), y.double()
    assert torch.equal(
        kernels.lincomb3(x64, 0.5, y64, -1.5, backend=backend),  # type: ignore[arg-type]
        reference.lincomb3(x64, 0.5, y64, -1.5),
    )
    empty = torch.zeros(0, 3, 4, 4, device=device)
    assert kernels.inpaint_blend(empty, empty, empty, backend=backend).shape == empty.shape  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", FUSED)
def test_fused_paths_leave_autograd_to_torch(backend: str) -> None:
    device = _device(backend)
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    y = torch.randn(2, 3, 4, 4, device=device)
    kernels.lincomb3(x, 2.0, y, 1.0, backend=backend).sum().backward()  # type: ignore[arg-type]
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    gx, gy = kernels.edict_mix(x, y, 0.9, backend=backend)  # type: ignore[arg-type]
    assert gx.requires_grad
    assert gy.requires_grad


@pytest.mark.parametrize("backend", ["torch", *FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_channel_mask", [True, False])
@pytest.mark.parametrize("noised", [False, True])
def test_inpaint_blend_is_exact_at_the_mask_ends(
    backend: str, dtype: torch.dtype, single_channel_mask: bool, noised: bool
) -> None:
    """Where m = 0 the result is x and where m = 1 the pasted value (finite inputs), on every
    backend: the known region of a clean paste is the known image exactly."""
    device = _device(backend)
    g = torch.Generator().manual_seed(5)
    shape = (2, 3, 4, 6)
    x, known, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    mshape = (2, 1, 4, 6) if single_channel_mask else shape
    mask = (torch.rand(mshape, generator=g) > 0.5).to(dtype)
    full = mask.expand(shape)
    ks, ns = (0.8, 0.6) if noised else (1.0, 0.0)
    kw = {"known_scale": ks, "noise": noise if noised else None, "noise_scale": ns}
    got = kernels.inpaint_blend(  # type: ignore[arg-type]
        x.to(device), known.to(device), mask.to(device), backend=backend, **kw
    ).cpu()
    pasted = (known.float() * ks + noise.float() * ns).to(dtype) if noised else known
    assert torch.equal(got[full == 0], x[full == 0])
    kept = got[full == 1]
    torch.testing.assert_close(
        kept, pasted[full == 1], rtol=0, atol=_tol(dtype, kept) if noised else 0
    )


def test_fused_backend_leaves_mismatched_operands_to_torch() -> None:
    """Operands of another element count (torch broadcasts or raises; a kernel would read past
    them) or dtype (torch promotes), and empty tensors, take the torch path."""
    x = torch.zeros(2, 3, 4, 4)
    assert kernels.fused_backend("cpu", x, torch.zeros(2, 3, 4, 4), None) == "cpu"
    assert kernels.fused_backend("cpu", x, torch.zeros(1, 3, 4, 4)) is None
    assert kernels.fused_backend("cpu", x, None, torch.zeros(2, 3, 1, 1)) is None
    assert kernels.fused_backend("cpu", x, torch.zeros(2, 3, 4, 4, dtype=torch.float64)) is None
    assert kernels.fused_backend("cpu", x, torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)) is None
    assert kernels.fused_backend("cpu", torch.zeros(0, 3, 4, 4)) is None


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_reference_blend_takes_mixed_dtypes_like_the_kernels(backend: str) -> None:
    """known/noise in another dtype than x: computed in float32 at least, written in x's dtype."""
    device = _device(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=g).to(torch.bfloat16).to(device)
    known = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float().to(device)
    got = kernels.inpaint_blend(x, known, mask, known_scale=0.9, backend=backend)  # type: ignore[arg-type]
    want = torch.where(mask == 1, known.float() * 0.9, x.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # every backend computes mixed dtypes as torch does (the kernels would round known first)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_dtypes_are_not_rounded_to_x_before_the_arithmetic(backend: str) -> None:
    """A bfloat16 x minus a float32 y close to it: the difference survives on every backend, as
    in torch's promoted arithmetic (the kernels rounded y to bfloat16 first: 78 % exact zeros)."""
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(torch.bfloat16).to(device)
    y = (x.float().cpu() + 1e-3 * torch.randn(2, 4, 16, 16, generator=g)).to(device)
    noise = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64).to(device)
    for args in ((x, 1.0, y, -1.0), (x, 1.0, y, -1.0, noise, 1e-4)):
        got = kernels.lincomb3(*args, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(got, kernels.lincomb3(*args, backend="torch"))  # type: ignore[arg-type]
    assert float((got == 0).float().mean()) < 0.05
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float().to(device)
    kw = {"known_scale": 1.0, "noise": -y, "noise_scale": 1.0}
    got = kernels.inpaint_blend(x, x.float(), mask, **kw, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(got, kernels.inpaint_blend(x, x.float(), mask, **kw, backend="torch"))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", FUSED)
def test_inpaint_blend_with_a_zero_noise_weight_reads_no_noise(backend: str) -> None:
    """``noise_scale = 0`` leaves the noise out, as the reference does: an inf in it gives no NaN."""
    device = _device(backend)
    x, known = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device)
    mask = torch.ones(2, 1, 8, 8, device=device)
    noise = torch.full_like(x, float("inf"))
    got = kernels.inpaint_blend(x, known, mask, noise=noise, noise_scale=0.0, backend=backend)  # type: ignore[arg-type]
    assert torch.isfinite(got).all()
    _close(got, reference.inpaint_blend(x, known, mask, noise=noise, noise_scale=0.0))


def test_fused_backend_answers_per_call_whatever_it_remembers() -> None:
    """The per-(backend, device, dtype) memo never hides autograd, size or dtype: each call
    still says torch (None) where the kernels must not run."""
    x = torch.zeros(1, 2, 2, 2)
    for _ in range(2):  # the second round is answered from the memo
        assert kernels.fused_backend("cpu", x) == "cpu"
        assert kernels.fused_backend("auto", x) == "cpu"
        assert kernels.fused_backend("cpu", x.double()) is None
        assert kernels.fused_backend("torch", x) is None
        with torch.enable_grad():
            assert kernels.fused_backend("cpu", x.clone().requires_grad_()) is None
        with torch.no_grad():
            assert kernels.fused_backend("cpu", x.clone().requires_grad_()) == "cpu"
    with pytest.raises(IVE, match="backend: 'cpu' runs on CPU tensors"):
        kernels.fused_backend("cpu", torch.zeros(1, 2, device="meta"))


def test_auto_backend_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1, 2, 2, 2)
    assert kernels.resolve_backend("auto", cpu) == "cpu"  # the compiled CPU kernels
    assert kernels.resolve_backend("auto", cpu.half()) == "torch"
    assert kernels.resolve_backend("cpu", cpu.double()) == "torch"
    if HAS_TRITON:
        assert kernels.resolve_backend("triton", cpu.double()) == "torch"
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(IVE, match="TRITON_INTERPRET"):
            kernels.resolve_backend("triton", cpu)
    with pytest.raises(IVE, match="backend"):
        kernels.resolve_backend("cuda", cpu)  # type: ignore[arg-type]
    with pytest.raises(IVE, match="y: expected shape"):
        kernels.lincomb3(cpu, 1.0, torch.zeros(1, 2, 2, 3), 1.0)
    with pytest.raises(IVE, match="seed"):
        kernels.lincomb3(cpu, 1.0, cpu, 1.0, cpu, 1.0, seed=1)
    with pytest.raises(IVE, match="mask: expected shape"):
        kernels.inpaint_blend(cpu, cpu, torch.zeros(1, 2, 2, 1))
    with pytest.raises(IVE, match="p: expected"):
        kernels.edict_mix(cpu, cpu, 0.0)
    # the reference path with a seed draws from a seeded torch generator
    torch.testing.assert_close(
        kernels.lincomb3(cpu, 0.0, cpu, 0.0, c=1.0, seed=5, backend="torch"),
        torch.randn(cpu.shape, generator=torch.Generator().manual_seed(5)),
    )


# -- the samplers on the kernels ---------------------------------------------------------------

SCHED = imgdiff.NoiseSchedule.linear()


def _run(make: object, backend: str, steps: int, **kw: object) -> Tensor:
    sampler = make(backend)  # type: ignore[operator]
    device = _device(backend)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    return sampler.sample(  # type: ignore[no-any-return]
        imgdiff.GaussianDenoiser(SCHED), noise, num_steps=steps, progress=False, **kw
    )


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.filterwarnings("ignore::imgdiff.PrecisionWarning")
def test_samplers_give_the_same_samples_on_the_fused_kernels(fused: str) -> None:
    device = _device(fused)
    cases = {
        "ddim": (lambda b: imgdiff.DDIM(SCHED, backend=b), {}),
        "ddim eta": (
            lambda b: imgdiff.DDIM(SCHED, eta=0.5, backend=b),
            {"generator": torch.Generator(device).manual_seed(1)},
        ),
        "ddpm": (lambda b: imgdiff.DDPM(SCHED, backend=b), {"generator": 1}),
        # EDICT's coupled map amplifies rounding differences over steps: compare two steps
        "edict": (lambda b: imgdiff.EDICT(SCHED, dtype=torch.float32, backend=b), {}),
    }
    for name, (make, kw) in cases.items():
        runs = []
        for backend in ("torch", fused):
            extra = dict(kw)
            if extra.get("generator") is not None:
                extra["generator"] = torch.Generator(device).manual_seed(1)
            runs.append(_run(make, backend, 2 if name == "edict" else 8, **extra))
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.filterwarnings("ignore::imgdiff.PrecisionWarning")
def test_edict_on_the_fused_kernels_still_inverts(fused: str) -> None:
    """Generation on the fused kernels (second sub-step fused with the mixing) is still undone by
    the inverse steps: the float32 round trip is as close as on the torch path."""
    device = _device(fused)
    model = imgdiff.GaussianDenoiser(SCHED)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)).to(device) * 2 - 1
    errors = {}
    for backend in ("torch", fused):
        sampler = imgdiff.EDICT(SCHED, dtype=torch.float32, backend=backend)  # type: ignore[arg-type]
        pair = sampler.invert(model, x0, num_steps=10, progress=False)
        rec = sampler.sample(model, pair, num_steps=10, progress=False)
        errors[backend] = float((rec - x0).abs().max())
    assert errors[fused] <= 4 * errors["torch"] + 1e-5, errors


@pytest.mark.parametrize("fused", FUSED)
def test_known_region_paste_on_the_kernel_equals_torch(fused: str) -> None:
    from imgdiff.conditioning import KnownRegion

    device = _device(fused)
    known = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.zeros(1, 1, 8, 8, device=device)
    mask[..., 2:6, 2:6] = 1
    x = torch.randn(2, 3, 8, 8, device=device)
    for mode in ("clean", "noised"):
        pastes = []
        for backend in ("torch", fused):
            region = KnownRegion(
                known,
                mask,
                mode=mode,  # type: ignore[arg-type]
                schedule=SCHED,
                generator=torch.Generator(device).manual_seed(3),
                backend=backend,  # type: ignore[arg-type]
            )
            pastes.append(region.paste(x, 500))
        torch.testing.assert_close(pastes[1], pastes[0], rtol=1e-6, atol=1e-6)
        hole = mask.expand_as(x).bool()
        assert torch.equal(pastes[1][hole], x[hole])


@needs_triton
@settings(max_examples=15, deadline=None)
@given(_case(), st.floats(-2, 2), st.floats(-2, 2), st.booleans(), st.booleans())
def test_ddpm_learned_step_equals_reference(
    case: tuple, a: float, b: float, learned_range: bool, with_noise: bool
) -> None:
    shape, dtype, _, seed = case
    (x, noise) = _tensors(shape, dtype, False, seed, 2)
    (out,) = _tensors((shape[0], 2 * shape[1], *shape[2:]), dtype, False, seed + 1, 1)
    kw = {
        "log_beta": -4.0,
        "log_beta_tilde": -5.0,
        "noise_mask": 1.0,
        "learned_range": learned_range,
    }
    n = noise if with_noise else None
    got = kernels.ddpm_learned_step(x, out, a, b, n, backend="triton", **kw)  # type: ignore[arg-type]
    # rounding at the terms' scale (the mean and the noise term may cancel); the noise term is the
    # step with no mean
    noise_term = reference.ddpm_learned_step(0 * x, out, 0.0, 0.0, n, **kw)  # type: ignore[arg-type]
    want = reference.ddpm_learned_step(x, out, a, b, n, **kw)  # type: ignore[arg-type]
    _close(got, want, a * x, b * out[:, : shape[1]], noise_term)


@needs_triton
def test_ddpm_learned_step_leaves_an_output_over_the_int32_range_to_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The learned-variance kernel indexes the model output, twice x's elements, with int32
    offsets: where that output has more elements than int32 holds (x alone may fit), the step
    runs on torch (the limit lowered here to x's size)."""
    from imgdiff.kernels import fused

    x, noise = torch.randn(2, 3, 4, 4, device=DEVICE), torch.randn(2, 3, 4, 4, device=DEVICE)
    out = torch.randn(2, 6, 4, 4, device=DEVICE)
    calls: list[int] = []
    real = fused.ddpm_learned_step

    def counted(*args: object, **kw: object) -> Tensor:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "ddpm_learned_step", counted)
    kw = {"log_beta": -4.0, "log_beta_tilde": -5.0, "noise_mask": 1.0}
    want = reference.ddpm_learned_step(x, out, 0.9, 0.1, noise, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(kernels, "_MAX_NUMEL", out.numel())  # both fit: the kernel
    got = kernels.ddpm_learned_step(x, out, 0.9, 0.1, noise, backend="triton", **kw)  # type: ignore[arg-type]
    _close(got, want)
    assert len(calls) == 1
    monkeypatch.setattr(kernels, "_MAX_NUMEL", x.numel())  # x fits, out does not: the reference
    got = kernels.ddpm_learned_step(x, out, 0.9, 0.1, noise, backend="triton", **kw)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert torch.equal(got, want)


@needs_triton
def test_learned_variance_ddpm_on_the_kernel_equals_torch() -> None:
    from imgdiff.posterior import learned_range_log_variance

    def model(x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([0.3 * x, torch.tanh(x)], dim=1)

    # the reference of the reference: improved DDPM's Eq. 15 through the library's own function
    v = torch.linspace(-1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(
        reference.ddpm_learned_step(
            torch.zeros(1, 5, dtype=torch.float64),
            torch.cat([torch.zeros(1, 5), v[None]], 1).double(),
            1.0,
            1.0,
            torch.ones(1, 5, dtype=torch.float64),
            -4.0,
            -5.0,
            1.0,
        )[0],
        torch.exp(0.5 * learned_range_log_variance(v, -4.0, -5.0)),
    )
    for variance in ("learned", "learned_range"):
        runs = []
        for backend in ("torch", "triton"):
            sampler = imgdiff.DDPM(SCHED, variance=variance, backend=backend)  # type: ignore[arg-type]
            noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
            runs.append(
                sampler.sample(
                    model,
                    noise,
                    num_steps=8,
                    generator=torch.Generator(DEVICE).manual_seed(1),
                    progress=False,
                )
            )
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)


@needs_triton
@settings(max_examples=15, deadline=None)
@given(_case())
def test_threshold_apply_equals_reference(case: tuple) -> None:
    shape, dtype, _, seed = case
    (x0,) = _tensors(shape, dtype, False, seed, 1)
    x0 = 2 * x0
    s = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)).to(DEVICE) + 1.0
    _close(kernels.threshold_apply(x0, s, backend="triton"), reference.threshold_apply(x0, s))


@needs_triton
def test_dynamic_threshold_on_the_kernel_equals_torch() -> None:
    x0 = 3 * torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    a = imgdiff.DynamicThreshold(0.9, 1.5, backend="torch")(x0)
    b = imgdiff.DynamicThreshold(0.9, 1.5, backend="triton")(x0)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert float(b.abs().max()) <= 1.0 + 1e-6
    with pytest.raises(IVE, match="s: expected one threshold per sample"):
        kernels.threshold_apply(x0, torch.ones(2, device=DEVICE))


@needs_triton
def test_huge_tensors_take_the_reference_path() -> None:
    huge = torch.empty(2**31, device="meta")  # no memory: only the size matters
    assert kernels.resolve_backend("triton", huge) == "torch"
    assert not kernels.use_triton("triton", huge)


# -- the compiled CPU kernels: building, falling back, forking -----------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cpu_kernels_without_a_compiler_fall_back_with_a_clear_error(tmp_path: object) -> None:
    code = """
import torch, imgdiff
from imgdiff import kernels
x = torch.ones(1, 2, 3, 3)
assert not kernels.cpu.available()
print(kernels.cpu.build_error())
assert kernels.resolve_backend("auto", x) == "torch"
assert torch.equal(kernels.lincomb3(x, 2.0, x, 1.0), 3 * x)
try:
    kernels.lincomb3(x, 2.0, x, 1.0, backend="cpu")
except imgdiff.InputValueError as e:
    print("ERROR:", e)
"""
    done = _python(code, CC="/nonexistent/cc", IMGDIFF_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no C compiler found" in done.stdout
    assert "ERROR: backend: 'cpu' needs the compiled CPU kernels" in done.stdout
    off = _python(code, IMGDIFF_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert "IMGDIFF_CPU_KERNELS=0" in off.stdout


def test_cpu_kernels_settings_and_an_unusable_cache_folder(tmp_path: Path) -> None:
    """IMGDIFF_CPU_KERNELS takes the usual off words, warns on an unknown one; a cache folder that
    cannot be made or written leaves the kernels unavailable with the reason, and "auto" samples
    on the torch path (it raised OSError at every call before)."""
    code = """
import warnings, torch, imgdiff
from imgdiff import kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print("available:", kernels.cpu.available())
print("warned:", [type(w.message).__name__ for w in caught], [str(w.message) for w in caught])
print("error:", kernels.cpu.build_error())
x = torch.randn(1, 2, 4, 4)
assert kernels.resolve_backend("auto", x) == "torch"
out = imgdiff.DDIM(imgdiff.NoiseSchedule.linear(50)).sample(
    lambda x, t: torch.tanh(x), x, num_steps=3, progress=False)
print("sampled:", tuple(out.shape))
"""
    for value in ("off", "FALSE", " no "):
        done = _python(code, IMGDIFF_CPU_KERNELS=value)
        assert done.returncode == 0, done.stderr
        assert "available: False" in done.stdout
        assert "warned: []" in done.stdout
        assert f"error: turned off by IMGDIFF_CPU_KERNELS={value}" in done.stdout
    done = _python(code, IMGDIFF_CPU_KERNELS="disable")
    assert done.returncode == 0, done.stderr
    assert "available: False" in done.stdout
    assert (
        "warned: ['PerformanceWarning'] [\"IMGDIFF_CPU_KERNELS='disable' is none of" in done.stdout
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _python(code, IMGDIFF_CACHE_DIR=str(blocker / "sub"))
    assert done.returncode == 0, done.stderr
    assert "available: False" in done.stdout
    assert "error: no folder for the built kernels" in done.stdout
    assert "set IMGDIFF_CACHE_DIR to a writable folder" in done.stdout
    assert "sampled: (1, 2, 4, 4)" in done.stdout


def test_cpu_kernels_take_a_compiler_with_arguments(tmp_path: Path) -> None:
    """$CC may carry arguments, as build tools allow ("ccache gcc", "gcc -m64")."""
    import shutil

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("needs a C compiler")
    code = """
import torch
from imgdiff import kernels
assert kernels.cpu.available(), kernels.cpu.build_error()
x = torch.randn(2, 3, 5, 5)
assert torch.allclose(kernels.lincomb3(x, 0.5, x, 0.25, backend="cpu"), 0.75 * x)
print("built:", kernels.cpu.library_path())
"""
    done = _python(code, CC=f"{cc} -DIMGDIFF_UNUSED_TEST_MACRO=1", IMGDIFF_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"built: {tmp_path}" in done.stdout


def test_cpu_kernels_build_without_clones_when_the_compiler_rejects_them(tmp_path: Path) -> None:
    """A compiler that cannot build the per-CPU clones (nor OpenMP) still gets baseline kernels,
    on one thread."""
    import shutil

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("needs a C compiler")
    wrapper = tmp_path / "cc"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -DIMGDIFF_NO_CLONES "*) ;; *) echo "no clones here" >&2; exit 1;; esac\n'
        'case " $* " in *" -fopenmp "*) echo "no OpenMP here" >&2; exit 1;; esac\n'
        f'exec {cc} "$@"\n'
    )
    wrapper.chmod(0o755)
    code = """
import torch, warnings
from imgdiff import kernels
x = torch.randn(2, 3, 5, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert kernels.cpu.available(), kernels.cpu.build_error()
print([type(w.message).__name__ for w in caught], "no clones here" in str(caught[0].message))
print(kernels.cpu.build_notes())
assert torch.allclose(kernels.lincomb3(x, 0.5, x, 0.25, backend="cpu"), 0.75 * x)
y = torch.randn(4, 4, 64, 64)  # enough elements for a team, run on one thread here
assert torch.allclose(kernels.lincomb3(y, 0.5, y, 0.25, backend="cpu"), 0.75 * y)
print(kernels.cpu.library_path(), "threads:", kernels.cpu._library().threads)
"""
    done = _python(code, CC=str(wrapper), IMGDIFF_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(tmp_path / "cache") in done.stdout
    assert "threads: False" in done.stdout
    # the fallback is said: a warning with the compiler's complaint, and build_notes
    assert "['PerformanceWarning'] True" in done.stdout
    assert "('without OpenMP (one thread)', 'without per-CPU versions" in done.stdout
    # under -W error the warning raises once; the kernels are loaded all the same
    strict = """
import warnings
warnings.simplefilter("error")
from imgdiff import kernels
try:
    kernels.cpu.available()
    raised = False
except Warning as w:
    raised = type(w).__name__
print(raised, kernels.cpu.available(), kernels.cpu.available())
"""
    done = _python(strict, CC=str(wrapper), IMGDIFF_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["PerformanceWarning", "True", "True"]


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="GCC on x86-64 Linux"
)
def test_cpu_kernels_compile_cleanly_in_every_build_of_the_chain(tmp_path: Path) -> None:
    """With GCC on x86-64 Linux every build of the fallback chain compiles, the first (OpenMP,
    per-CPU clones) above all: an attribute or flag it rejects would otherwise fall back silently
    to a slower build. Warnings count as errors here."""
    cc = _compiler().compiler[0]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in version or "clang" in version:
        pytest.skip("needs GCC")
    include = sysconfig.get_paths()["include"]
    source = Path(kernels.cpu.__file__).parent
    for i, chain in enumerate(kernels.cpu._FLAG_CHAIN):
        for name, extra in (
            ("cpu_kernels.c", []),
            ("cpu_module.c", [f"-I{include}", f"-I{source}"]),
        ):
            done = subprocess.run(
                [
                    cc,
                    *kernels.cpu._BASE_FLAGS,
                    *chain,
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    *extra,
                    str(source / name),
                    "-o",
                    str(tmp_path / f"{i}-{name}.so"),
                ],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, (chain, done.stderr)
    assert kernels.cpu._library().threads


def test_cpu_kernels_run_in_a_forked_child() -> None:
    # an OpenMP team made before fork() must not be used in the child (it would hang); torch's
    # own ops need one thread there too (as in DataLoader workers), so the child sets that
    code = """
import multiprocessing as mp, torch
from imgdiff import kernels
x = torch.randn(4, 4, 128, 128)
want = kernels.lincomb3(x, 0.5, x, 0.25, backend="torch")
assert torch.equal(kernels.lincomb3(x, 0.5, x, 0.25, backend="cpu"), want)  # threads in the parent

def child(q):
    torch.set_num_threads(1)
    q.put(bool(torch.equal(kernels.lincomb3(x, 0.5, x, 0.25, backend="cpu"), want)))

q = mp.get_context("fork").Queue()
p = mp.get_context("fork").Process(target=child, args=(q,))
p.start(); p.join(60)
assert p.exitcode == 0 and q.get(timeout=5)
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


# -- the two bindings: a CPython extension module, or ctypes ------------------------------------


def _compiler() -> kernels.cpu._Builder:
    """The loaded kernels' compiler and cache folder, for building one binding on its own."""
    import shutil

    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None or not kernels.cpu.available():
        pytest.skip("needs a C compiler")
    return kernels.cpu._Builder((cc,), kernels.cpu._cache_dir())


def _kernel_calls(x: Tensor, y: Tensor, z: Tensor, mask: Tensor) -> list[Tensor]:
    cpu = kernels.cpu
    return [
        cpu.lincomb3(x, 0.7, y, -0.3),
        cpu.lincomb3(x, 0.7, y, -0.3, z, 0.2),
        *cpu.mix_pair(x, y, 0.93, 0.07),
        *cpu.mix_pair(y, x, 1 / 0.93, -0.07 / 0.93),  # the inverse's weights
        *cpu.edict_substep_mix(x, y, z, 1.1, -0.2, 0.93, True),
        *cpu.edict_substep_mix(x, y, z, 1.1, -0.2, 0.93, False, 0.3),
        cpu.inpaint_blend(x, y, mask),
        cpu.inpaint_blend(
            x, y, mask.expand_as(x).contiguous(), known_scale=0.8, noise=z, noise_scale=0.6
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 128, 130)])  # one thread; OpenMP threads
def test_the_extension_and_ctypes_bindings_compute_the_same(
    dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = _compiler()
    errors: list[str] = []
    as_ctypes = kernels.cpu._load_ctypes(cc, errors)
    as_module = kernels.cpu._load_extension(cc, errors)
    if as_module is None:
        pytest.skip(f"no extension module here: {errors}")
    assert as_ctypes is not None, errors
    assert (as_ctypes.binding, as_module.binding) == ("ctypes", "extension")
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.5).to(dtype)
    results = {}
    for lib in (as_ctypes, as_module):
        monkeypatch.setattr(kernels.cpu, "_load", lambda lib=lib: (lib, None))
        results[lib.binding] = _kernel_calls(x, y, z, mask)
    for a, b in zip(results["ctypes"], results["extension"], strict=True):
        assert torch.equal(a, b)
    # and both equal the reference
    want = reference.lincomb3(x, 0.7, y, -0.3, z, 0.2)
    torch.testing.assert_close(
        results["extension"][1], want, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_on_several_threads_compute_what_one_thread_does(dtype: torch.dtype) -> None:
    """Each element is computed the same way whichever thread takes it, so every kernel's output
    is bitwise the same on 1, 2 and 3 threads. The sizes make teams of 1, 2 and 3 (16384 elements
    or more a thread), end mid-block, and the blend runs its three mask layouts."""
    if not kernels.cpu.available() or not kernels.cpu._library().threads:
        pytest.skip("needs the CPU kernels built with OpenMP")
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    try:
        for shape in [(1, 1, 3, 5461), (1, 2, 97, 193), (3, 4, 64, 64)]:
            x, y, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.5).to(dtype)
            for fmt in (torch.contiguous_format, torch.channels_last):
                xs = x.contiguous(memory_format=fmt)
                results = []
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    results.append(_kernel_calls(xs, y, z, mask))
                for other in results[1:]:
                    for a, b in zip(results[0], other, strict=True):
                        assert torch.equal(a, b), (shape, fmt)
    finally:
        torch.set_num_threads(before)


def _with_team() -> None:
    if not kernels.cpu.available() or not kernels.cpu._library().threads:
        pytest.skip("needs the CPU kernels built with OpenMP")


def test_cpu_kernels_are_right_after_their_threads_went_idle() -> None:
    """OpenMP's threads spin for a while after a call, then sleep: calls after pauses on both
    sides of that are right, and none hangs."""
    _with_team()
    import time

    x, y = torch.randn(3, 4, 64, 64), torch.randn(3, 4, 64, 64)
    want = reference.lincomb3(x, 0.7, y, -0.3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for pause in (0.0, 2e-5, 2e-4, 2e-3, 0.0, 5e-3, 1e-5, 2e-3):
            time.sleep(pause)
            torch.testing.assert_close(
                kernels.cpu.lincomb3(x, 0.7, y, -0.3), want, rtol=0, atol=1e-6
            )
    finally:
        torch.set_num_threads(before)


def test_cpu_kernel_calls_from_several_python_threads_at_once() -> None:
    """Calls over 65536 elements release the GIL, so several Python threads may run kernels at
    once, each with a team of its own: all results are right."""
    _with_team()
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 4, 96, 96, generator=g), torch.randn(2, 4, 96, 96, generator=g))]
    inputs *= 4
    wants = [reference.lincomb3(x, 0.7, y, -0.3) for x, y in inputs]

    def work(i: int) -> bool:
        x, y = inputs[i]
        return all(
            torch.equal(
                kernels.cpu.lincomb3(x, 0.7, y, -0.3), kernels.cpu.lincomb3(x, 0.7, y, -0.3)
            )
            and bool((kernels.cpu.lincomb3(x, 0.7, y, -0.3) - wants[i]).abs().max() <= 1e-6)
            for _ in range(30)
        )

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(4), timeout=120))
    finally:
        torch.set_num_threads(before)


def _bfloat16_operands() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded bfloat16 ``x, y, z`` and a ``(B, 1, ...)`` mask for :func:`_kernel_calls`."""
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(2, 3, 37, 41, generator=g).bfloat16() for _ in range(3))
    return x, y, z, (torch.rand(2, 1, 37, 41, generator=g) > 0.5).bfloat16()


def test_bfloat16_stores_agree_with_and_without_the_conversion_instruction(tmp_path: Path) -> None:
    """The kernels store bfloat16 blocks with AVX512-BF16's conversion where the processor has
    it, else with the portable rounding code: both round to nearest even, so for normal values
    the results are bitwise the same (compared here with the instruction turned off in a child
    process; on a processor without it both runs take the portable path). Values below
    bfloat16's normal range are the documented difference: the instruction reads them as zero."""
    _compiler()
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from imgdiff.kernels import cpu
from tests.test_kernels import _bfloat16_operands, _kernel_calls
assert not cpu.bf16_isa()
torch.save(_kernel_calls(*_bfloat16_operands()), {str(tmp_path / "portable.pt")!r})
"""
    done = _python(code, IMGDIFF_CPU_BF16_ISA="0")
    assert done.returncode == 0, done.stderr
    portable = torch.load(tmp_path / "portable.pt")
    here = _kernel_calls(*_bfloat16_operands())
    assert len(here) == len(portable) == 12
    for got, want in zip(here, portable, strict=True):
        assert torch.equal(got, want)
    cpu = kernels.cpu
    # below the normal range (2^-126): kept by the portable code, zero with the instruction
    tiny = torch.tensor([1e-39, -3e-40, 1.0, 0.5] * 8).bfloat16()  # whole vectors of 16
    kept = cpu.lincomb3(tiny, 1.0, tiny, 0.0)
    want_tiny = tiny.clone()
    if cpu.bf16_isa():
        want_tiny[tiny.abs() < 1e-38] = 0.0
    assert torch.equal(kept, want_tiny)


def test_the_extension_module_checks_its_arguments() -> None:
    cc = _compiler()
    errors: list[str] = []
    lib = kernels.cpu._load_extension(cc, errors)
    if lib is None:
        pytest.skip(f"no extension module here: {errors}")
    fn = lib.functions["lincomb3_f32"]
    with pytest.raises(TypeError, match="lincomb3_f32: expected 9 arguments, got 2"):
        fn(1, 2)
    x = torch.zeros(4)
    with pytest.raises(TypeError, match="an integer is required"):
        fn("not a pointer", 1.0, x.data_ptr(), 1.0, None, 0.0, x.data_ptr(), 4, 1)
    with pytest.raises(TypeError, match="must be real number, not str"):
        fn(x.data_ptr(), "1.0", x.data_ptr(), 1.0, None, 0.0, x.data_ptr(), 4, 1)


def test_without_python_headers_the_kernels_load_through_ctypes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cc = _compiler()
    import sysconfig

    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(tmp_path)})
    errors: list[str] = []
    assert kernels.cpu._load_extension(cc, errors) is None
    assert "Python.h" in errors[0]
    monkeypatch.setenv("IMGDIFF_CACHE_DIR", str(tmp_path / "cache"))
    kernels.cpu._load.cache_clear()
    try:
        with pytest.warns(imgdiff.PerformanceWarning, match="through ctypes"):
            assert kernels.cpu.binding() == "ctypes"
        assert kernels.cpu.build_notes() == (
            "as a plain library called through ctypes (~1.3 us a call)",
        )
        x = torch.randn(2, 3, 4, 4)
        assert torch.allclose(kernels.cpu.lincomb3(x, 0.5, x, 0.25), 0.75 * x)
    finally:
        kernels.cpu._load.cache_clear()


def test_the_ctypes_binding_can_be_chosen() -> None:
    _compiler()
    code = "from imgdiff.kernels import cpu; print(cpu.binding())"
    done = _python(code, IMGDIFF_CPU_KERNELS="ctypes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ctypes"
    assert "PerformanceWarning" not in done.stderr  # asked for: nothing to warn about


@pytest.mark.parametrize(
    ("found", "problem"),
    [
        ("3.0.0", "needs triton >= 3.6 (the version its kernels are tested with); found 3.0.0"),
        ("3.5.1", "needs triton >= 3.6 (the version its kernels are tested with); found 3.5.1"),
        ("3.6.0", None),
        ("3.10.0+git1a2b3c", None),
        ("4.0.0rc1", None),
    ],
)
def test_triton_older_than_the_tested_one_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, found: str, problem: str | None
) -> None:
    """backend='triton' with a Triton older than 3.6 (whose interpreter refuses the kernels) is
    an error naming both versions; "auto" does not pick it (checked on a GPU); 3.6 and later
    (3.10 > 3.6, as numbers) pass."""
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found)
    monkeypatch.setattr(kernels, "_AUTO_PICKS_TRITON", True)
    monkeypatch.setattr(kernels, "_RESOLVED", {})
    kernels._triton_problem.cache_clear()
    try:
        assert kernels._triton_problem() == problem
        x = torch.zeros(8, device="cuda" if torch.cuda.is_available() else "meta")
        if problem is None:
            if x.is_cuda:
                assert kernels.resolve_backend("triton", x) == "triton"
        else:
            with pytest.raises(InputValueError, match=re.escape(f"backend: 'triton' {problem}")):
                kernels.resolve_backend("triton", x)
            if x.is_cuda:
                assert kernels._auto(x) is None
    finally:
        kernels._triton_problem.cache_clear()
