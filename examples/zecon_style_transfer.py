"""ZeCon-style text-guided style transfer: invert a source image part way, then sample it back
guided by CLIP losses toward a target text while a contrastive loss keeps its content.

What runs (Yang et al. 2023, spec 7.7; :func:`imgdiff.zecon_edit`):

1. DDIM-invert the source to the level of the first kept step (``skip`` of ``num_steps``);
2. DDPM with the network's learned variance, each step guided by
   ``g = -grad [lambda_gp L_clip_global_patch + lambda_dp L_clip_dir_patch + lambda_z L_zecon
   + lambda_mse L_mse + lambda_vgg L_vgg + lambda_r L_range]`` on ZeCon's blend of ``x0_hat`` and
   ``x_t`` (the source blended the same way), with the MSE/VGG terms gated by timestep.

Every loss term is printed, weighted, at every step.

By default everything is random (no download): a tiny open_clip model, the reference U-Net
with random weights and a random VGG. The losses, gradients and the loop are the real ones,
but the picture is not meaningful. To edit for real, give pretrained parts:

    python examples/zecon_style_transfer.py --image photo.png --size 256 \\
        --clip ViT-B-16 --clip-pretrained openai \\
        --unet my_unet.safetensors --unet-config my_unet.json --vgg-pretrained \\
        --source-text "photo" --target-text "watercolor painting" --preset readme

``--unet`` loads a state dict saved from :class:`imgdiff.nets.UNet` (``--unet-config`` is its
``config_dict()`` as JSON; ``learned_variance`` on, ``out_channels`` 3). With ``HF_HUB_OFFLINE=1``
missing CLIP weights fail at once with an error that says where they were looked for.

Run: ``python examples/zecon_style_transfer.py [--out DIR]`` (under a minute on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor

import imgdiff
from imgdiff.clip import CLIPEncoder, load_clip, register_clip_config, tiny_clip_config
from imgdiff.data import toy_shapes
from imgdiff.images import save_image_grid
from imgdiff.losses import UNetEncoderFeatures, VGGFeatureLoss, VGGFeatures, ZeroShotContrastiveLoss
from imgdiff.nets import UNet, UNetConfig
from imgdiff.samplers.step import StepContext

TINY_CLIP = "imgdiff-example-tiny"


def load_source(path: str | None, size: int) -> Tensor:
    """``(1, 3, size, size)`` in ``[-1, 1]``: the image file, or a generated toy image."""
    if path is None:
        images, _ = toy_shapes(1, size, seed=3)
        return images[:1]
    import numpy as np
    from PIL import Image

    pil = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
    return (array / 127.5 - 1.0)[None]


def load_unet(path: str | None, config_path: str | None) -> UNet:
    if path is None:
        torch.manual_seed(0)
        net = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2, 2), learned_variance=True))
        for module in net.modules():  # random, but not the zero-initialised output of training
            if isinstance(module, torch.nn.Conv2d) and module.out_channels == 6:
                torch.nn.init.normal_(module.weight, std=0.02)
        return net.eval()
    from safetensors.torch import load_file

    config = UNetConfig(**json.loads(Path(config_path or "").read_text()))
    net = UNet(config)
    net.load_state_dict(load_file(path))
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/zecon")
    parser.add_argument("--image", help="source image file (default: a generated toy image)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--source-text", default="photo")
    parser.add_argument("--target-text", default="watercolor painting")
    parser.add_argument(
        "--clip", default=None, help="open_clip architecture (default: tiny random)"
    )
    parser.add_argument("--clip-pretrained", default=None, help="open_clip tag or checkpoint path")
    parser.add_argument("--unet", default=None, help="UNet state dict (.safetensors)")
    parser.add_argument("--unet-config", default=None, help="its UNetConfig as JSON")
    parser.add_argument("--vgg-pretrained", action="store_true", help="ImageNet VGG19 weights")
    parser.add_argument("--preset", choices=("readme", "code"), default="readme")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's num_steps")
    parser.add_argument("--skip", type=int, default=None, help="override the preset's skip")
    parser.add_argument("--n-patch", type=int, default=None, help="override n_patch (ZeCon: 32)")
    parser.add_argument("--seed", type=int, default=404)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    # options that only mean something together, and files that must exist, are usage errors
    if args.clip_pretrained is not None and args.clip is None:
        parser.error("--clip-pretrained: needs --clip (the architecture the weights are for)")
    if (args.unet is None) != (args.unet_config is None):
        parser.error("--unet and --unet-config: give both (the weights and their UNetConfig)")
    for flag, path in (
        ("--image", args.image),
        ("--unet", args.unet),
        ("--unet-config", args.unet_config),
    ):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag}: no file at {path}")
    try:
        net = load_unet(args.unet, args.unet_config)
    except (OSError, ValueError, TypeError, RuntimeError, imgdiff.ImgdiffError) as exc:
        parser.error(f"--unet/--unet-config: cannot build the UNet from them: {exc}")
    multiple = net.config.downsampling
    if args.size < 8 or args.size % multiple:
        parser.error(
            f"--size: expected a multiple of {multiple} (the UNet's), at least 8; got {args.size}"
        )

    real = args.clip is not None
    if real:
        clip = CLIPEncoder(load_clip(args.clip, args.clip_pretrained), resize="pool")
    else:
        register_clip_config(TINY_CLIP, tiny_clip_config())
        clip = CLIPEncoder(load_clip(TINY_CLIP, seed=0), resize="pool")
    # ZeCon's VGG19 taps are post-ReLU (torchvision's in-place ReLU overwrites the stored conv
    # outputs) and its [-1, 1] images go straight into the ImageNet normalisation
    vgg = VGGFeatureLoss(
        VGGFeatures(pretrained=args.vgg_pretrained, input_range="zecon", post_relu=True)
    )
    contrastive = ZeroShotContrastiveLoss(UNetEncoderFeatures(net))

    preset = imgdiff.ZeConConfig.readme() if args.preset == "readme" else imgdiff.ZeConConfig()
    small = {} if real else {"num_steps": 10, "skip": 5, "n_patch": 4}
    overrides = {
        k: v
        for k, v in {"num_steps": args.steps, "skip": args.skip, "n_patch": args.n_patch}.items()
        if v is not None
    }
    from dataclasses import replace

    flags = {"num_steps": "--steps", "skip": "--skip", "n_patch": "--n-patch"}
    try:
        config = replace(preset, **(small | overrides))
    except imgdiff.ImgdiffError as exc:  # name the flag, not the config field
        field, _, rest = str(exc).partition(": ")
        parser.error(f"{flags.get(field, field)}: {rest}")

    source = load_source(args.image, args.size)
    schedule = imgdiff.NoiseSchedule.linear()
    # ZeCon's respacing is close to linspace spacing (it includes t = 999)
    sampler = imgdiff.DDPM(schedule, variance="learned_range", spacing="linspace")

    def report(ctx: StepContext, values: dict[str, Tensor]) -> None:
        terms = "  ".join(f"{name} {float(v):10.4f}" for name, v in values.items())
        print(f"step {ctx.step_index + 1:3d}/{ctx.num_steps}  t={ctx.timestep:4d}  {terms}")

    start = time.perf_counter()
    with torch.no_grad():
        edited = imgdiff.zecon_edit(
            sampler,
            net,
            source,
            clip=clip,
            source_text=args.source_text,
            target_text=args.target_text,
            config=config,
            contrastive=contrastive,
            vgg=vgg,
            generator=torch.Generator().manual_seed(args.seed),
            on_terms=report,
            progress=not args.no_progress,
        )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_image_grid(
        torch.cat([source, edited.float().clamp(-1, 1)]), out / "zecon.png", nrow=2
    )
    print(
        f"edited {tuple(edited.shape)} in {seconds:.1f} s ({config.num_steps - config.skip} guided "
        f"steps, n_patch {config.n_patch}); wrote {path} (source | edit)"
    )
    if not real:
        print("random weights: the edit is not meaningful; see the docstring for real weights")


if __name__ == "__main__":
    main()
