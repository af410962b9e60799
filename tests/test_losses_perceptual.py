"""Perceptual losses (imgdiff.losses.perceptual): LPIPS parity with the lpips package, weight
loading, ZeCon's VGG features (spec 7.6, LOSS-8), MSE and range loss, offline failure, bad input.

Random weights only: backbones are random torchvision inits saved to tmp files; the LPIPS linear
heads are the ones in the lpips wheel (no network).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torchvision
from torch import Tensor

import imgdiff.clip.weights as clip_weights
from imgdiff.errors import InputTypeError, InputValueError, WeightsUnavailableError
from imgdiff.losses import _torchvision_weights as tvw
from imgdiff.losses.perceptual import (
    LPIPSLoss,
    VGGFeatureLoss,
    VGGFeatures,
    mse_loss,
    range_loss,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
BACKBONE = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
SIZE = {"alex": 32, "vgg": 16, "squeeze": 24}  # small, at least each backbone's minimum


def _images(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    y = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return x, y


def _lpips_reference(net: str, seed: int = 0) -> lpips.LPIPS:
    """lpips' own model: random torchvision backbone, the wheel's linear heads."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's pretrained= deprecation
        torch.manual_seed(seed)
        return lpips.LPIPS(pretrained=True, pnet_rand=True, net=net, verbose=False)


@pytest.fixture(scope="module")
def lpips_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]]:
    """Per net: lpips' model, imgdiff's LPIPSLoss loaded from a file holding the same backbone
    (torchvision key layout ``features.<i>.<param>``), and that file."""
    out = {}
    for net in ("alex", "vgg", "squeeze"):
        ref = _lpips_reference(net)
        state = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
        file = tmp_path_factory.mktemp("w") / f"{BACKBONE[net]}-random.pth"
        torch.save(state, file)
        ours = LPIPSLoss(net, weights_path=file, offline=True, reduction="none")
        out[net] = (ref, ours, file)
    return out


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Sequential, Path]:
    """A random torchvision VGG19 ``features`` stack and its state dict in a file, keyed as in
    the whole model's (``features.<i>.<param>``; the classifier, unused, is left out)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    features = make_layers(cfgs["E"]).eval()  # what torchvision.models.vgg19() uses
    file = tmp_path_factory.mktemp("w") / "vgg19-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, file)
    return features, file


# --------------------------------------------------------------------------- LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_matches_lpips_package(
    net: str, lpips_pair: dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]]
) -> None:
    """Loading lpips' backbone from a torchvision-layout file reproduces lpips exactly."""
    ref, ours, _ = lpips_pair[net]
    x, y = _images(3, SIZE[net], seed=1)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert torch.all(expected > 0)  # the wheel's heads are non-negative: a real distance

    # [0,1] inputs: lpips' normalize=True, the same as [-1,1] on 2u - 1
    u, v = (x + 1) / 2, (y + 1) / 2
    unit = LPIPSLoss.from_lpips(ours.model, input_range="[0,1]", reduction="none")
    with torch.no_grad():
        torch.testing.assert_close(unit(u, v), ref(u, v, normalize=True).flatten())
        torch.testing.assert_close(unit(u, v), expected, rtol=1e-5, atol=1e-6)


def test_lpips_from_lpips_wraps_the_model() -> None:
    ref = _lpips_reference("squeeze", seed=3)
    x, y = _images(2, 17, seed=2)
    with torch.no_grad():
        expected = ref(x, y).flatten()
        for reduction, want in [
            ("none", expected),
            ("mean", expected.mean()),
            ("sum", expected.sum()),
        ]:
            got = LPIPSLoss.from_lpips(ref, reduction=reduction)(x, y)  # type: ignore[arg-type]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    with pytest.raises(InputTypeError, match=r"model: expected an lpips\.LPIPS"):
        LPIPSLoss.from_lpips(torch.nn.Identity())


def test_lpips_backbone_loaded_from_torchvision_file(tmp_path: Path) -> None:
    """A torchvision (whole-model) state dict lands in lpips' slices, every tensor of it."""
    torch.manual_seed(5)
    state = torchvision.models.alexnet(weights=None).state_dict()
    file = tmp_path / "alexnet.pth"
    torch.save(state, file)
    loss = LPIPSLoss("alex", weights_path=file, offline=True, reduction="none")
    slices = loss.model.net.state_dict()
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    assert len(slices) == len(features) == 10  # 5 convs x (weight, bias)
    for key, value in slices.items():
        torch.testing.assert_close(value, features[key.split(".", 1)[1]], rtol=0, atol=0)
    assert loss.weights_source == str(file)

    x, y = _images(2, 32, seed=4)
    with torch.no_grad():
        d_xy, d_yx, d_xx = loss(x, y), loss(y, x), loss(x, x)
    assert torch.all(d_xx.abs() < 1e-7)
    torch.testing.assert_close(d_xy, d_yx)
    assert torch.all(d_xy > 0)


def test_lpips_loads_a_features_only_state_dict(tmp_path: Path) -> None:
    sq = torchvision.models.squeezenet1_1(weights=None)
    file = tmp_path / "sq.pth"
    torch.save(sq.features.state_dict(), file)  # keys "<i>.<param>", no "features." prefix
    loss = LPIPSLoss("squeeze", weights_path=file, offline=True)
    got = loss.model.net.slice2.state_dict()["3.squeeze.weight"]
    torch.testing.assert_close(got, sq.features[3].squeeze.weight, rtol=0, atol=0)


def test_lpips_found_in_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tvw.hub_cache_file("squeezenet1_1")
    assert cached == tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    cached.parent.mkdir(parents=True)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, cached)
    loss = LPIPSLoss("squeeze", offline=True)
    assert loss.weights_source == str(cached)
    torch.testing.assert_close(
        loss.model.net.slice1.state_dict()["0.weight"], state["features.0.weight"], rtol=0, atol=0
    )


def test_lpips_download_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online and the host answers: torch.hub.load_state_dict_from_url is asked for the URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    asked: list[str] = []

    def fake_download(url: str, **kwargs: object) -> dict[str, Tensor]:
        asked.append(url)
        assert kwargs["check_hash"] is True
        return state

    monkeypatch.setattr(clip_weights, "_reachable", lambda url, looked: True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    loss = LPIPSLoss("squeeze")
    assert asked == ["https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"]
    assert loss.weights_source == asked[0]


def test_lpips_is_frozen_and_stays_in_eval(
    lpips_pair: dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]],
) -> None:
    _, ours, _ = lpips_pair["alex"]
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    try:
        assert not ours.model.training
        assert all(not m.training for m in ours.model.modules())
        x, y = _images(2, 32, seed=6)
        torch.testing.assert_close(ours(x, y), ours(x, y), rtol=0, atol=0)  # no dropout
    finally:
        ours.eval()


def test_lpips_gradient_reaches_input(
    lpips_pair: dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]],
) -> None:
    _, ours, _ = lpips_pair["alex"]
    x, y = _images(2, 32, seed=7)
    x0, y0 = x.clone(), y.clone()
    x.requires_grad_(True)
    ours(x, y).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.detach(), x0, rtol=0, atol=0)  # inputs untouched
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    assert not any(p.grad is not None for p in ours.parameters())


def test_lpips_minimum_sizes(lpips_pair: dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]]) -> None:
    for net, smallest in {"alex": 31, "vgg": 16, "squeeze": 17}.items():
        _, ours, _ = lpips_pair[net]
        x, y = _images(1, smallest, seed=8)
        with torch.no_grad():
            assert ours(x, y).shape == (1,)
        x, y = _images(1, smallest - 1, seed=8)
        with pytest.raises(InputValueError, match=f"x: .*at least {smallest}x{smallest}"):
            ours(x, y)


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    ("build", "file"),
    [
        (lambda: LPIPSLoss("alex"), "alexnet-owt-7be5be79.pth"),
        (lambda: LPIPSLoss("vgg"), "vgg16-397923af.pth"),
        (lambda: VGGFeatures(), "vgg19-dcbb9e9d.pth"),
    ],
    ids=["lpips-alex", "lpips-vgg", "vgg-features"],
)
def test_offline_fails_fast_and_says_how(
    build: object,
    file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    network_attempts: list[object],
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        build()  # type: ignore[operator]
    assert network_attempts == []  # fast because no network was tried
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / file) in message
    assert "offline" in message
    assert "weights_path=" in message
    assert "TORCH_HOME" in message
    assert f"https://download.pytorch.org/models/{file}" in message


def test_online_but_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def unreachable(url: str, looked: list[str]) -> bool:
        looked.append("network: download.pytorch.org:443 not reachable (test)")
        return False

    monkeypatch.setattr(clip_weights, "_reachable", unreachable)
    with pytest.raises(WeightsUnavailableError, match=r"(?s)online.*not reachable \(test\)"):
        LPIPSLoss("squeeze", offline=False)


def test_missing_or_bad_weights_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsUnavailableError, match=r"weights_path: no file at .*nope\.pth"):
        LPIPSLoss("alex", weights_path=missing)
    with pytest.raises(WeightsUnavailableError, match=r"weights_path: no file at .*nope\.pth"):
        VGGFeatures(weights_path=missing)
    with pytest.raises(
        InputValueError, match=r"weights_path: expected a file .* got the directory"
    ):
        VGGFeatures(weights_path=tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputValueError, match="weights_path: could not read"):
        LPIPSLoss("alex", weights_path=garbage)
    with pytest.raises(InputValueError, match="weights_path: only used with pretrained=True"):
        LPIPSLoss("alex", pretrained=False, weights_path=missing)


def test_wrong_architecture_in_weights_file(
    tmp_path: Path, vgg19_file: tuple[torch.nn.Sequential, Path]
) -> None:
    _, file19 = vgg19_file
    with pytest.raises(InputValueError, match=r"weights_path: .*does not fit torchvision's vgg16"):
        VGGFeatures(arch="vgg16", weights_path=file19)
    with pytest.raises(
        InputValueError, match=r"weights_path: .*does not fit torchvision's alexnet"
    ):
        LPIPSLoss("alex", weights_path=file19)
    partial = tmp_path / "partial.pth"
    state = torch.load(file19, weights_only=True)
    del state["features.5.bias"]
    torch.save(state, partial)
    with pytest.raises(InputValueError, match=r"missing \['5.bias'\]"):
        VGGFeatures(weights_path=partial)


def test_known_urls_match_torchvision() -> None:
    for name in tvw.BACKBONES:
        assert tvw._KNOWN_URLS[name] == tvw.backbone_weights_url(name)


# --------------------------------------------------------------------------- VGG (LOSS-8)


def test_vgg_features_are_modules_0_and_5(vgg19_file: tuple[torch.nn.Sequential, Path]) -> None:
    """LOSS-8: the default taps are conv1_1 and conv2_1, pre-ReLU, of torchvision's VGG19."""
    tv, file = vgg19_file
    feats = VGGFeatures(weights_path=file)
    assert feats.layers == (0, 5)
    assert feats.layer_names == ["conv1_1", "conv2_1"]
    assert len(feats.features) == 6  # truncated after module 5
    x, _ = _images(2, 16, seed=9)
    normalized = ((x + 1) / 2 - MEAN) / STD
    with torch.no_grad():
        got = feats(x)
        assert len(got) == 2
        torch.testing.assert_close(got[0], tv[:1](normalized), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], tv[:6](normalized), rtol=1e-5, atol=1e-6)
    assert (got[0] < 0).any()
    assert (got[1] < 0).any()  # pre-ReLU


def test_vgg_post_relu_reproduces_zecon_get_features(
    vgg19_file: tuple[torch.nn.Sequential, Path],
) -> None:
    """ZeCon's loop over torchvision's features (ReLU in place) stores relu1_1/relu2_1."""
    tv, file = vgg19_file
    feats = VGGFeatures((0, 5), weights_path=file, input_range="zecon", post_relu=True)
    x, _ = _images(2, 32, seed=10)  # the loop runs all five pools
    stored = {}
    h = (x - MEAN) / STD  # ZeCon: vgg_normalize on the [-1,1] image
    with torch.no_grad():
        for name, layer in tv._modules.items():
            h = layer(h)
            if name in ("0", "5"):
                stored[name] = h
        got = feats(x)
    torch.testing.assert_close(got[0], stored["0"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], stored["5"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("input_range", ["[-1,1]", "[0,1]", "zecon"])
def test_vgg_input_ranges(input_range: str, vgg19_file: tuple[torch.nn.Sequential, Path]) -> None:
    tv, file = vgg19_file
    feats = VGGFeatures((2, 0), weights_path=file, input_range=input_range)  # type: ignore[arg-type]
    x, _ = _images(2, 8, seed=11)
    hand = {
        "[-1,1]": ((x + 1) / 2 - MEAN) / STD,
        "[0,1]": (x - MEAN) / STD,
        "zecon": (x - MEAN) / STD,
    }[input_range]
    torch.testing.assert_close(feats.normalize(x), hand)
    with torch.no_grad():
        got = feats(x)
        torch.testing.assert_close(got[0], tv[:3](hand), rtol=1e-5, atol=1e-6)  # order kept
        torch.testing.assert_close(got[1], tv[:1](hand), rtol=1e-5, atol=1e-6)


def test_vgg_random_init_and_vgg16() -> None:
    feats = VGGFeatures((0, 5), pretrained=False)
    assert feats.weights_source.startswith("random")
    assert torch.all(feats.features[0].bias == 0)
    assert feats.features[0].weight.std() > 0
    assert not any(p.requires_grad for p in feats.parameters())
    assert not feats.training
    f16 = VGGFeatures((30,), arch="vgg16", pretrained=False)
    assert len(f16.features) == 31
    assert f16.layer_names == ["pool5"]
    assert f16(torch.zeros(1, 3, 32, 32))[0].shape == (1, 512, 1, 1)
    with pytest.raises(InputValueError, match="x: vgg16 needs images at least 32x32"):
        f16(torch.zeros(1, 3, 16, 16))


def test_vgg_feature_loss_formula(vgg19_file: tuple[torch.nn.Sequential, Path]) -> None:
    _, file = vgg19_file
    feats = VGGFeatures(weights_path=file)
    loss = VGGFeatureLoss(feats)
    x, y = _images(2, 16, seed=12)
    with torch.no_grad():
        fx, fy = feats(x), feats(y)
        hand = sum(((b - a) ** 2).mean() for a, b in zip(fx, fy, strict=True))
        torch.testing.assert_close(loss(x, y), hand)
        torch.testing.assert_close(loss(x, y), loss(y, x))
        assert loss(x, x) == 0
    built = VGGFeatureLoss(layers=(0,), pretrained=False)
    assert built.features.layers == (0,)
    with pytest.raises(InputValueError, match="features: given together with"):
        VGGFeatureLoss(feats, layers=(0,))


def test_vgg_gradient_reaches_input() -> None:
    loss = VGGFeatureLoss(pretrained=False)
    x, y = _images(2, 8, seed=13)
    x0 = x.clone()
    x.requires_grad_(True)
    loss(x, y).backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.detach(), x0, rtol=0, atol=0)


# --------------------------------------------------------------------------- MSE and range


def test_mse_loss() -> None:
    x, y = _images(2, 4, seed=14)
    torch.testing.assert_close(mse_loss(x, y), torch.nn.functional.mse_loss(x, y))
    assert mse_loss(x, x) == 0
    x.requires_grad_(True)
    mse_loss(x, y).backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 2 * (x.detach() - y) / x.numel())
    with pytest.raises(InputValueError, match=r"y: expected shape \(2, 3, 4, 4\)"):
        mse_loss(x, y[:1])  # no broadcasting
    with pytest.raises(InputTypeError, match="y: expected a floating-point tensor"):
        mse_loss(x, torch.zeros(2, 3, 4, 4, dtype=torch.int64))


def test_range_loss() -> None:
    """LOSS-8: zero inside [-1, 1]; per image mean squared excess, summed over the batch."""
    inside = torch.rand(3, 3, 4, 4) * 2 - 1
    inside[0, 0, 0, 0] = 1.0
    inside[1, 0, 0, 0] = -1.0
    assert range_loss(inside) == 0
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0] = 1.5  # excess 0.5
    x[1, 1, 2, 3] = -3.0  # excess -2
    x[1, 2, 0, 0] = 0.9  # inside
    expected = 0.5**2 / 48 + 2.0**2 / 48
    torch.testing.assert_close(range_loss(x), torch.tensor(expected))
    g = torch.randn(4, 3, 8, 8) * 2
    hand = ((g - g.clamp(-1, 1)) ** 2).mean(dim=(1, 2, 3)).sum()
    torch.testing.assert_close(range_loss(g), hand)
    g.requires_grad_(True)
    range_loss(g).backward()
    assert g.grad is not None
    assert torch.isfinite(g.grad).all()
    assert g.grad.abs().sum() > 0
    outside = g.detach().abs() > 1
    assert torch.all(g.grad[~outside] == 0)
    assert torch.all(g.grad[outside] != 0)
    with pytest.raises(InputValueError, match="x0_hat: expected a tensor with at least 2"):
        range_loss(torch.zeros(4))
    with pytest.raises(InputTypeError, match="x0_hat: expected a floating-point tensor"):
        range_loss(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


# --------------------------------------------------------------------------- bad input


def test_lpips_bad_input(lpips_pair: dict[str, tuple[lpips.LPIPS, LPIPSLoss, Path]]) -> None:
    _, ours, _ = lpips_pair["alex"]
    x, y = _images(2, 32, seed=15)
    with pytest.raises(InputValueError, match=r"x: expected an RGB image batch .* got 1 channels"):
        ours(x[:, :1], y[:, :1])
    with pytest.raises(InputValueError, match=r"y: expected an RGB image batch .* got 4 channels"):
        ours(x, torch.cat([y, y[:, :1]], dim=1))
    with pytest.raises(InputValueError, match=r"y: expected shape \(2, 3, 32, 32\)"):
        ours(x, y[:1])
    with pytest.raises(InputValueError, match=r"y: expected shape \(2, 3, 32, 32\)"):
        ours(x, torch.zeros(2, 3, 33, 32))
    with pytest.raises(InputTypeError, match="x: expected a floating-point tensor"):
        ours((x * 127).to(torch.uint8), y)
    with pytest.raises(InputValueError, match="x: expected a tensor with 4 dimensions"):
        ours(x[0], y[0])
    with pytest.raises(InputTypeError, match=r"y: expected a torch\.Tensor"):
        ours(x, y.numpy())
    # another float dtype is cast to the network's, differentiably
    y64 = y.double().requires_grad_(True)
    torch.testing.assert_close(ours(x, y64), ours(x, y))
    ours(x, y64).sum().backward()
    assert y64.grad is not None
    assert y64.grad.dtype == torch.float64


def test_bad_arguments() -> None:
    with pytest.raises(InputValueError, match="net: expected one of 'alex', 'vgg', 'squeeze'"):
        LPIPSLoss("resnet", pretrained=False)  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="reduction: expected one of 'mean', 'sum', 'none'"):
        LPIPSLoss("alex", pretrained=False, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="input_range: expected one of"):
        LPIPSLoss("alex", pretrained=False, input_range="[0,255]")  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="input_range: expected one of"):
        VGGFeatures(pretrained=False, input_range="0-1")  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="pretrained: expected a bool"):
        LPIPSLoss("alex", pretrained="yes")  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="offline: expected None or a bool"):
        VGGFeatures(pretrained=False, offline=1)  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match="arch: expected one of 'vgg19', 'vgg16'"):
        VGGFeatures(arch="vgg11", pretrained=False)  # type: ignore[arg-type]
    with pytest.raises(InputValueError, match=r"layers: expected indices in \[0, 36\], got 37"):
        VGGFeatures((0, 37), pretrained=False)
    with pytest.raises(InputValueError, match="layers: index 5 appears twice"):
        VGGFeatures((5, 5), pretrained=False)
    with pytest.raises(InputValueError, match="layers: expected at least one"):
        VGGFeatures((), pretrained=False)
    with pytest.raises(InputTypeError, match="layers: expected int module indices"):
        VGGFeatures((0.0,), pretrained=False)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="features: expected None or a VGGFeatures"):
        VGGFeatureLoss(torch.nn.Identity())  # type: ignore[arg-type]


def test_vgg_bad_input() -> None:
    loss = VGGFeatureLoss(layers=(0,), pretrained=False)
    x, y = _images(2, 8, seed=16)
    with pytest.raises(InputValueError, match=r"x: expected an RGB image batch .* got 1 channels"):
        loss.features(x[:, :1])
    with pytest.raises(InputValueError, match=r"y: expected shape \(2, 3, 8, 8\)"):
        loss(x, y[:, :, :4])
    torch.testing.assert_close(loss(x, y.double()), loss(x, y))
    with pytest.raises(InputTypeError, match="x: expected a floating-point tensor"):
        loss(x.long(), y.long())


def test_pixel_losses_refuse_empty_tensors() -> None:
    """An empty input has no mean (it would be NaN): MSE and the range loss refuse it by name."""
    empty = torch.zeros(0, 3, 4, 4)
    with pytest.raises(InputValueError, match="x: expected a non-empty tensor"):
        mse_loss(empty, empty.clone())
    with pytest.raises(InputValueError, match="x0_hat: expected a non-empty tensor"):
        range_loss(empty)
    with pytest.raises(InputValueError, match="x0_hat: expected a non-empty tensor"):
        range_loss(torch.zeros(2, 0))


def test_lpips_from_lpips_refuses_a_spatial_model() -> None:
    """A spatial LPIPS model gives a distance map, not one distance per image: refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        spatial = lpips.LPIPS(
            pretrained=True, pnet_rand=True, net="squeeze", spatial=True, verbose=False
        )
    with pytest.raises(
        InputValueError, match=r"model: expected an lpips\.LPIPS built with spatial"
    ):
        LPIPSLoss.from_lpips(spatial)


def test_lpips_refuses_a_backbone_file_with_wrong_shapes(tmp_path: Path) -> None:
    """Every key of the file fits, but one tensor has another shape: refused by name, listing it."""
    state = torchvision.models.alexnet(weights=None).state_dict()
    state["features.3.weight"] = torch.zeros(192, 64, 3, 3)  # torchvision's conv2 is 5x5
    file = tmp_path / "alexnet-bad.pth"
    torch.save(state, file)
    with pytest.raises(
        InputValueError, match=r"wrong shapes \['slice2\.3\.weight: \(192, 64, 3, 3\)"
    ):
        LPIPSLoss("alex", weights_path=file, offline=True)


def test_lpips_checks_both_sides_and_the_batch() -> None:
    """The minimum size applies to the width as well as the height; an empty batch is refused."""
    loss = LPIPSLoss.from_lpips(_lpips_reference("squeeze"))
    narrow = torch.zeros(1, 3, 32, 16)
    with pytest.raises(InputValueError, match=r"x: LPIPS\(squeeze\) needs images at least 17x17"):
        loss(narrow, narrow)
    empty = torch.zeros(0, 3, 32, 32)
    with pytest.raises(InputValueError, match="x: expected a non-empty batch"):
        loss(empty, empty)


def test_vgg_random_init_is_torchvisions_kaiming_fan_out() -> None:
    """``pretrained=False`` draws conv weights N(0, 2 / fan_out), ``fan_out = C_out 3 3``, as
    torchvision's VGG does (not fan-in)."""
    torch.manual_seed(0)
    feats = VGGFeatures((5,), pretrained=False)
    for index, c_out in ((0, 64), (2, 64), (5, 128)):
        w = feats.features[index].weight
        assert float(w.std()) == pytest.approx(math.sqrt(2.0 / (c_out * 9)), rel=0.05), index
