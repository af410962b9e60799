"""The exact denoisers compute in float64 whatever the sample's dtype."""

from __future__ import annotations

import pytest
import torch

from imgdiff import EmpiricalDenoiser, GaussianDenoiser, NoiseSchedule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_oracles_round_the_float64_answer_once(dtype: torch.dtype, prediction: str) -> None:
    """In half precision the oracles return the float64 answer rounded to the sample's dtype
    (they cast alpha_bar first, so alpha_bar_0 = 0.9999 became 1: an error or non-finite)."""
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g).to(dtype)
    t = torch.tensor([0, 1, 999])
    data = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    for oracle in (
        GaussianDenoiser(s, prediction=prediction),  # type: ignore[arg-type]
        EmpiricalDenoiser(s, data, prediction=prediction),  # type: ignore[arg-type]
    ):
        out = oracle(x, t)
        assert out.dtype == dtype
        want = oracle(x.double(), t)
        torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=0)
