"""The examples run as a user runs them, and the custom samplers in them are mathematically right."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import imgdiff

from .conftest import child_env

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_and_writes_its_grid(tmp_path: Path) -> None:
    """The README's main job: samples land on training images; inversion round-trips; PNG written."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,  # a guard against a hang, not a timing
        env=child_env(),
    )
    assert (tmp_path / "samples.png").stat().st_size > 1000
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
    for name in ("DDIM 50 steps", "DDPM 250 steps"):
        max_dist = float(lines[name].split("max ")[1].split(",")[0])
        assert max_dist < 0.01, lines[name]
    err = float(out.stdout.split("max abs error ")[1].split()[0])
    assert err < 1e-6


def test_custom_euler_sampler_equals_ddim() -> None:
    """EulerVE (a subclass overriding coefficients/update) is DDIM(eta=0) in another variable."""
    ex = _load("custom_sampler")
    s = imgdiff.NoiseSchedule.scaled_linear()
    model = imgdiff.GaussianDenoiser(s, prediction="v")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for spacing in ("leading", "trailing"):
        a = ex.EulerVE(s, prediction="v", spacing=spacing).sample(
            model, x, num_steps=30, progress=False
        )
        b = imgdiff.DDIM(s, prediction="v", spacing=spacing).sample(
            model, x, num_steps=30, progress=False
        )
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # thresholding reaches the update through self.x0_hat; DDIM derives eps from the clipped
    # x0_hat likewise with rederive_eps
    clip = imgdiff.Clip(0.5)
    a = ex.EulerVE(s, prediction="v", thresholding=clip).sample(
        model, x, num_steps=30, progress=False
    )
    b = imgdiff.DDIM(s, prediction="v", thresholding=clip, rederive_eps=True).sample(
        model, x, num_steps=30, progress=False
    )
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(imgdiff.InputValueError, match=r"^guidance: expected None \(HeunVE"):
        ex.HeunVE(s, guidance=imgdiff.guidance.ClassifierGuidance(len, torch.tensor([0])))


def test_custom_heun_sampler_is_more_accurate() -> None:
    """HeunVE (overriding step, two model calls) beats Euler against the exact Gaussian flow."""
    ex = _load("custom_sampler")
    s = imgdiff.NoiseSchedule.linear()
    model = imgdiff.GaussianDenoiser(s, mean=0.5, std=0.3)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ex.exact_gaussian_flow(s, x, 999, 0.5, 0.3)
    errors = {}
    for n in (20, 40):
        for name in ("EulerVE", "HeunVE"):
            out = getattr(ex, name)(s, spacing="trailing").sample(
                model, x, num_steps=n, progress=False
            )
            errors[name, n] = float((out - exact).abs().max())
    assert errors["HeunVE", 20] < errors["EulerVE", 20] / 1.5
    assert errors["HeunVE", 40] < errors["HeunVE", 20] / 2.5  # better than first order
    assert errors["EulerVE", 40] > errors["EulerVE", 20] / 2.5  # Euler is first order


def test_edict_example_runs(tmp_path: Path) -> None:
    """EDICT reconstructs exactly, DDIM inversion does not, each edit resembles its target class
    more than its source class, and the grid is written."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "edict_inversion.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,  # a guard against a hang, not a timing
        env=child_env(),
    )
    lines = out.stdout.splitlines()
    errors = {
        ln.split()[0]: float(ln.split("max abs error ")[1]) for ln in lines if "max abs error" in ln
    }
    assert errors["EDICT"] < 1e-9
    assert errors["DDIM"] > 1e-2
    edits = [ln for ln in lines if "RMS distance to the nearest" in ln]
    assert len(edits) == 4
    for ln in edits:
        numbers = re.findall(r"nearest \w+ ([0-9.]+)", ln)
        to_target, to_source = (float(v) for v in numbers)
        assert to_target < to_source, ln
    assert (tmp_path / "edict.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clip-pretrained", "openai"], "--clip-pretrained: needs --clip"),
        (["--unet-config", "c.json"], "--unet and --unet-config: give both"),
        (["--image", "missing.png"], "--image: no file at missing.png"),
        (["--size", "30"], "--size: expected a multiple of 4"),
        (["--skip", "20"], "--skip: expected fewer than num_steps"),
    ],
)
def test_zecon_example_reports_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Options that were ignored (--clip-pretrained alone) or failed late with a traceback are
    usage errors naming the flag (exit status 2), before any model is built."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "zecon_style_transfer.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_custom_sampler_example_has_a_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_sampler.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert "usage:" in out.stdout
    assert "EulerVE" not in out.stdout  # it printed the help, it did not run the samplers
