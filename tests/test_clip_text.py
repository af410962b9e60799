"""CLIP loader and text side on a tiny random open_clip model; text conditioning; offline errors.

No weights are downloaded: pretrained weights are exercised with checkpoints the tests write
(a file, a Hugging Face cache layout, a ``local-dir:`` folder) and with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import imgdiff
from imgdiff.clip import (
    CLIPTextEncoder,
    LoadedCLIP,
    TextEmbedding,
    WeightsUnavailableError,
    load_clip,
    register_clip_config,
    tiny_clip_config,
)
from imgdiff.conditioning.text import TextConditioning

pytest.importorskip("open_clip")

IVE = imgdiff.InputValueError
ITE = imgdiff.InputTypeError
TINY = "imgdiff-test-tiny"
PROMPTS = ["a photo of a cat", "a watercolour painting of a lighthouse", ""]


@pytest.fixture(scope="module")
def clip() -> LoadedCLIP:
    register_clip_config(TINY, tiny_clip_config())
    return load_clip(TINY, seed=0)


@pytest.fixture(scope="module")
def encoder(clip: LoadedCLIP) -> CLIPTextEncoder:
    return CLIPTextEncoder(clip)


def _within(seconds: float, call: Callable[[], Any]) -> Exception:
    """Run ``call`` in a thread; it must raise within ``seconds`` (a hang fails, not blocks)."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(call)
        exc = future.exception(timeout=seconds)
        assert exc is not None, "expected an error"
        return exc


# -- text encoder ------------------------------------------------------------------------------


def test_shapes_and_dtypes(encoder: CLIPTextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    assert out.context.shape == (3, 77, 32)
    assert out.pooled.shape == (3, 32)
    assert out.context.dtype == torch.float32
    assert out.pooled.dtype == torch.float32
    assert out.tokens is not None
    assert out.tokens.shape == (3, 77)
    assert out.tokens.dtype == torch.int64
    assert (encoder.context_length, encoder.width) == (77, 32)
    assert not out.context.requires_grad


def test_context_is_final_norm_output_and_pooled_is_encode_text(
    clip: LoadedCLIP, encoder: CLIPTextEncoder
) -> None:
    """pooled = encode_text(tokens) = projection of the context at the end-of-text token."""
    out = encoder.encode(PROMPTS)
    assert out.tokens is not None
    with torch.no_grad():
        reference = clip.model.encode_text(out.tokens)
    torch.testing.assert_close(out.pooled, reference, rtol=0, atol=0)
    eot = out.context[torch.arange(3), out.tokens.argmax(dim=-1)]
    torch.testing.assert_close(out.pooled, eot @ clip.model.text_projection, rtol=1e-6, atol=1e-6)
    # after a LayerNorm with unit weight and zero bias each token state has mean 0, var 1
    torch.testing.assert_close(out.context.mean(-1), torch.zeros(3, 77), atol=1e-5, rtol=0)


def test_deterministic_and_prompt_dependent(encoder: CLIPTextEncoder) -> None:
    a, b = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    assert torch.equal(a.context, b.context)
    assert torch.equal(a.pooled, b.pooled)
    assert not torch.allclose(a.context[0], a.context[1])
    assert not torch.allclose(a.pooled[0], a.pooled[1])
    # the same seed builds the same random weights; another seed other weights
    same = CLIPTextEncoder(load_clip(TINY, seed=0)).encode(PROMPTS)
    other = CLIPTextEncoder(load_clip(TINY, seed=1)).encode(PROMPTS)
    assert torch.equal(same.pooled, a.pooled)
    assert not torch.allclose(other.pooled, a.pooled)


def test_batch_equals_one_by_one(encoder: CLIPTextEncoder) -> None:
    batch = encoder.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        single = encoder(prompt)  # one string = a batch of one
        assert single.context.shape == (1, 77, 32)
        torch.testing.assert_close(single.context[0], batch.context[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single.pooled[0], batch.pooled[i], atol=1e-5, rtol=1e-5)


def test_custom_text_tower() -> None:
    """CustomTextCLIP (text tower under model.text) works through the same code path."""
    config = tiny_clip_config()
    config["custom_text"] = True
    register_clip_config(TINY + "-custom", config)
    clip = load_clip(TINY + "-custom", seed=0)
    assert type(clip.model).__name__ == "CustomTextCLIP"
    out = CLIPTextEncoder(clip).encode(["a", "b c"])
    assert out.tokens is not None
    assert out.context.shape == (2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(out.pooled, clip.model.encode_text(out.tokens), rtol=0, atol=0)


def test_loaded_model_is_frozen_and_in_eval_mode(clip: LoadedCLIP) -> None:
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert clip.device == torch.device("cpu")
    assert clip.pretrained is None
    assert clip.checkpoint is None


# -- weights from files and caches -------------------------------------------------------------


def _state_dict(clip: LoadedCLIP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in clip.model.state_dict().items()}


def test_local_checkpoint_file(clip: LoadedCLIP, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(_state_dict(clip), path)
    loaded = load_clip(TINY, path, seed=123)
    assert loaded.checkpoint == str(path)
    assert loaded.pretrained == str(path)
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_checkpoint_for_another_architecture(clip: LoadedCLIP, tmp_path: Path) -> None:
    config = tiny_clip_config()
    config["text_cfg"]["width"] = 16
    register_clip_config(TINY + "-narrow", config)
    path = tmp_path / "tiny.pt"
    torch.save(_state_dict(clip), path)
    with pytest.raises(WeightsUnavailableError, match="could not be loaded into the CLIP model"):
        load_clip(TINY + "-narrow", str(path))


def _hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """Write ``files`` into a Hugging Face hub cache layout under ``root``."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def _checkpoint_bytes(clip: LoadedCLIP, tmp_path: Path) -> bytes:
    path = tmp_path / "weights.bin"
    torch.save(_state_dict(clip), path)
    return path.read_bytes()


def test_tag_from_the_hugging_face_cache_offline(
    clip: LoadedCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag whose file is in the hub cache loads with HF_HUB_OFFLINE=1; QuickGELU tags get it."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tags = {
        "cachedtag": {
            "hf_hub": "imgdiff/tiny-clip/",
            "url": "",
            "quick_gelu": True,
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
        }
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    cache = tmp_path / "hub"
    _hf_cache(
        cache,
        "imgdiff/tiny-clip",
        {"open_clip_pytorch_model.bin": _checkpoint_bytes(clip, tmp_path)},
    )
    loaded = load_clip(TINY, "cachedtag", cache_dir=cache)
    assert loaded.checkpoint is not None
    assert loaded.checkpoint.endswith("open_clip_pytorch_model.bin")
    assert any(type(m).__name__ == "QuickGELU" for m in loaded.model.modules())
    preprocess = open_clip.get_model_preprocess_cfg(loaded.model)
    assert tuple(preprocess["mean"]) == (0.5, 0.5, 0.5)  # the tag's image normalisation
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_tag_from_the_url_cache_offline(
    clip: LoadedCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip

    tags = {"urltag": {"url": "https://example.invalid/weights/tiny-v1.pt", "hf_hub": ""}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    (tmp_path / "tiny-v1.pt").write_bytes(_checkpoint_bytes(clip, tmp_path))
    loaded = load_clip(TINY, "urltag", cache_dir=tmp_path, offline=True)
    assert loaded.checkpoint == str(tmp_path / "tiny-v1.pt")


def _save_torchscript(clip: LoadedCLIP, path: Path) -> None:
    """A TorchScript archive of the model, as OpenAI ships CLIP (~/.cache/clip/ViT-B-32.pt)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated in torch >= 2.9
        torch.jit.save(torch.jit.script(clip.model), str(path))


def test_torchscript_checkpoint_as_openai_ships_it(
    clip: LoadedCLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's URL files are TorchScript; open_clip's torch.load(weights_only=True) refuses them."""
    import open_clip

    path = tmp_path / "tiny-jit.pt"
    _save_torchscript(clip, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "looks like a TorchScript archive"
        with pytest.raises(RuntimeError, match="TorchScript"):
            torch.load(path, weights_only=True)
    random = load_clip(TINY, seed=123)
    assert not all(
        torch.equal(random.model.state_dict()[k], v) for k, v in clip.model.state_dict().items()
    )
    # the path, and an "openai"-like tag whose URL file sits in the cache
    tags = {"scripted": {"url": "https://example.invalid/clip/tiny-jit.pt", "quick_gelu": True}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    for loaded in (
        load_clip(TINY, path, seed=123),
        load_clip(TINY, "scripted", cache_dir=tmp_path, offline=True, seed=123),
    ):
        assert loaded.checkpoint == str(path)
        state = loaded.model.state_dict()
        assert state.keys() == clip.model.state_dict().keys()
        for key, value in clip.model.state_dict().items():
            assert torch.equal(state[key], value), key
        assert not any(p.requires_grad for p in loaded.model.parameters())
    # another architecture: the usual clear error, not torch.load's
    config = tiny_clip_config()
    config["text_cfg"]["width"] = 16
    register_clip_config(TINY + "-narrow", config)
    with pytest.raises(WeightsUnavailableError, match="could not be loaded into the CLIP model"):
        load_clip(TINY + "-narrow", path)


def test_hf_hub_and_local_dir_names(clip: LoadedCLIP, tmp_path: Path) -> None:
    config = json.dumps({"model_cfg": tiny_clip_config()}).encode()
    weights = _checkpoint_bytes(clip, tmp_path)
    cache = tmp_path / "hub"
    _hf_cache(
        cache,
        "imgdiff/tiny-clip",
        {"open_clip_config.json": config, "open_clip_pytorch_model.bin": weights},
    )
    from_hub = load_clip("hf-hub:imgdiff/tiny-clip", cache_dir=cache, offline=True)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_bytes(config)
    (folder / "open_clip_pytorch_model.bin").write_bytes(weights)
    from_dir = load_clip(f"local-dir:{folder}")
    assert from_dir.checkpoint == str(folder / "open_clip_pytorch_model.bin")
    assert from_hub.checkpoint is not None
    assert from_hub.checkpoint.endswith("open_clip_pytorch_model.bin")
    prompts = ["a red house"]
    reference = CLIPTextEncoder(clip).encode(prompts).pooled
    for loaded in (from_hub, from_dir):
        torch.testing.assert_close(CLIPTextEncoder(loaded).encode(prompts).pooled, reference)


# -- offline errors ----------------------------------------------------------------------------


def test_offline_tag_fails_fast_and_says_what_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_attempts: list[object]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exc = _within(20.0, lambda: load_clip("ViT-B-32", "openai", cache_dir=tmp_path))
    assert network_attempts == []
    assert isinstance(exc, WeightsUnavailableError)
    assert isinstance(exc, imgdiff.ImgdiffError)
    assert isinstance(exc, RuntimeError)
    message = str(exc)
    for needle in (
        "'ViT-B-32'",
        "pretrained='openai'",
        str(tmp_path),
        "timm/vit_base_patch32_clip_224.openai",
        "ViT-B-32.pt",
        "offline",
        "cache_dir=",
        "pretrained='/path/to/checkpoint",
        "HF_HUB_OFFLINE=1",
    ):
        assert needle in message, needle


def test_offline_hub_name_fails_fast(tmp_path: Path, network_attempts: list[object]) -> None:
    exc = _within(
        20.0, lambda: load_clip("hf-hub:imgdiff/not-cached", cache_dir=tmp_path, offline=True)
    )
    assert network_attempts == []
    assert isinstance(exc, WeightsUnavailableError)
    assert "imgdiff/not-cached" in str(exc)
    assert "local-dir:" in str(exc)


def test_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    for value in (missing, str(missing)):
        exc = _within(20.0, lambda v=value: load_clip("ViT-B-32", v))  # type: ignore[misc]
        assert isinstance(exc, WeightsUnavailableError)
        assert str(missing) in str(exc)
    with pytest.raises(WeightsUnavailableError, match=r"needs open_clip_config\.json"):
        load_clip(f"local-dir:{tmp_path}")


def test_import_imgdiff_does_not_import_open_clip() -> None:
    code = (
        "import sys, imgdiff, imgdiff.clip, imgdiff.conditioning.text, "
        "imgdiff.conditioning.palette\n"
        "assert 'open_clip' not in sys.modules, 'open_clip was imported'\n"
        "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- text conditioning -------------------------------------------------------------------------


class CountingEncoder:
    def __init__(self, inner: CLIPTextEncoder) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


def test_text_conditioning_keys_and_cached_null(encoder: CLIPTextEncoder) -> None:
    counting = CountingEncoder(encoder)
    cond = TextConditioning(counting, pooled_key="text_embeds")
    out = cond(PROMPTS[:2])
    assert set(out) == {"context", "text_embeds"}
    assert out["context"].shape == (2, 77, 32)
    assert out["text_embeds"].shape == (2, 32)
    want = encoder.encode(PROMPTS[:2])
    torch.testing.assert_close(out["context"], want.context, rtol=0, atol=0)
    torch.testing.assert_close(out["text_embeds"], want.pooled, rtol=0, atol=0)
    null = cond.null()
    assert null["context"].shape == (1, 77, 32)
    torch.testing.assert_close(null["context"], encoder.encode([""]).context)
    assert cond.null()["context"] is null["context"]
    assert counting.calls == [PROMPTS[:2], [""]]  # the null prompt was encoded once
    negative = TextConditioning(encoder, null_prompt="blurry").null()["context"]
    assert not torch.allclose(negative, null["context"])


def test_text_conditioning_guidance(encoder: CLIPTextEncoder) -> None:
    """scale 1 is the conditional model, scale 0 the model on the empty prompt."""
    torch.manual_seed(0)
    w = torch.randn(32)

    def model(x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        return x + (context.mean(1) @ w).reshape(-1, 1, 1, 1)

    cond = TextConditioning(encoder)
    kwargs = cond(["a cat", "a dog"])
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 10])
    torch.testing.assert_close(cond.guidance(model, 1.0)(x, t, **kwargs), model(x, t, **kwargs))
    uncond = model(x, t, context=cond.null()["context"].expand(2, -1, -1))
    torch.testing.assert_close(cond.guidance(model, 0.0)(x, t, **kwargs), uncond)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input(clip: LoadedCLIP, encoder: CLIPTextEncoder) -> None:
    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (IVE, "model_name: expected an open_clip architecture", lambda: load_clip("ViT-B-33")),
        (ITE, "model_name: expected a string", lambda: load_clip(3)),
        (IVE, "seed: expected an int >= ", lambda: load_clip(TINY, seed=-(2**64))),
        (
            IVE,
            "pretrained: expected None, a path .*known tags: \\['openai'",
            lambda: load_clip("ViT-B-32", "nope"),
        ),
        (
            IVE,
            "pretrained: expected None with model_name",
            lambda: load_clip("hf-hub:a/b", "openai"),
        ),
        (ITE, "pretrained: expected None, a tag or a checkpoint path", lambda: load_clip(TINY, 3)),
        (IVE, "precision: expected one of", lambda: load_clip(TINY, precision="fp8")),
        (ITE, "offline: expected None or a bool", lambda: load_clip(TINY, offline="yes")),
        (IVE, "device: expected a torch device", lambda: load_clip(TINY, device="gpu0")),
        (IVE, "prompts: expected at least one prompt", lambda: encoder.encode([])),
        (ITE, "prompts\\[1\\]: expected a string", lambda: encoder.encode(["a", 3])),
        (ITE, "prompts: expected a string or a list", lambda: encoder.encode(7)),
        (ITE, "clip: expected a LoadedCLIP", lambda: CLIPTextEncoder(clip.model)),
        (
            IVE,
            "pooled: expected batch 2",
            lambda: TextEmbedding(torch.zeros(2, 77, 8), torch.zeros(3, 8)),
        ),
        (
            IVE,
            "context: expected a 3-d tensor",
            lambda: TextEmbedding(torch.zeros(2, 8), torch.zeros(2, 8)),
        ),
        (ITE, "encoder: expected an object with encode", lambda: TextConditioning(object())),
        (
            IVE,
            "key: expected a keyword-argument name",
            lambda: TextConditioning(encoder, key="a b"),
        ),
        (
            IVE,
            "pooled_key: expected a keyword different",
            lambda: TextConditioning(encoder, pooled_key="context"),
        ),
        (
            ITE,
            "null_prompt: expected a string",
            lambda: TextConditioning(encoder, null_prompt=None),
        ),
        (
            IVE,
            "name: expected a non-empty architecture name",
            lambda: register_clip_config("a/b", tiny_clip_config()),
        ),
        (IVE, "config: expected the keys", lambda: register_clip_config("x", {"embed_dim": 3})),
        (
            IVE,
            "open_clip already has a different architecture",
            lambda: register_clip_config("ViT-B-32", tiny_clip_config()),
        ),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoder_on_cuda(encoder: CLIPTextEncoder) -> None:
    cuda = CLIPTextEncoder(load_clip(TINY, seed=0, device="cuda"))
    out = cuda.encode(PROMPTS)
    assert out.context.device.type == "cuda"
    torch.testing.assert_close(
        out.pooled.cpu(), encoder.encode(PROMPTS).pooled, atol=1e-4, rtol=1e-4
    )


# -- the image side's preprocessing (spec 7.1) -------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalised(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - m) / s


def test_preprocess_uses_the_models_stats_and_falls_back_to_clips() -> None:
    """(x + 1) / 2 normalised with the model's own preprocess_cfg mean and std (mean = std = 0.5
    makes it the identity); without one, with spec 7.1's CLIP constants per channel."""
    from imgdiff.clip import CLIPEncoder

    register_clip_config(TINY, tiny_clip_config())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    half = load_clip(TINY, seed=0)
    half.model.visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    torch.testing.assert_close(CLIPEncoder(half).preprocess(x), x, rtol=0, atol=1e-6)
    bare = load_clip(TINY, seed=0)
    del bare.model.visual.preprocess_cfg
    torch.testing.assert_close(
        CLIPEncoder(bare).preprocess(x), _normalised((x + 1) / 2, CLIP_MEAN, CLIP_STD)
    )


def test_preprocess_centre_crop_offsets_round_half_to_even(clip: LoadedCLIP) -> None:
    """An image whose short side is already S is not resampled, only centre-cropped at offset
    int(round((side - S) / 2)) as torchvision's CenterCrop: 35 -> 32 crops from 2 (round(1.5)),
    39 -> 32 from 4 (round(3.5)), 37 -> 32 from 2 (round(2.5)), in both directions."""
    from imgdiff.clip import CLIPEncoder

    encoder = CLIPEncoder(clip)
    assert encoder.image_size == 32
    g = torch.Generator().manual_seed(1)
    cases = {(35, 32): (2, 0), (32, 39): (0, 4), (37, 32): (2, 0), (32, 37): (0, 2)}
    for (H, W), (top, left) in cases.items():
        x = torch.rand(1, 3, H, W, generator=g) * 2 - 1
        want = _normalised((x[..., top : top + 32, left : left + 32] + 1) / 2, CLIP_MEAN, CLIP_STD)
        torch.testing.assert_close(encoder.preprocess(x), want, rtol=0, atol=1e-6)


def test_preprocess_pool_is_average_pooling_without_a_crop(clip: LoadedCLIP) -> None:
    """resize="pool" average-pools the whole image to S x S (64 -> 32: 2 x 2 means; a 64 x 96
    image: 2 x 3 means, nothing cropped)."""
    from imgdiff.clip import CLIPEncoder

    encoder = CLIPEncoder(clip, resize="pool")
    g = torch.Generator().manual_seed(2)
    for H, W in ((64, 64), (64, 96)):
        x = torch.rand(2, 3, H, W, generator=g) * 2 - 1
        pooled = torch.nn.functional.avg_pool2d((x + 1) / 2, (H // 32, W // 32))
        torch.testing.assert_close(
            encoder.preprocess(x), _normalised(pooled, CLIP_MEAN, CLIP_STD), rtol=0, atol=1e-6
        )


def test_preprocess_keeps_float64_and_checks_channels(clip: LoadedCLIP) -> None:
    """float64 images are preprocessed in float64 (to float64 accuracy); other floating dtypes in
    float32; images without 3 channels are refused by name."""
    from imgdiff.clip import CLIPEncoder

    encoder = CLIPEncoder(clip)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = encoder.preprocess(x * 2 - 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _normalised(x, CLIP_MEAN, CLIP_STD), rtol=0, atol=1e-12)
    assert encoder.preprocess(x.half()).dtype == torch.float32
    for channels in (1, 4):
        with pytest.raises(IVE, match=r"^images: expected 3 \(RGB\) channels"):
            encoder.preprocess(torch.zeros(1, channels, 32, 32))


def test_text_embedding_templates_need_exactly_one_placeholder(clip: LoadedCLIP) -> None:
    """Each template has exactly one ``{}``: none or two are refused, naming the template."""
    from imgdiff.clip import CLIPEncoder

    encoder = CLIPEncoder(clip)
    assert encoder.text_embedding("cat", ["a photo of a {}."]).shape == (32,)
    for bad in ("a photo", "a {} and a {}"):
        with pytest.raises(IVE, match=r"^templates\[1\]: expected exactly one '\{\}' placeholder"):
            encoder.text_embedding("cat", ["a photo of a {}.", bad])


# -- which weights are loaded ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        (("a.bin", "c.pth", "b.safetensors"), "b.safetensors"),
        (
            ("open_clip_pytorch_model.safetensors", "open_clip_model.safetensors"),
            "open_clip_model.safetensors",
        ),
        (
            ("model.safetensors", "open_clip_pytorch_model.bin", "a.safetensors"),
            "open_clip_pytorch_model.bin",
        ),
    ],
    ids=["unranked", "both-open-clip-names", "ranked-bin-before-safetensors"],
)
def test_local_dir_reports_the_checkpoint_open_clip_loads(
    clip: LoadedCLIP, tmp_path: Path, files: tuple[str, ...], chosen: str
) -> None:
    """With several checkpoints in a ``local-dir:`` folder, the reported checkpoint is the one
    open_clip picks (its preferred names in order, else a .safetensors file before a .bin or
    .pth), and the loaded weights are that file's."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from open_clip.factory import _find_checkpoint_in_dir

    other = load_clip(TINY, seed=123)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip_config()}))
    for name in files:
        state = _state_dict(clip if name == chosen else other)
        if name.endswith(".safetensors"):
            safetensors_torch.save_file(
                {k: v.contiguous() for k, v in state.items()}, str(folder / name)
            )
        else:
            torch.save(state, folder / name)
    assert _find_checkpoint_in_dir(folder) == str(folder / chosen)
    loaded = load_clip(f"local-dir:{folder}")
    assert loaded.checkpoint == str(folder / chosen)
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_unreadable_checkpoint_is_named_without_unsafe_advice(
    clip: LoadedCLIP, tmp_path: Path
) -> None:
    """A corrupt file, or one pickling an arbitrary object, is refused with the unpickler's
    reason and never with torch's advice to retry with ``weights_only=False``."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    objects = tmp_path / "objects.pt"
    torch.save({"weights": _state_dict(clip), "loader": collections.OrderedDict.fromkeys}, objects)
    for path in (garbage, objects):
        with pytest.raises(WeightsUnavailableError, match=r"torch\.load\(weights_only=True\)") as e:
            load_clip(TINY, path)
        assert "weights_only=False" not in str(e.value)
        assert str(path) in str(e.value)


def test_torchscript_checkpoint_must_match_the_architecture_exactly(
    clip: LoadedCLIP, tmp_path: Path
) -> None:
    """A TorchScript archive is loaded strictly: one with a weight missing (here a 1-d tower of
    another depth) is refused with WeightsUnavailableError instead of leaving random weights."""
    config = tiny_clip_config()
    config["text_cfg"]["layers"] = 2
    register_clip_config(TINY + "-deeper", config)
    deeper = load_clip(TINY + "-deeper", seed=0)
    path = tmp_path / "tiny-jit.pt"
    _save_torchscript(clip, path)  # one text layer: the second layer's weights are missing
    with pytest.raises(WeightsUnavailableError, match="could not be loaded into the CLIP model"):
        load_clip(TINY + "-deeper", path)
    assert deeper.model.state_dict().keys() > clip.model.state_dict().keys()


def test_text_embedding_tokens_must_match_the_context(encoder: CLIPTextEncoder) -> None:
    """``tokens`` is ``None`` or ``(B, L)`` like the context's first two dimensions."""
    context, pooled = torch.zeros(2, 77, 8), torch.zeros(2, 8)
    assert TextEmbedding(context, pooled, torch.zeros(2, 77, dtype=torch.int64)).batch_size == 2
    for bad in (torch.zeros(2, 10, dtype=torch.int64), torch.zeros(3, 77, dtype=torch.int64)):
        with pytest.raises(IVE, match=r"^tokens: expected None or shape \(2, 77\)"):
            TextEmbedding(context, pooled, bad)
    emb = encoder.encode(PROMPTS)
    assert emb.tokens is not None
    assert emb.tokens.shape == emb.context.shape[:2]


def test_hub_tag_prefers_the_safetensors_file_as_open_clip_does(
    clip: LoadedCLIP,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    network_attempts: list[object],
) -> None:
    """A hub tag whose cache holds both the .bin file and its .safetensors alternative loads the
    .safetensors one (open_clip's download_pretrained_from_hf tries the safe alternative first)."""
    import open_clip

    safetensors_torch = pytest.importorskip("safetensors.torch")
    tags = {"bothtag": {"hf_hub": "imgdiff/tiny-both/", "url": ""}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    safe = tmp_path / "safe.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in _state_dict(clip).items()}, str(safe)
    )
    other = load_clip(TINY, seed=123)
    cache = tmp_path / "hub"
    _hf_cache(
        cache,
        "imgdiff/tiny-both",
        {
            "open_clip_pytorch_model.bin": _checkpoint_bytes(other, tmp_path),
            "open_clip_model.safetensors": safe.read_bytes(),
        },
    )
    loaded = load_clip(TINY, "bothtag", cache_dir=cache, offline=True)
    assert loaded.checkpoint is not None
    assert loaded.checkpoint.endswith("open_clip_model.safetensors")
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert network_attempts == []


@pytest.mark.parametrize(
    "filename",
    [
        "open_clip_pytorch_model.bin",
        "open_clip_model.safetensors",
        "epoch_32.pt",
        "model.pth",
        "weights.bin",
        "model.safetensors",
        "model.ckpt",
    ],
)
def test_safetensors_alternatives_are_open_clips(filename: str) -> None:
    """The .safetensors files tried before a hub file are those of open_clip's own hub download
    (none for a .pt or .safetensors file, the same stem for .bin/.pth, its default's pair)."""
    from open_clip import pretrained

    from imgdiff.clip.weights import _safe_alternatives

    assert _safe_alternatives(filename) == list(pretrained._get_safe_alternatives(filename))


def test_torchscript_non_weight_entries_are_dropped(clip: LoadedCLIP, tmp_path: Path) -> None:
    """OpenAI's archives also hold ``input_resolution``, ``context_length`` and ``vocab_size``
    (not weights, as open_clip's load_openai_model drops them): such an archive loads the
    weights exactly."""
    model = load_clip(TINY, seed=0).model
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):  # open_clip keeps these as int attributes, OpenAI as tensors
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    path = tmp_path / "openai-like.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated in torch >= 2.9
        torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_clip(TINY, path, seed=123)
    assert loaded.model.state_dict().keys() == clip.model.state_dict().keys()
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["missing.pt", "missing.safetensors", "missing.bin"])
def test_a_bare_checkpoint_file_name_is_a_path_not_a_tag(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value ending in a checkpoint suffix is a (missing) file, even without a directory: the
    error says no checkpoint file is there, not that the tag is unknown."""
    register_clip_config(TINY, tiny_clip_config())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsUnavailableError, match=r"no checkpoint file at"):
        load_clip(TINY, name)
