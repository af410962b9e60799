"""The Triton kernels compile for an H100/H200 (sm_90) without a GPU, and their PTX moves each
operand once in 128-bit accesses (``benchmarks/triton_ptx.py``, run in a subprocess: this test
session runs Triton's interpreter, which never compiles).

The interpreter checks what the kernels compute; this checks what only the compiler sees: that
every variant the wrappers launch compiles (types, constexpr branches, the Philox draw) and that
Triton, given the alignment facts a launch derives, vectorises every element access, so the
kernels can approach the copy bandwidth on the GPU (issue 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (kernel, constexprs) -> pointer arguments read element by element, written, gathered (one
# scalar load per element): read here from the kernels' source, independently of the script.
OPERANDS: dict[tuple[str, tuple[tuple[str, object], ...]], tuple[list[str], list[str], int]] = {
    ("_lincomb3_kernel", (("HAS_NOISE", False), ("RANDOM", False))): (["x", "y"], ["out"], 0),
    ("_lincomb3_kernel", (("HAS_NOISE", True), ("RANDOM", False))): (["x", "y", "n"], ["out"], 0),
    ("_lincomb3_kernel", (("HAS_NOISE", False), ("RANDOM", True))): (["x", "y"], ["out"], 0),
    ("_inpaint_kernel", (("MASK_MODE", 0), ("HAS_NOISE", False), ("RANDOM", False))): (
        ["x", "k", "m"],
        ["out"],
        0,
    ),
    ("_inpaint_kernel", (("MASK_MODE", 1), ("HAS_NOISE", True), ("RANDOM", False))): (
        ["x", "k", "m", "n"],
        ["out"],
        0,
    ),
    ("_inpaint_kernel", (("MASK_MODE", 2), ("HAS_NOISE", False), ("RANDOM", True))): (
        ["x", "k"],
        ["out"],
        1,
    ),
    ("_edict_mix_kernel", ()): (["u", "v"], ["uo", "vo"], 0),
    ("_edict_substep_mix_kernel", (("UPDATE_X", True),)): (["x", "y", "e"], ["xo", "yo"], 0),
    ("_edict_substep_mix_kernel", (("UPDATE_X", False),)): (["x", "y", "e"], ["xo", "yo"], 0),
    # the model output twice over: its mean half, and with noise its variance half
    ("_ddpm_learned_kernel", (("HAS_NOISE", True), ("LEARNED_RANGE", True))): (
        ["x", "out", "out", "n"],
        ["y"],
        0,
    ),
    ("_ddpm_learned_kernel", (("HAS_NOISE", True), ("LEARNED_RANGE", False))): (
        ["x", "out", "out", "n"],
        ["y"],
        0,
    ),
    ("_ddpm_learned_kernel", (("HAS_NOISE", False), ("LEARNED_RANGE", True))): (
        ["x", "out"],
        ["y"],
        0,
    ),
    ("_threshold_kernel", ()): (["x"], ["y"], 1),
}


def _vector_accesses(kind: str, per_thread: int, itemsizes: list[int]) -> Counter[str]:
    """Per thread, ``per_thread`` elements of each operand: 16-byte accesses (8 bytes: one)."""
    counts: Counter[str] = Counter()
    for size in itemsizes:
        nbytes = per_thread * size
        if nbytes >= 16:
            counts[f"{kind}.global.v4.b32"] += nbytes // 16
        else:
            counts[f"{kind}.global.v2.b32"] += 1
    return counts


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # no NVIDIA backend in this triton build
        pytest.skip(f"triton has no NVIDIA backend here: {exc!r}")
    if not ptxas or not Path(ptxas).is_file():
        pytest.skip("triton's ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_ptx.py"), "--json", "--targets", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result: list[dict[str, Any]] = json.loads(run.stdout)
    return result


def test_every_variant_compiles_to_cubin(variants: list[dict[str, Any]]) -> None:
    """Each constexpr combination the wrappers launch, in float32, bfloat16 and float16, aligned
    and odd-sized, compiles down to a cubin for sm_90, in registers alone (no spill to local
    memory, which would add memory traffic to a bandwidth-bound kernel)."""
    for v in variants:
        assert v["spilled_bytes"] == 0, v
        assert 0 < v["registers"] <= 255, v
    seen = {
        (v["kernel"], tuple(v["meta"].items()), v["dtype"], v["aligned"])
        for v in variants
        if v["cubin_bytes"] > 0 and v["target"] == 90
    }
    expected = {
        (kernel, meta, dtype, aligned)
        for kernel, meta in OPERANDS
        for dtype in ("float32", "bfloat16", "float16")
        for aligned in (True, False)
    }
    assert seen == expected


def test_each_operand_moves_once_in_vector_accesses(variants: list[dict[str, Any]]) -> None:
    """With aligned dense operands, per thread: ``BLOCK / (32 num_warps)`` elements of each read
    operand in ``ld.global.v4.b32`` (16 bytes each; a bool mask's 8 bytes in one
    ``ld.global.v2.b32``), as many of each output in ``st.global.v4.b32``, and scalar loads only
    for the gathered operand, one per element."""
    checked = 0
    for v in variants:
        if not v["aligned"]:
            continue
        reads, writes, gathers = OPERANDS[(v["kernel"], tuple(v["meta"].items()))]
        per_thread = v["block"] // (32 * v["num_warps"])
        size = v["itemsize"]
        label = f"{v['kernel']} {v['meta']} {v['dtype']} {v['other_dtypes']}"
        loads = Counter(v["loads"])
        vector = Counter({op: n for op, n in loads.items() if ".v4." in op or ".v2." in op})
        assert vector == _vector_accesses("ld", per_thread, [size[r + "_ptr"] for r in reads]), (
            label
        )
        assert loads.total() - vector.total() == gathers * per_thread, label
        assert v["stores"] == _vector_accesses(
            "st", per_thread, [size[w + "_ptr"] for w in writes]
        ), label
        assert v["one_pass_wide"], label
        checked += 1
    bool_masks = sum(v["aligned"] and v["other_dtypes"].get("m_ptr") == "bool" for v in variants)
    assert checked == len(OPERANDS) * 3 + bool_masks
    assert bool_masks == 2 * 3
