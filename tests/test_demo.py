"""The main job: ``python -m imgdiff demo --quick`` runs end to end and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imgdiff.degradations import TASKS
from imgdiff.demo import DemoConfig, main, train_model
from imgdiff.errors import ImgdiffError, InputValueError
from imgdiff.images import image_grid, save_image_grid, to_uint8
from imgdiff.metrics import psnr, ssim
from imgdiff.training import load_checkpoint

from .conftest import child_env


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
        # a guard against a hang, not a timing: the quick demo takes under a minute alone, but
        # several minutes on a 2-core machine beside other test workers
        timeout=900,
        env=child_env(),
    )
    assert "trained 40 steps" in out.stdout
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary["metrics"]) == set(TASKS)
    quick = DemoConfig.quick()
    for task in TASKS:
        # the grid's rows are source | DDPM | DDIM | ground truth: the metrics recomputed from the
        # 8-bit picture agree with metrics.json (the right rows were scored, in the right order)
        rows = _grid_rows(tmp_path / f"{task}.png", quick.eval_images, quick.image_size)
        assert len(rows) == 4
        for row, sampler in ((rows[1], "ddpm"), (rows[2], "ddim")):
            m = summary["metrics"][task][sampler]
            assert abs(float(psnr(row, rows[3]).mean()) - m["psnr"]) < 0.05, (task, sampler)
            assert abs(float(ssim(row, rows[3]).mean()) - m["ssim"]) < 0.01, (task, sampler)
    assert load_checkpoint(tmp_path / "model.safetensors")[1]["step"] == 40
    first_losses = load_checkpoint(tmp_path / "model.safetensors")[0]["losses"]
    # --resume continues that checkpoint to the new step count instead of starting again; the
    # step count doubles, so a warm-up derived from it (40 // 10 != 80 // 10) would be refused.
    main(["demo", "--quick", "--out", str(tmp_path), "--steps", "80", "--resume", "--no-progress"])
    tensors, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["step"] == 80
    assert meta["config"]["warmup_steps"] == DemoConfig.quick().warmup_steps == 4
    assert tensors["losses"].shape == (80,)
    assert torch.equal(tensors["losses"][:40], first_losses)


def _grid_rows(path: Path, cols: int, size: int, padding: int = 2) -> list[torch.Tensor]:
    """The rows of a saved image grid as ``(cols, 3, size, size)`` tensors in ``[-1, 1]``."""
    from PIL import Image

    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    step = size + padding
    count = (grid.shape[1] - padding) // step
    return [
        torch.stack(
            [
                grid[:, padding + r * step : padding + r * step + size][
                    :, :, padding + c * step : padding + c * step + size
                ]
                for c in range(cols)
            ]
        ).double()
        / 127.5
        - 1.0
        for r in range(count)
    ]


def test_resumed_demo_training_equals_a_longer_run(tmp_path: Path) -> None:
    """Training 3 steps (inside the 4-step warm-up), then resuming to 10, equals training 10 steps
    at once: the warm-up does not depend on the step count, so both runs share one learning-rate
    schedule."""
    quick = DemoConfig.quick()
    short = DemoConfig(**{**asdict(quick), "train_steps": 3, "dataset_size": 32})
    long = DemoConfig(**{**asdict(short), "train_steps": 10})
    train_model(short, tmp_path / "resumed", progress=False)
    resumed, _, resumed_losses = train_model(long, tmp_path / "resumed", False, resume=True)
    full, _, full_losses = train_model(long, tmp_path / "full", progress=False)
    assert len(resumed_losses) == 10
    assert resumed_losses == full_losses
    for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b)


def test_images_refuse_non_finite_values_and_an_empty_batch(tmp_path: Path) -> None:
    """A diverged (NaN or inf) sample is an error, not a black or white picture; so is no image."""
    images = torch.zeros(2, 3, 4, 4)
    assert to_uint8(images).shape == (2, 4, 4, 3)
    assert int(to_uint8(images.clamp(-1, 1) + 5).min()) == 255  # finite values are clamped
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = images.clone()
        bad[1, 0, 2, 2] = value
        with pytest.raises(
            InputValueError, match=r"^images: expected finite values, got 1 NaN or infinite"
        ):
            to_uint8(bad)
        with pytest.raises(InputValueError, match=r"^images: expected finite values"):
            save_image_grid(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(
        InputValueError,
        match=r"^images: expected a non-empty tensor \(no dimension of size 0\), got shape \(0, 3, 4, 4\)",
    ):
        image_grid(torch.zeros(0, 3, 4, 4))
    assert image_grid(images, nrow=1, padding=0).shape == (8, 4, 3)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("image_size", 18, r"^image_size: expected a multiple of 4 .*got 18"),
        ("image_size", 4, r"^image_size: expected an int >= 8"),
        ("train_steps", 0, r"^train_steps: expected an int >= 1"),
        ("ddim_steps", 2.5, r"^ddim_steps: expected an int"),
        ("lr", 0.0, r"^lr: expected a float > 0"),
        ("warmup_steps", -1, r"^warmup_steps: expected an int >= 0"),
        ("prediction", "x0", r"^prediction: expected one of"),
        ("seed", 2**64, r"^seed: expected an int <= "),
    ],
)
def test_demo_config_names_bad_fields(field: str, value: object, match: str) -> None:
    """A bad DemoConfig field is refused at construction, not deep inside training or the U-Net."""
    with pytest.raises(ImgdiffError, match=match):
        replace(DemoConfig.quick(), **{field: value})


def test_demo_warmup_steps_option_and_the_short_run_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--warmup-steps sets the warm-up; a run ending inside its warm-up says so on stderr."""
    args = ["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--steps", "2"]
    main(args)
    assert "ends inside the 4-step learning-rate warm-up" in capsys.readouterr().err
    main([*args, "--warmup-steps", "1"])
    assert "warm-up" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "model.safetensors")[1]["config"]["warmup_steps"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps: expected an int >= 1, got 0"),
        (["--warmup-steps", "-1"], "--warmup-steps: expected an int >= 0, got -1"),
        (["--out", "FILE"], "--out: expected a folder, got the file"),
    ],
)
def test_demo_cli_names_the_flag_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "FILE").touch()
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_cli_resume_with_other_options_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint of another configuration: one line naming --resume and the way out."""
    args = ["demo", "--quick", "--no-progress", "--out", str(tmp_path), "--steps", "1"]
    main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--warmup-steps", "2", "--resume"])
    err = capsys.readouterr().err
    assert "--resume: " in err
    assert "run without --resume to start afresh" in err


def test_demo_config_stores_plain_numbers_and_run_demo_checks_its_arguments(
    tmp_path: Path,
) -> None:
    cfg = replace(DemoConfig.quick(), eval_images=np.int64(2), lr=np.float32(1e-3))
    assert type(cfg.eval_images) is int
    assert type(cfg.lr) is float
    json.dumps(asdict(cfg))
    from imgdiff.demo import run_demo
    from imgdiff.errors import InputTypeError

    with pytest.raises(InputTypeError, match=r"^cfg: expected an imgdiff DemoConfig"):
        run_demo({"seed": 0}, tmp_path / "a")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").touch()
    with pytest.raises(InputValueError, match=r"^out: expected a folder, got the file"):
        run_demo(cfg, tmp_path / "file")
