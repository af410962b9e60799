"""Behaviour of the fused kernels, their dispatch and the buffer pool that mutation testing found
untested: each test here fails on at least one hand-made mutant of ``imgdiff.kernels`` or
``imgdiff.buffers`` that the rest of the suite let through.

Oracles are the updates written out from their formulas in float64, exact identities (values
chosen so that float32 arithmetic is exact and a rounding in between is not), torch's own
round-to-nearest-even bfloat16 conversion, or the torch path of the same call.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor

import imgdiff
from imgdiff import buffers, kernels
from imgdiff.kernels import reference

from .conftest import backends_here, device_for

BACKENDS = backends_here()
FUSED = [b for b in BACKENDS if b != "torch"]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
needs_cpu_kernels = pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the CPU kernels")
IVE = imgdiff.InputValueError
BF16 = torch.bfloat16


def _randn(
    *shape: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _fmt(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def _assert_near(got: Tensor, want: Tensor, rel: float = 1e-5) -> None:
    """``got`` (any layout) equals the float64 oracle ``want`` within ``rel`` of its magnitude."""
    assert got.shape == want.shape
    scale = float(want.abs().max()) + 1e-30
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * scale, (err, scale)


# -- seeded noise off Triton: the seeded torch draw ------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        (backend, dtype)
        for backend in BACKENDS
        if backend != "triton"
        for dtype in (torch.float32, BF16)
    ],
)
def test_a_seed_draws_the_seeded_torch_noise_off_triton(backend: str, dtype: torch.dtype) -> None:
    """Off Triton a ``seed`` stands for a float32 draw of a seeded ``torch.Generator``
    (docs/kernels.md): the result is, bitwise, the torch path's ``a x + b y + c z`` with that draw
    (float32 arithmetic, one rounding to x's dtype; the draw is not rounded first)."""
    x, y = (_randn(2, 3, 5, 7, seed=s, dtype=dtype) for s in (1, 2))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))  # float32
    got = kernels.lincomb3(x, 0.6, y, -0.2, c=0.7, seed=11, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(got, reference.lincomb3(x, 0.6, y, -0.2, z, 0.7))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_seeded_blend_pastes_the_seeded_torch_noise_off_triton(
    backend: str, dtype: torch.dtype
) -> None:
    """The noised paste's ``seed`` is the same float32 draw (float64 formula)."""
    x, known = (_randn(2, 3, 5, 7, seed=s, dtype=dtype) for s in (1, 3))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    mask = (torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(4)) > 0.5).to(dtype)
    got = kernels.inpaint_blend(  # type: ignore[arg-type]
        x, known, mask, known_scale=0.8, noise_scale=0.6, seed=11, backend=backend
    )
    m = mask.double()
    want = (1 - m) * x.double() + m * (0.8 * known.double() + 0.6 * z.double())
    _assert_near(got, want, 1e-6 if dtype == torch.float32 else 2**-7)


# -- Triton's in-kernel Philox noise ---------------------------------------------------------------


@needs_triton
def test_in_kernel_noise_is_a_new_draw_in_every_block() -> None:
    """The Philox stream is keyed by each element's global offset: the 1024-element blocks of a
    launch draw different values (a stream keyed by the offset within the block repeats)."""
    x = torch.zeros(3, 1000, device=device_for("triton"))  # three blocks, the last partial
    a = kernels.lincomb3(x, 1.0, x, 1.0, c=1.0, seed=3, backend="triton").flatten().cpu()
    assert bool((a[:1024] != a[1024:2048]).all())
    assert bool((a[:952] != a[2048:]).all())
    blend = (
        kernels.inpaint_blend(
            x[:, :, None],
            x[:, :, None],
            torch.ones(3, 1, 1, device=x.device),
            noise_scale=1.0,
            seed=3,
            backend="triton",
        )
        .flatten()
        .cpu()
    )
    assert torch.equal(blend, a)  # the blend draws the same stream


# -- operands in another layout than x ------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("x_channels_last", [True, False])
def test_operands_laid_out_otherwise_than_x(backend: str, x_channels_last: bool) -> None:
    """Every kernel walks its operands with x's linear index, so an operand in the other dense
    layout (x channels-last and the rest contiguous, or the reverse) must be re-laid out first:
    each result equals the float64 formula."""
    dev = device_for(backend)
    x, y, z, e = (_randn(2, 3, 5, 7, seed=s, device=dev) for s in range(4))
    x = _fmt(x, x_channels_last)
    y, z, e = (_fmt(t, not x_channels_last) for t in (y, z, e))
    X, Y, Z, E = (t.double() for t in (x, y, z, e))
    b: kernels.Backend = backend  # type: ignore[assignment]

    _assert_near(kernels.lincomb3(x, 0.9, y, -0.4, z, 0.3, backend=b), 0.9 * X - 0.4 * Y + 0.3 * Z)
    mask = _fmt((_randn(2, 3, 5, 7, seed=9, device=dev) > 0).float(), not x_channels_last)
    M = mask.double()
    got = kernels.inpaint_blend(x, y, mask, known_scale=0.8, noise=z, noise_scale=0.6, backend=b)
    _assert_near(got, (1 - M) * X + M * (0.8 * Y + 0.6 * Z))
    p = 0.9
    mx, my = kernels.edict_mix(x, y, p, backend=b)
    x1 = p * X + (1 - p) * Y
    _assert_near(mx, x1)
    _assert_near(my, p * Y + (1 - p) * x1)
    ux, uy = kernels.edict_unmix(x, y, p, backend=b)
    y0 = (Y - (1 - p) * X) / p
    _assert_near(uy, y0)
    _assert_near(ux, (X - (1 - p) * y0) / p)
    for update in ("x", "y"):
        sx, sy = kernels.edict_substep_mix(x, y, e, 0.97, -0.2, p, update=update, c=0.4, backend=b)  # type: ignore[arg-type]
        u, v = (
            (0.97 * X - 0.2 * E + 0.4 * Y, Y)
            if update == "x"
            else (X, 0.97 * Y - 0.2 * E + 0.4 * X)
        )
        u1 = p * u + (1 - p) * v
        _assert_near(sx, u1)
        _assert_near(sy, p * v + (1 - p) * u1)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_broadcast_mask_that_is_not_contiguous(backend: str, channels_last: bool) -> None:
    """A ``(B, 1, H, W)`` mask that is a strided view (a transpose, a slice) is read in its
    logical order, in both broadcast walks (contiguous and channels-last x)."""
    dev = device_for(backend)
    x, known = (_fmt(_randn(2, 3, 5, 7, seed=s, device=dev), channels_last) for s in (1, 2))
    wide = (_randn(2, 1, 10, 14, seed=3, device=dev) > 0).float()
    for mask in (wide.transpose(2, 3)[:, :, :5, :7], wide[:, :, :5, ::2]):  # (2, 1, 5, 7) views
        assert not mask.is_contiguous()
        got = kernels.inpaint_blend(x, known, mask, known_scale=0.5, backend=backend)  # type: ignore[arg-type]
        M = mask.double()
        _assert_near(got, (1 - M) * x.double() + M * 0.5 * known.double())


# -- the Triton-only kernels on other layouts ------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("learned_range", [True, False])
def test_learned_variance_step_on_channels_last_and_strided_inputs(learned_range: bool) -> None:
    """``ddpm_learned_step``'s kernel indexes contiguous ``(B, C*S)`` memory: channels-last or
    strided ``x``, ``out`` and ``noise`` are read in their logical order (float64 formula)."""
    dev = device_for("triton")
    x = _fmt(_randn(2, 3, 4, 5, seed=1, device=dev), True)
    out = _fmt(_randn(2, 6, 4, 5, seed=2, device=dev), True) * 0.5
    noise = _randn(2, 3, 5, 4, seed=3, device=dev).transpose(2, 3)
    lb, lbt = -4.0, -5.0
    got = kernels.ddpm_learned_step(
        x,
        out,
        0.9,
        0.2,
        noise,
        log_beta=lb,
        log_beta_tilde=lbt,
        learned_range=learned_range,
        backend="triton",
    )
    mean, v = out.double()[:, :3], out.double()[:, 3:]
    log_var = (v + 1) / 2 * lb + (1 - (v + 1) / 2) * lbt if learned_range else v
    _assert_near(got, 0.9 * x.double() + 0.2 * mean + torch.exp(0.5 * log_var) * noise.double())


@needs_triton
def test_threshold_apply_on_strided_inputs() -> None:
    """The threshold kernel reads one ``s`` per sample over contiguous memory: a strided slice of
    ``x0``, or a view whose batch dimension is not the outermost, is read in its logical order."""
    dev = device_for("triton")
    s = torch.tensor([0.5, 1.0, 1.5], device=dev)
    t = s.double().view(3, 1, 1, 1)
    for x0 in (
        2 * _randn(3, 4, 6, 10, seed=1, device=dev)[..., ::2],  # not dense
        2 * _randn(4, 3, 6, 5, seed=2, device=dev).transpose(0, 1),  # batch inside
    ):
        got = kernels.threshold_apply(x0, s, backend="triton")
        _assert_near(got, torch.maximum(torch.minimum(x0.double(), t), -t) / t)


# -- a zero noise weight leaves out an overflowing variance ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_step_with_noise_mask_zero_is_the_mean_even_where_the_variance_overflows(
    backend: str,
) -> None:
    """The last DDPM step (``noise_mask = 0``) is the mean alone: an overflowing
    ``exp(log Sigma / 2)`` (or an inf in the noise) must not turn it into NaN (``0 * inf``)."""
    dev = device_for(backend)
    x = _randn(2, 3, 4, 4, seed=1, device=dev)
    out = torch.cat([_randn(2, 3, 4, 4, seed=2, device=dev), torch.full_like(x, 400.0)], dim=1)
    noise = _randn(2, 3, 4, 4, seed=3, device=dev)
    noise[0, 0, 0, 0] = float("inf")
    for learned_range in (False, True):
        got = kernels.ddpm_learned_step(  # type: ignore[arg-type]
            x,
            out,
            0.9,
            0.2,
            noise,
            log_beta=-4.0,
            log_beta_tilde=-5.0,
            noise_mask=0.0,
            learned_range=learned_range,
            backend=backend,
        )
        assert torch.isfinite(got).all()
        _assert_near(got, 0.9 * x.double() + 0.2 * out[:, :3].double())


# -- float32 arithmetic whatever the storage -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_updates_round_once_at_the_end(backend: str) -> None:
    """Arithmetic is float32 for bfloat16 storage and only the result is rounded: values chosen so
    that float32 is exact while any bfloat16 rounding in between loses everything
    (1 + 2^-9 is 1 in bfloat16)."""
    dev = device_for(backend)
    b: kernels.Backend = backend  # type: ignore[assignment]
    one = torch.ones(2, 3, 4, 5, device=dev, dtype=BF16)
    tiny = torch.full_like(one, 2**-9)
    got = kernels.lincomb3(one, 1.0, tiny, 1.0, -one, 1.0, backend=b)
    assert torch.equal(got, tiny)
    # EDICT's fused sub-step: the moved sequence 1 -> 1 + 2^-9, then x' = (x + y) / 2 with the
    # other one at -1
    for update in ("x", "y"):
        u, v = (one, -one) if update == "x" else (-one, one)
        sx, _ = kernels.edict_substep_mix(u, v, tiny, 1.0, 1.0, 0.5, update=update, backend=b)
        assert torch.equal(sx, torch.full_like(one, 2**-10))  # ((1 + 2^-9) - 1) / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [15, 45])  # all in a vector's tail; two vectors of 16 and a tail
def test_bfloat16_results_round_to_nearest_even(backend: str, n: int) -> None:
    """Exact float32 results halfway between two bfloat16 values round to the even one, as
    torch's conversion does, wherever they fall in a block (vectors of 16 or the scalar tail)."""
    dev = device_for(backend)
    if backend == "triton" and dev == "cpu":
        pytest.skip("Triton's interpreter truncates float32 -> bfloat16 casts (numpy, no rounding)")
    k = torch.arange(n) % 64 * 2 + 1  # odd multiples of 2^-8: exactly halfway above 1
    x = torch.ones(1, n, dtype=BF16)
    y = (k * 2.0**-8).to(BF16).view(1, n)
    assert torch.equal(y.float(), k.view(1, n) * 2.0**-8)  # exact in bfloat16
    want = (1 + k.view(1, n) * 2.0**-8).to(BF16)  # torch rounds to nearest even
    got = kernels.lincomb3(x.to(dev), 1.0, y.to(dev), 1.0, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, (1 + (k.view(1, n) - 1) * 2.0**-8).to(BF16))  # not all down


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_results_keep_nan(backend: str) -> None:
    """A NaN stays a NaN in a bfloat16 result, in the vectors and in the scalar tail, whatever its
    payload: also a float32 mask NaN whose payload would carry into the sign when rounded."""
    dev = device_for(backend)
    n = 40
    x = torch.randn(1, 1, 1, n, generator=torch.Generator().manual_seed(0)).to(BF16)
    x[..., ::3] = float("nan")
    got = kernels.lincomb3(x.to(dev), 1.0, x.to(dev), 0.5, backend=backend).cpu()  # type: ignore[arg-type]
    assert torch.equal(got.isnan(), x.isnan())
    payload = torch.full((1, 1, 1, n), 0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    assert payload.isnan().all()
    blend = kernels.inpaint_blend(x.to(dev), x.to(dev), payload.to(dev), backend=backend)  # type: ignore[arg-type]
    assert blend.isnan().all()


# -- in-place outputs on several threads -----------------------------------------------------------


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_in_place_outputs_on_several_threads(dtype: torch.dtype) -> None:
    """With a team of threads (32768 elements and more) each thread reads and writes only its
    own blocks, so writing into an input gives what a new output holds."""
    if not kernels.cpu._library().threads:
        pytest.skip("needs the CPU kernels built with OpenMP")
    x, y, w = (_randn(2, 4, 64, 65, seed=s, dtype=dtype) for s in range(3))
    mask = (torch.rand(2, 1, 64, 65, generator=torch.Generator().manual_seed(5)) > 0.5).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = kernels.fused_lincomb3("cpu", x, 0.9, y, -0.3, w, 0.2)
        z = x.clone()
        got = kernels.fused_lincomb3("cpu", z, 0.9, y, -0.3, w, 0.2, in_place=True)
        assert got.data_ptr() == z.data_ptr()
        assert torch.equal(got, want)
        for update_x in (True, False):
            want_pair = kernels.fused_edict_substep_mix(
                "cpu", x, y, w, 0.97, -0.2, 0.93, update_x, 0.4
            )
            u, v = x.clone(), y.clone()
            got_pair = kernels.fused_edict_substep_mix(
                "cpu", u, v, w, 0.97, -0.2, 0.93, update_x, 0.4, in_place=True
            )
            for g_, w_ in zip(got_pair, want_pair, strict=True):
                assert torch.equal(g_, w_)
        want = kernels.fused_inpaint_blend("cpu", x, y, mask, 0.8, w, 0.6)
        z = w.clone()
        got = kernels.fused_inpaint_blend("cpu", x, y, mask, 0.8, z, 0.6, into_noise=True)
        assert got.data_ptr() == z.data_ptr()
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((1, 600, 8, 8), True),  # sites of 600 channels: longer than a run of 512
        ((2, 7, 48, 50), True),  # runs of 73 sites of 7 channels
        ((2, 3, 80, 70), False),  # rows of a 5600-element plane, in runs of 512
    ],
)
def test_blend_writes_its_output_once_and_nothing_past_it(
    backend: str, shape: tuple[int, int, int, int], channels_last: bool
) -> None:
    """The blend's broadcast walks cover each output element once: written into a noise tensor
    that is a view at the start of a larger buffer (``into_noise``), every value is the formula
    and the elements after it are untouched, on one thread and on a team of two (32768 elements
    and more)."""
    dev = device_for(backend)
    B, C, H, W = shape
    N = B * C * H * W
    x, known = (_fmt(_randn(*shape, seed=s, device=dev), channels_last) for s in (1, 2))
    mask = torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(3)).to(dev)
    threads = [1, 2] if backend == "cpu" and kernels.cpu._library().threads else [None]
    before = torch.get_num_threads()
    try:
        for n_threads in threads:
            if n_threads is not None:
                torch.set_num_threads(n_threads)
            buf = torch.full((N + 64,), 7.0, device=dev)  # sentinels after the output
            flat = buf[:N].copy_(_randn(N, seed=4, device=dev))
            z = flat.view(B, H, W, C).permute(0, 3, 1, 2) if channels_last else flat.view(shape)
            assert z.stride() == x.stride()
            Z = z.double()
            M = mask.double()
            want = (1 - M) * x.double() + M * (0.8 * known.double() + 0.6 * Z)
            got = kernels.fused_inpaint_blend(backend, x, known, mask, 0.8, z, 0.6, into_noise=True)  # type: ignore[arg-type]
            assert got.data_ptr() == buf.data_ptr()
            _assert_near(got, want)
            assert bool((buf[N:] == 7.0).all())
    finally:
        torch.set_num_threads(before)


# -- the build cache ------------------------------------------------------------------------------


def test_the_extension_is_rebuilt_when_the_kernels_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cpu_module.c`` includes ``cpu_kernels.c``: the extension's cache key covers both, so an
    edited (or upgraded) kernel source is never served by a stale build."""
    from imgdiff.kernels import cpu

    built: list[str] = []

    def fake_compile(compiler: object, flags: object, source: Path, target: Path) -> None:
        built.append(target.name)
        target.write_bytes(b"")

    kernels_source = tmp_path / "cpu_kernels.c"
    monkeypatch.setattr(cpu, "_SOURCE", kernels_source)
    monkeypatch.setattr(cpu, "_compile", fake_compile)
    builder = cpu._Builder(("cc",), tmp_path)
    targets = []
    for text in ("int a;", "int b;", "int a;"):
        kernels_source.write_text(text)
        targets.append(builder.build(cpu._MODULE_SOURCE, ("-O3",), "tag", []))
    assert targets[0] != targets[1]
    assert targets[2] == targets[0]  # the first build, from the cache
    assert len(built) == 2


# -- dispatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_the_size_limit_is_inclusive(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors of up to ``_MAX_NUMEL`` (2^31 - 1: int32 offsets reach them all) elements run the
    kernels; only larger ones take the reference path (the limit lowered here to 24)."""
    assert kernels._MAX_NUMEL == 2**31 - 1
    monkeypatch.setattr(kernels, "_MAX_NUMEL", 24)
    dev = device_for(backend)
    b: kernels.Backend = backend  # type: ignore[assignment]
    largest, over = torch.zeros(2, 3, 4, device=dev), torch.zeros(25, device=dev)
    assert kernels.resolve_backend(b, largest) == backend
    assert kernels.fused_backend(b, largest) == backend
    assert kernels.resolve_backend(b, over) == "torch"
    assert kernels.fused_backend(b, over) is None


def test_fused_for_keeps_the_kernels_when_autograd_is_off() -> None:
    """``fused_for`` sends an update to torch only where autograd would record it: under
    ``no_grad`` an operand that requires a gradient does not matter."""
    w = torch.zeros(2, 3, requires_grad=True)
    with torch.no_grad():
        assert kernels.fused_for("cpu", w) == "cpu"
    assert kernels.fused_for("cpu", w) is None
    assert kernels.fused_for("cpu", w.detach(), None) == "cpu"


@needs_triton
def test_triton_interpret_zero_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TRITON_INTERPRET=0`` does not turn the interpreter on: Triton on CPU tensors raises."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(IVE, match="TRITON_INTERPRET"):
        kernels.resolve_backend("triton", torch.zeros(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtype_noise_gets_torch_promotion(backend: str) -> None:
    """A float32 noise with bfloat16 ``x`` and ``y`` is not rounded to bfloat16 first: the
    difference it makes with ``x`` survives (a kernel would round it to zero)."""
    dev = device_for(backend)
    x = _randn(2, 4, 8, 8, seed=1, dtype=BF16, device=dev)
    y = _randn(2, 4, 8, 8, seed=2, dtype=BF16, device=dev)
    noise = -(x.float() + 1e-3 * _randn(2, 4, 8, 8, seed=3, device=dev))
    got = kernels.lincomb3(x, 1.0, y, 0.0, noise, 1.0, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(got, kernels.lincomb3(x, 1.0, y, 0.0, noise, 1.0, backend="torch"))
    assert float((got == 0).float().mean()) < 0.05


@needs_triton
def test_learned_step_with_mixed_dtypes_gets_torch_promotion() -> None:
    """A float64 model output or noise with a float32 ``x`` runs torch's promoted arithmetic, as
    the other public functions do (the kernel would compute in float32)."""
    dev = device_for("triton")
    x = _randn(2, 3, 8, 8, seed=1, device=dev)
    out = _randn(2, 6, 8, 8, seed=2, device=dev).double()
    noise = _randn(2, 3, 8, 8, seed=3, device=dev)
    kw = {"log_beta": -4.0, "log_beta_tilde": -5.0, "noise_mask": 1.0}
    for o, n in ((out, noise), (out.float(), noise.double())):
        got = kernels.ddpm_learned_step(x, o, 0.9, 0.1, n, backend="triton", **kw)  # type: ignore[arg-type]
        assert torch.equal(got, kernels.ddpm_learned_step(x, o, 0.9, 0.1, n, backend="torch", **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_operands_on_another_device_are_named(backend: str) -> None:
    """The public functions name an operand on another device than ``x`` before any backend
    runs (a kernel would read its address as host memory): ``meta`` stands in for another
    device here."""
    x = torch.zeros(1, 2, 3, 3)
    meta = torch.zeros(1, 2, 3, 3, device="meta")
    b: kernels.Backend = backend  # type: ignore[assignment]
    with pytest.raises(IVE, match="mask: expected a tensor on cpu"):
        kernels.inpaint_blend(x, x, meta[:, :1], backend=b)
    with pytest.raises(IVE, match="known: expected a tensor on cpu"):
        kernels.inpaint_blend(x, meta, x[:, :1], backend=b)
    with pytest.raises(IVE, match="y: expected a tensor on cpu"):
        kernels.lincomb3(x, 1.0, meta, 1.0, backend=b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_to_the_mask_and_the_thresholds(backend: str) -> None:
    """A mask or per-sample thresholds that need a gradient take the torch path: the result
    carries the gradient, ``d/dm`` of the blend is ``pasted - x`` and ``d/ds`` of
    ``clamp(x0, -s, s) / s`` is ``-x0 / s^2`` inside the band."""
    dev = device_for(backend)
    b: kernels.Backend = backend  # type: ignore[assignment]
    x, known = _randn(2, 3, 4, 4, seed=1, device=dev), _randn(2, 3, 4, 4, seed=2, device=dev)
    mask = torch.full((2, 1, 4, 4), 0.25, device=dev, requires_grad=True)
    kernels.inpaint_blend(x, known, mask, known_scale=0.5, backend=b).sum().backward()
    assert mask.grad is not None
    _assert_near(mask.grad, (0.5 * known.double() - x.double()).sum(1, keepdim=True))
    x0 = 0.1 * _randn(2, 3, 4, 4, seed=3, device=dev)
    s = torch.tensor([1.0, 2.0], device=dev, requires_grad=True)
    kernels.threshold_apply(x0, s, backend=b).sum().backward()
    assert s.grad is not None
    _assert_near(s.grad, -x0.double().sum((1, 2, 3)) / s.detach().double() ** 2)


@needs_triton
def test_blend_into_noise_of_another_dtype_returns_x_dtype() -> None:
    """``into_noise`` writes into the noise only where it has ``x``'s dtype: a float32 draw with
    a bfloat16 ``x`` gives a new bfloat16 tensor and leaves the draw alone."""
    dev = device_for("triton")
    x, known = (_randn(2, 3, 4, 4, seed=s, dtype=BF16, device=dev) for s in (1, 2))
    noise = _randn(2, 3, 4, 4, seed=3, device=dev)
    kept = noise.clone()
    mask = torch.ones(2, 1, 4, 4, device=dev)
    for impl in FUSED:
        got = kernels.fused_inpaint_blend(impl, x, known, mask, 0.8, noise, 0.6, into_noise=True)  # type: ignore[arg-type]
        assert got.dtype == BF16
        assert torch.equal(noise, kept)
        _assert_near(got, 0.8 * known.double() + 0.6 * noise.double(), 2**-7)


# -- the buffer pool --------------------------------------------------------------------------------

SHAPE = (4, 4, 128, 128)  # 1 MiB in float32: buffers.MIN_BYTES


@pytest.mark.skipif(not buffers._SUPPORTED, reason="no exact reference counts here")
def test_out_like_leaves_operations_autograd_records_to_torch() -> None:
    """An ``out=`` buffer is offered only where autograd need not see the operation: not when any
    operand, the second included, requires a gradient with grad mode on."""
    x = torch.randn(SHAPE)
    w = torch.randn(SHAPE, requires_grad=True)
    with buffers.reuse_buffers():
        assert buffers.out_like(x, w) is None
        assert buffers.out_like(x, x, w) is None
        with torch.no_grad():
            assert buffers.out_like(x, w) is not None


@pytest.mark.skipif(not buffers._SUPPORTED, reason="no exact reference counts here")
def test_a_reused_channels_last_buffer_keeps_its_layout() -> None:
    """The second time a channels-last buffer is handed out it is channels-last again, so a
    kernel that writes in x's memory order gives the right values on every step of a loop."""
    pool = buffers.BufferPool()
    x = torch.empty(SHAPE).contiguous(memory_format=torch.channels_last)
    a = pool.empty_like(x)
    ptr, stride = a.data_ptr(), a.stride()
    del a
    b = pool.empty_like(x)
    assert b.data_ptr() == ptr
    assert b.stride() == stride
    x = _fmt(_randn(*SHAPE, seed=0), True)
    y = _fmt(_randn(*SHAPE, seed=1), True)
    want = 0.5 * x.double() - 0.25 * y.double()
    with buffers.reuse_buffers():
        for _ in range(3):
            got = kernels.lincomb3(x, 0.5, y, -0.25)
            _assert_near(got, want)
            del got


def test_the_pool_leaves_tensors_of_other_devices_to_torch() -> None:
    """``BufferPool.empty_like`` pools CPU memory only: another device's tensor gets
    ``torch.empty_like``, on that device."""
    pool = buffers.BufferPool()
    meta = torch.empty(SHAPE, device="meta")
    out = pool.empty_like(meta)
    assert out.device.type == "meta"
    assert out.shape == meta.shape
    assert len(pool) == 0
