"""qaclims.vlm loaders: open_clip CLIP by name and weights, the OV-Seg mask checkpoint, masked and text encoders, offline errors."""
import time

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transformer import QuickGELU

import qaclims.weights
from qaclims.settings import load_settings, render_settings
from qaclims.vlm import (OVSEG_CLIP_PREFIX, MaskPromptViT, TextFeatureCache, attach_mask_checkpoint, encode_masked,
                         encode_texts, from_settings, load_clip, load_openai_archive, mask_prompted_from,
                         ovseg_clip_state_dict, resolve_clip_weights, text_encoder_digest)
from qaclims.weights import OFFLINE_VARIABLES, MissingWeightsError


@pytest.fixture(scope="module")
def b16():
    return load_clip("ViT-B-16", None)


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    "An empty hub cache and home folder, offline variables cleared."
    for name in OFFLINE_VARIABLES + ("HF_HUB_CACHE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=32, quick_gelu=True,
                          vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
                          text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}).eval()


def toy_tokenizer(texts):
    "Deterministic ids < 100 for the tiny CLIP: one token per character, end token 99 (the argmax)."
    rows = [[1 + ord(c) % 97 for c in text[:6]] + [99] for text in texts]
    return torch.tensor([row + [0] * (8 - len(row)) for row in rows])


def ovseg_checkpoint(clip, extra=True):
    weights = {OVSEG_CLIP_PREFIX + k: v for k, v in clip.state_dict().items()}
    if extra:  # the segmenter's own weights, which the loader ignores
        weights |= {"backbone.layers.0.blocks.0.attn.qkv.weight": torch.zeros(12, 4),
                    "sem_seg_head.predictor.class_embed.weight": torch.zeros(3, 4),
                    "clip_adapter.non_object_embedding": torch.zeros(1, 4)}
    return {"model": weights, "iteration": 1000}


def masked_source(seed=0):
    clip = tiny_clip(seed)
    clip.visual = mask_prompted_from(clip.visual)
    with torch.no_grad():
        clip.visual.mask_embedding.normal_()
    return clip


# ----- the real architectures at random weights

def test_b16_architecture(b16):
    model, tokenizer = b16
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert tuple(model.visual.image_size) == (224, 224) and model.visual.output_dim == 512
    texts = ["a photo of a boat.", "a photo of water.", "a photo of a canoe boat."]
    features = encode_texts(model, tokenizer, texts, batch_size=2)
    assert features.shape == (3, 512) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    images, masks = torch.randn(2, 3, 224, 224), (torch.rand(2, 1, 224, 224) > 0.5).float()
    with torch.no_grad():
        fallback = encode_masked(model, images, masks)  # plain tower: image * mask
        assert torch.allclose(fallback, model.encode_image(images * masks, normalize=True), atol=1e-6)
    assert fallback.shape == (2, 512)


def test_ovseg_round_trip_b16(tmp_path):
    """A random ViT-B/16 CLIP with a random mask embedding, saved in OV-Seg's layout, loads back exactly."""
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-16", pretrained=None, quick_gelu=True).eval()
    source.visual = mask_prompted_from(source.visual)
    with torch.no_grad():
        source.visual.mask_embedding.normal_()
    torch.save(ovseg_checkpoint(source), tmp_path / "ovseg_vitB16.pth")
    model, tokenizer = load_clip("ViT-B/16", None, mask_checkpoint="ovseg_vitB16.pth", base_dir=tmp_path)
    assert isinstance(model.visual, MaskPromptViT) and model.visual.prompt_depth == 3
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # implied by the mask checkpoint
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    images = torch.randn(1, 3, 224, 224)
    masks = torch.zeros(1, 1, 224, 224)
    masks[0, :, 50:, 30:150] = 1
    source.requires_grad_(False)  # same attention kernels as the frozen loaded model
    with torch.no_grad():
        prompted = encode_masked(model, images, masks)
        assert torch.allclose(prompted, torch.nn.functional.normalize(source.visual(images, masks), dim=-1), atol=1e-6)
        assert not torch.allclose(prompted, encode_masked(model, images, masks, mask_prompt=False), atol=1e-3)
        tokens = tokenizer(["a photo of a boat."])
        assert torch.allclose(model.encode_text(tokens), source.encode_text(tokens), atol=1e-5)


@pytest.mark.slow
def test_vit_l14_architecture(tmp_path):
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-L-14", pretrained=None, quick_gelu=True).eval()
    source.visual = mask_prompted_from(source.visual)
    assert source.visual.mask_embedding.shape == (3, 256, 1024)
    torch.save(ovseg_checkpoint(source), tmp_path / "ovseg_swinbase_vitL14_ft_mpt.pth")
    model, tokenizer = load_clip("ViT-L/14", None, mask_checkpoint=tmp_path / "ovseg_swinbase_vitL14_ft_mpt.pth")
    images, masks = torch.randn(1, 3, 224, 224), (torch.rand(1, 1, 224, 224) > 0.3).float()
    with torch.no_grad():
        assert torch.equal(model.visual(images, masks), source.visual(images, masks))
    assert encode_texts(model, tokenizer, ["a photo of a boat."]).shape == (1, 768)


# ----- the OV-Seg layout on a tiny CLIP

def test_ovseg_round_trip_tiny(tmp_path):
    source = masked_source()
    torch.save(ovseg_checkpoint(source), tmp_path / "ovseg.pth")
    model = attach_mask_checkpoint(tiny_clip(1), tmp_path / "ovseg.pth")
    images, masks = torch.randn(3, 3, 32, 32), (torch.rand(3, 1, 32, 32) > 0.6).float()
    tokens = toy_tokenizer(["boat", "water", "sky"])
    with torch.no_grad():
        assert torch.equal(model.visual(images, masks), source.visual(images, masks))
        assert torch.equal(model.encode_text(tokens), source.encode_text(tokens))


def test_ovseg_layouts_equivalent():
    source = masked_source()
    plain = {k: v for k, v in source.state_dict().items()}
    expected = ovseg_clip_state_dict(ovseg_checkpoint(source), "x")
    assert expected.keys() == plain.keys()
    for layout in (plain, {"state_dict": {"module." + k: v for k, v in plain.items()}},
                   {"model": {"module." + OVSEG_CLIP_PREFIX + k: v for k, v in plain.items()}}):
        got = ovseg_clip_state_dict(layout, "x")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_shared_mask_embedding_is_broadcast(tmp_path):
    source = masked_source()
    checkpoint = ovseg_checkpoint(source)
    shared = torch.randn(3, 1, 64)
    checkpoint["model"][OVSEG_CLIP_PREFIX + "visual.mask_embedding"] = shared
    torch.save(checkpoint, tmp_path / "shared.pth")
    model = attach_mask_checkpoint(tiny_clip(1), tmp_path / "shared.pth")
    assert torch.equal(model.visual.mask_embedding, shared.expand(3, 16, 64))


def _drop(checkpoint, suffix):
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if not k.endswith(suffix)}
    return checkpoint


def _add(checkpoint, key, value):
    checkpoint["model"][key] = value
    return checkpoint


def _reshape(checkpoint, key, shape):
    checkpoint["model"][OVSEG_CLIP_PREFIX + key] = torch.zeros(shape)
    return checkpoint


@pytest.mark.parametrize("edit, depth, needles", [
    (lambda c: _drop(c, "visual.ln_post.weight"), 3, ["missing keys: ln_post.weight"]),
    (lambda c: _drop(c, "token_embedding.weight"), 3, ["text tower", "missing keys: token_embedding.weight"]),
    (lambda c: _add(c, OVSEG_CLIP_PREFIX + "visual.extra.weight", torch.zeros(1)), 3, ["unexpected keys: extra.weight"]),
    (lambda c: _add(c, OVSEG_CLIP_PREFIX + "text_extra", torch.zeros(1)), 3, ["unexpected keys: text_extra"]),
    (lambda c: _reshape(c, "visual.positional_embedding", (5, 64)), 3, ["wrong shapes: positional_embedding [5, 64]"]),
    (lambda c: _reshape(c, "ln_final.weight", (16,)), 3, ["wrong shapes: ln_final.weight [16]"]),
    (lambda c: c, 2, ["prompt_depth=3"]),
    (lambda c: _drop(c, "mask_embedding"), 3, ["plain CLIP checkpoint", "clip_pretrained"]),
    (lambda c: {"model": {"backbone.w": torch.zeros(1)}}, 3, ["no CLIP image tower"]),
    (lambda c: [1, 2, 3], 3, ["expected a dict"]),
])
def test_bad_mask_checkpoints_name_the_file(tmp_path, edit, depth, needles):
    torch.save(edit(ovseg_checkpoint(masked_source())), tmp_path / "bad_ovseg.pth")
    with pytest.raises(ValueError) as error:
        attach_mask_checkpoint(tiny_clip(1), tmp_path / "bad_ovseg.pth", prompt_depth=depth)
    assert "bad_ovseg.pth" in str(error.value)
    for needle in needles:
        assert needle in str(error.value)


def test_corrupt_and_missing_mask_checkpoint(tmp_path):
    (tmp_path / "corrupt.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt.pth"):
        attach_mask_checkpoint(tiny_clip(1), tmp_path / "corrupt.pth")
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as error:  # checked before any model is built
        load_clip("ViT-L-14", None, mask_checkpoint="weights/ovseg.pth", base_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert str(tmp_path / "weights" / "ovseg.pth") in message and "clip_mask_checkpoint" in message


# ----- where the weights come from

def test_local_checkpoint_file(tmp_path):
    torch.manual_seed(3)
    source = open_clip.create_model("ViT-S-32-alt", pretrained=None).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, tmp_path / "clip.pt")
    model, _ = load_clip("ViT-S-32-alt", "clip.pt", base_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    broken = {k: v for k, v in source.state_dict().items() if k != "ln_final.bias"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt"):
        load_clip("ViT-S-32-alt", tmp_path / "broken.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_torchscript_file(tmp_path):
    """OpenAI ships CLIP as TorchScript archives, which torch.load(weights_only=True) refuses."""
    scripted = torch.jit.script(tiny_clip(3))
    torch.jit.save(scripted, tmp_path / "ViT-tiny.pt")
    model = load_openai_archive(tiny_clip(4), tmp_path / "ViT-tiny.pt")
    assert all(torch.equal(v, scripted.state_dict()[k]) for k, v in model.state_dict().items())
    assert resolve_clip_weights("ViT-S-32-alt", tmp_path / "ViT-tiny.pt") == (tmp_path / "ViT-tiny.pt", True)
    with pytest.raises(ValueError, match="ViT-tiny.pt.*wrong shapes"):  # the archive route of load_clip
        load_clip("ViT-S-32-alt", tmp_path / "ViT-tiny.pt")


def test_offline_tag_fails_fast_and_says_what_to_do(no_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as error:
        load_clip("ViT-L-14", "openai")
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert "ViT-L-14" in message and "'openai'" in message  # what
    assert "HF_HUB_OFFLINE" in message  # why
    assert str(no_cache / "hf" / "hub" / "models--timm--vit_large_patch14_clip_224.openai") in message  # where
    assert str(no_cache / "home" / ".cache" / "clip" / "ViT-L-14.pt") in message
    assert "[models] clip_pretrained" in message and "local checkpoint file" in message  # how


def test_no_network_fails_fast(no_cache, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: False)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="no network"):
        resolve_clip_weights("ViT-B-16", "openai")
    assert time.perf_counter() - start < 1.0


def test_cached_tag_is_used_without_network(no_cache, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: pytest.fail("network used"))
    repo = no_cache / "hf" / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors").write_bytes(b"")
    assert resolve_clip_weights("ViT-B-16", "openai") == (repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors", True)
    legacy = no_cache / "home" / ".cache" / "clip" / "ViT-L-14.pt"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"")
    assert resolve_clip_weights("ViT-L-14", "openai") == (legacy, True)


def test_from_settings(tmp_path, no_cache, monkeypatch):
    settings_file = tmp_path / "settings.ini"
    settings_file.write_text(render_settings())
    settings = load_settings(settings_file, {"models.clip_model": "ViT-B-16", "models.clip_pretrained": ""})
    model, tokenizer = from_settings(settings)
    assert tokenizer(["x"]).shape == (1, 77) and not isinstance(model.visual, MaskPromptViT)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="clip_pretrained"):
        from_settings(load_settings(settings_file))  # ViT-L-14 / openai, nothing cached
    with pytest.raises(MissingWeightsError, match="clip_mask_checkpoint") as error:
        from_settings(load_settings(settings_file, {"models.clip_mask_checkpoint": "ovseg.pth"}))
    assert str(tmp_path / "ovseg.pth") in str(error.value)
    with pytest.raises(ValueError, match="clip_model"):
        from_settings(load_settings(settings_file, {"models.clip_model": "ViT-Z-1"}))


# ----- text features and the cache

def test_text_cache_encodes_each_text_once(tmp_path):
    model = tiny_clip()
    calls = []
    encode_text = model.encode_text
    model.encode_text = lambda tokens: calls.append(len(tokens)) or encode_text(tokens)
    cache = TextFeatureCache(model, toy_tokenizer, tmp_path / "text_features.pt", batch_size=2)
    texts = ["boat", "water", "boat", "sky", "water"]
    features = cache(texts)
    assert sum(calls) == 3 and features.shape == (5, 32)
    assert torch.equal(features[0], features[2])
    assert torch.allclose(features, encode_texts(model, toy_tokenizer, texts), atol=1e-6)
    cache.save()
    calls.clear()
    reopened = TextFeatureCache(model, toy_tokenizer, tmp_path / "text_features.pt")
    assert reopened.texts == ["boat", "water", "sky"] and torch.equal(reopened.features, cache.features)
    assert reopened.update(["sky", "grass", "grass", "boat"]) == 1 and calls == [1]
    assert torch.allclose(reopened(["grass"]), encode_texts(model, toy_tokenizer, ["grass"]), atol=1e-6)


def test_text_cache_refuses_another_encoder(tmp_path):
    model = tiny_clip()
    cache = TextFeatureCache(model, toy_tokenizer, tmp_path / "cache.pt")
    cache(["boat"])
    cache.save()
    other = tiny_clip(seed=5)
    assert text_encoder_digest(other, toy_tokenizer) != cache.digest
    with pytest.raises(ValueError, match="cache.pt.*another text encoder"):
        TextFeatureCache(other, toy_tokenizer, tmp_path / "cache.pt")
    # the image tower is not part of the identity
    with torch.no_grad():
        model.visual.proj.mul_(2)
    assert len(TextFeatureCache(model, toy_tokenizer, tmp_path / "cache.pt")) == 1
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cache.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.pt"):
        TextFeatureCache(model, toy_tokenizer, tmp_path / "cut.pt")


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip()


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.sampled_from(["boat", "water", "sky", "grass", "a canoe", "rails", ""]), max_size=12),
       batch_size=st.integers(1, 5))
def test_text_cache_matches_direct_encoding(tiny, texts, batch_size):
    cache = TextFeatureCache(tiny, toy_tokenizer, batch_size=batch_size)
    got = cache(texts)
    assert len(cache) == len(set(texts)) and got.shape == (len(texts), 32)
    assert torch.allclose(got, encode_texts(tiny, toy_tokenizer, texts), atol=1e-6)


def test_encode_masked_routes():
    model = tiny_clip()
    model.visual = mask_prompted_from(model.visual)
    images, masks = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        prompted = encode_masked(model, images, masks)
        assert torch.allclose(prompted, torch.nn.functional.normalize(model.visual(images, masks), dim=-1))
        forced = encode_masked(model, images, masks, mask_prompt=False)
        assert torch.allclose(forced, torch.nn.functional.normalize(model.encode_image(images * masks), dim=-1))
    with pytest.raises(ValueError, match="mask_prompt=True"):
        encode_masked(tiny_clip(), images, masks, mask_prompt=True)
    with pytest.raises(ValueError, match="masks must be"):
        encode_masked(model, images, masks[:, :, :16])
