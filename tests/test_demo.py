"""The main job: ``python -m imgdiff demo --quick`` runs end to end and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from imgdiff.degradations import TASKS
from imgdiff.demo import main
from imgdiff.training import load_checkpoint


def test_quick_demo_writes_grids_and_metrics(tmp_path: Path) -> None:
    """Trains, samples every task with DDPM and DDIM, writes one PNG per task and metrics.json."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgdiff",
            "demo",
            "--quick",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "trained 40 steps" in out.stdout
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary["metrics"]) == set(TASKS)
    for task in TASKS:
        assert (tmp_path / f"{task}.png").stat().st_size > 500
        for sampler in ("ddpm", "ddim"):
            m = summary["metrics"][task][sampler]
            assert 0 < m["psnr"] < 100
            assert -1 <= m["ssim"] <= 1
    assert load_checkpoint(tmp_path / "model.safetensors")[1]["step"] == 40
    # --resume continues that checkpoint to the new step count instead of starting again.
    main(["demo", "--quick", "--out", str(tmp_path), "--steps", "44", "--resume", "--no-progress"])
    tensors, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["step"] == 44
    assert tensors["losses"].shape == (44,)
