"""Static check of the Triton kernels for a GPU, run without one.

Compiles every variant the wrappers of ``imgdiff.kernels.fused`` launch (each constexpr
combination: noise read or drawn in the kernel, the three mask modes, both EDICT sub-steps, the
learned-variance forms; float32, bfloat16 and float16 states) for NVIDIA targets (default sm_90,
the H100/H200, and sm_80, the A100), through Triton's own launch specialization (the signature
and the 16-byte alignment facts a real launch derives from the same arguments), down to cubin
with the ``ptxas`` Triton ships (whose ``-v`` gives registers and spills). Then reads the PTX:
each kernel's global loads and stores by width. A memory-bound kernel near the copy bandwidth reads each operand once and writes each
output once, in 128-bit accesses (``ld.global.v4.b32`` / ``st.global.v4.b32``); the count
expected per thread is ``BLOCK / (32 num_warps)`` elements times the operand's item size over
16 bytes. Gathers the kernels make on purpose (a ``(B, 1, H, W)`` mask against channels-last
memory, the per-sample scale of dynamic thresholding) and the constant table of the Philox
normal draw's ``cos`` (``__cudart_i2opi_f``, read only for arguments it never gets) are scalar.

This is not a timing: it says the kernels compile for the GPU and move the bytes they must in
wide accesses; the bandwidth they reach is measured by ``kernels.py`` on a GPU.

Run: ``python benchmarks/triton_ptx.py [--targets 90,80] [--json] [--write benchmarks/RESULTS.md]``
(a few seconds to a minute; needs triton with its NVIDIA backend, no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="imgdiff-triton-ptx-"))

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from imgdiff.kernels import fused

SECTION = "## Triton kernels compiled for NVIDIA GPUs (static, no GPU needed)"

# What each kernel reads element by element, gathers, and writes (pointer argument names): the
# one-pass rule. ``meta`` is the launch's constexprs.
ROLES: dict[str, Callable[[dict[str, Any]], tuple[list[str], list[str], list[str]]]] = {
    "_lincomb3_kernel": lambda m: (
        ["x_ptr", "y_ptr", *(["n_ptr"] if m["HAS_NOISE"] else [])],
        [],
        ["out_ptr"],
    ),
    "_inpaint_kernel": lambda m: (
        [
            "x_ptr",
            "k_ptr",
            *(["m_ptr"] if m["MASK_MODE"] != 2 else []),
            *(["n_ptr"] if m["HAS_NOISE"] else []),
        ],
        ["m_ptr"] if m["MASK_MODE"] == 2 else [],
        ["out_ptr"],
    ),
    "_edict_mix_kernel": lambda m: (["u_ptr", "v_ptr"], [], ["uo_ptr", "vo_ptr"]),
    "_edict_substep_mix_kernel": lambda m: (
        ["x_ptr", "y_ptr", "e_ptr"],
        [],
        ["xo_ptr", "yo_ptr"],
    ),
    # the model output is read twice over: its mean half and (with noise) its variance half
    "_ddpm_learned_kernel": lambda m: (
        ["x_ptr", "out_ptr", *(["out_ptr", "n_ptr"] if m["HAS_NOISE"] else [])],
        [],
        ["y_ptr"],
    ),
    "_threshold_kernel": lambda m: (["x_ptr"], ["s_ptr"], ["y_ptr"]),
}


@dataclass
class Variant:
    """One compiled kernel variant and what its PTX does with global memory."""

    kernel: str
    dtype: str
    other_dtypes: dict[str, str]
    aligned: bool
    meta: dict[str, Any]
    target: int
    num_warps: int
    block: int
    itemsize: dict[str, int]
    loads: dict[str, int]
    stores: dict[str, int]
    cubin_bytes: int
    registers: int
    spilled_bytes: int
    expected_loads: dict[str, int]
    expected_stores: dict[str, int]
    expected_gathers: int

    @property
    def one_pass_wide(self) -> bool:
        """Every element operand read once and every output written once in the widest vector
        accesses its bytes allow; scalar loads only for the gathers, one per element."""
        vector = {op: n for op, n in self.loads.items() if op in _VECTOR_LOADS}
        return (
            vector == self.expected_loads
            and sum(self.loads.values()) - sum(vector.values()) == self.expected_gathers
            and self.stores == self.expected_stores
        )


_VECTOR_LOADS = ("ld.global.v4.b32", "ld.global.v2.b32")


def _accesses(kind: str, per_thread: int, itemsizes: list[int]) -> dict[str, int]:
    """The vector accesses that move ``per_thread`` elements of each operand once: 16-byte ones,
    or one 8-byte access for an operand of 8 bytes a thread (a bool mask)."""
    counts: Counter[str] = Counter()
    for size in itemsizes:
        nbytes = per_thread * size
        if nbytes >= 16:
            counts[f"{kind}.global.v4.b32"] += nbytes // 16
        else:
            counts[f"{kind}.global.v2.b32"] += 1
    return dict(counts)


def _record_launches(
    calls: Callable[[], None],
) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """The launches ``calls`` makes through ``fused._launch``, without running them."""
    launches: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
    original = fused._launch

    def record(kernel: Any, x: torch.Tensor, *args: object, **meta: object) -> None:
        launches.append((kernel, (x, *args), dict(meta, BLOCK=fused.BLOCK, **fused._OPTIONS)))

    fused._launch = record  # type: ignore[assignment]
    try:
        calls()
    finally:
        fused._launch = original  # type: ignore[assignment]
    return launches


def _wrapper_calls(dtype: torch.dtype, shape: tuple[int, int, int, int]) -> Callable[[], None]:
    """Every kernel variant, launched through the public wrappers of ``kernels.fused``."""

    def calls() -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dtype)
        y, n = torch.randn_like(x), torch.randn_like(x)
        B, C, H, W = shape
        mask = (torch.rand(B, 1, H, W, generator=g) > 0.5).to(dtype)
        fused.lincomb3(x, 0.9, y, 0.1)
        fused.lincomb3(x, 0.9, y, 0.1, n, 0.3)
        fused.lincomb3(x, 0.9, y, 0.1, None, 0.3, seed=5)
        fused.inpaint_blend(x, y, mask.expand_as(x).contiguous())
        fused.inpaint_blend(x, y, mask, noise=n, noise_scale=0.5)
        bool_mask = mask > 0
        fused.inpaint_blend(x, y, bool_mask.expand_as(x).contiguous())
        fused.inpaint_blend(x, y, bool_mask, noise=n, noise_scale=0.5)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        fused.inpaint_blend(channels_last, y, mask, noise_scale=0.5, seed=3)
        fused.mix_pair(x, y, 0.93, 0.07)
        fused.edict_substep_mix(x, y, n, 0.9, 0.1, 0.93, True)
        fused.edict_substep_mix(x, y, n, 0.9, 0.1, 0.93, False)
        out = torch.randn(B, 2 * C, H, W, generator=g).to(dtype)
        fused.ddpm_learned_step(x, out, 0.9, 0.1, n, -3.0, -4.0, 1.0)
        fused.ddpm_learned_step(x, out, 0.9, 0.1, n, -3.0, -4.0, 1.0, learned_range=False)
        fused.ddpm_learned_step(x, out, 0.9, 0.1, None, -3.0, -4.0, 0.0)
        fused.threshold_apply(x, torch.full((B,), 1.5))

    return calls


def _compile(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any], target: GPUTarget) -> Any:
    """Compile as ``kernel[grid](*args, **kwargs)`` would on ``target`` (Triton's own binder)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _memory_ops(ptx: str) -> tuple[Counter[str], Counter[str]]:
    """Global loads and stores by instruction, without the libdevice ``cos`` table's loads."""
    loads: Counter[str] = Counter()
    stores: Counter[str] = Counter(re.findall(r"\bst\.global[\w.]*", ptx))
    table = "__cudart_i2opi_f" in ptx  # the only read-only (.nc) global the kernels load
    for op in re.findall(r"\bld\.global[\w.]*", ptx):
        if not (table and ".nc." in op):
            loads[op] += 1
    return loads, stores


def _ptxas_usage(ptx: str, sm: int) -> tuple[int, int]:
    """Registers per thread and spilled bytes (stores + loads) of ``ptx``, from the ``ptxas -v``
    Triton itself uses for ``sm``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        arch, out = f"-arch={sm_arch_from_capability(sm)}", str(Path(folder) / "kernel.cubin")
        run = subprocess.run(
            [get_ptxas(sm).path, arch, "-v", str(src), "-o", out],
            capture_output=True,
            text=True,
            check=True,
        )
    registers = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr)
    if registers is None or len(spills) != 2:
        raise RuntimeError(f"unexpected ptxas -v output: {run.stderr!r}")
    return int(registers.group(1)), sum(int(n) for n in spills)


def analyse(targets: list[int]) -> list[Variant]:
    """Compile every variant for every target and read its PTX."""
    variants = []
    cases = [
        (dtype, shape, shape == (2, 4, 8, 8))
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for shape in ((2, 4, 8, 8), (1, 3, 5, 7))
    ]
    for dtype, shape, is_aligned in cases:
        for kernel, args, kwargs in _record_launches(_wrapper_calls(dtype, shape)):
            names = [p.name for p in kernel.params]
            tensors = {
                name: arg
                for name, arg in zip(names, args, strict=False)
                if isinstance(arg, torch.Tensor)
            }
            itemsize = {name: t.element_size() for name, t in tensors.items()}
            others = {
                name: str(t.dtype).removeprefix("torch.")
                for name, t in tensors.items()
                if t.dtype != dtype
            }
            meta = {k: v for k, v in kwargs.items() if k.isupper() and k != "BLOCK"}
            for sm in targets:
                compiled = _compile(kernel, args, kwargs, GPUTarget("cuda", sm, 32))
                loads, stores = _memory_ops(compiled.asm["ptx"])
                registers, spilled = _ptxas_usage(compiled.asm["ptx"], sm)
                warps = compiled.metadata.num_warps
                per_thread = kwargs["BLOCK"] // (32 * warps)
                reads, gathers, writes = ROLES[kernel.__name__](meta)
                variants.append(
                    Variant(
                        kernel=kernel.__name__,
                        dtype=str(dtype).removeprefix("torch."),
                        other_dtypes=others,
                        aligned=is_aligned,
                        meta=meta,
                        target=sm,
                        num_warps=warps,
                        block=kwargs["BLOCK"],
                        itemsize=itemsize,
                        loads=dict(loads),
                        stores=dict(stores),
                        cubin_bytes=len(compiled.asm["cubin"]),
                        registers=registers,
                        spilled_bytes=spilled,
                        expected_loads=_accesses("ld", per_thread, [itemsize[r] for r in reads]),
                        expected_stores=_accesses("st", per_thread, [itemsize[w] for w in writes]),
                        expected_gathers=per_thread * len(gathers),
                    )
                )
    return variants


def _fmt_ops(ops: dict[str, int]) -> str:
    return ", ".join(f"{n} {op.split('global.')[1]}" for op, n in sorted(ops.items())) or "-"


def report(variants: list[Variant]) -> str:
    """Markdown: one row per aligned variant on the first target, then the summary."""
    first = variants[0].target
    rows = [v for v in variants if v.aligned and v.target == first]
    lines = [
        SECTION,
        "",
        f"Triton {triton.__version__}, torch {torch.__version__}; compiled on this machine (no GPU) "
        "with `python benchmarks/triton_ptx.py --write benchmarks/RESULTS.md`. Each variant is "
        "compiled through Triton's launch specialization for the arguments the wrappers pass, "
        "down to cubin. Counts are per thread, which handles BLOCK / (32 lanes x num_warps) elements; "
        "`v4.b32` = one 128-bit access, `v2.b32` one of 64 bits (a thread's 8 bytes of a bool "
        "mask). Expected: every element operand read once and every output written once in "
        "128-bit accesses, or one 64-bit access for 8 bytes (aligned dense operands, here "
        "(2, 4, 8, 8)); gathers (channels-last mask, per-sample threshold scale) are scalar.",
        "",
        f"| kernel | constexprs | operand dtypes | warps | registers, spills | loads (sm_{first}) | "
        "stores | expected vector loads / stores | one pass, vector accesses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        meta = ", ".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v.meta.items())
        lines.append(
            f"| {v.kernel.strip('_').removesuffix('_kernel')} | {meta or '-'} | "
            f"{', '.join([v.dtype, *(f'{k} {d}' for k, d in v.other_dtypes.items())])} | "
            f"{v.num_warps} | {v.registers}, {v.spilled_bytes} B | {_fmt_ops(v.loads)} | "
            f"{_fmt_ops(v.stores)} | "
            f"{_fmt_ops(v.expected_loads)} / {_fmt_ops(v.expected_stores)} | "
            f"{'yes' if v.one_pass_wide else '**no**'} |"
        )
    targets = sorted({v.target for v in variants})
    compiled = len(variants)
    wide = sum(v.one_pass_wide for v in variants if v.aligned)
    aligned = sum(v.aligned for v in variants)
    lines += [
        "",
        f"Compiled to cubin: {compiled} variants ({compiled // len(targets)} per target, "
        f"targets {', '.join(f'sm_{t}' for t in targets)}), odd-sized unaligned (1, 3, 5, 7) "
        f"ones included (scalar accesses there). One pass in vector accesses: {wide} of the "
        f"{aligned} aligned variants. This says the kernels compile for these GPUs and move "
        "the bytes they must in wide accesses; the bandwidth they reach needs the GPU "
        "(`kernels.py`, section 2).",
    ]
    return "\n".join(lines) + "\n"


def _write(path: Path, section: str) -> None:
    text = path.read_text()
    start = text.find(SECTION)
    if start < 0:
        updated = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        updated = text[:start] + section + ("" if end < 0 else text[end + 1 :])
    path.write_text(updated)


def _targets(value: str) -> list[int]:
    try:
        targets = [int(t) for t in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected compute capabilities like 90,80, got {value!r}"
        ) from None
    if not targets or any(t < 75 for t in targets):
        raise argparse.ArgumentTypeError(f"expected capabilities of 75 or more, got {value!r}")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=_targets, default=[90, 80], help="e.g. 90,80")
    parser.add_argument("--json", action="store_true", help="print every variant as JSON")
    parser.add_argument("--write", type=Path, help="replace this section of RESULTS.md")
    args = parser.parse_args()
    variants = analyse(args.targets)
    if args.json:
        json.dump([asdict(v) | {"one_pass_wide": v.one_pass_wide} for v in variants], sys.stdout)
        print()
        return
    section = report(variants)
    print(section)
    if args.write:
        _write(args.write, section)
        print(f"wrote the section to {args.write}")


if __name__ == "__main__":
    main()
