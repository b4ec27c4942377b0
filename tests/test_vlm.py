"""qaclims.vlm: the mask-prompted CLIP ViT against the reference vectors and open_clip."""
import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transformer import VisionTransformer
from refdata import load_reference

from qaclims.vlm import MaskPromptViT, load_visual_state_dict, mask_prompt_vit, mask_prompted_from, patch_mask

REF = "mask_vit.npz"


def _data():
    return load_reference(REF)


def _mask_cases(data):
    """Every case prefix that carries a pixel mask `m`."""
    return sorted(k.split("/")[0] for k in data if k.endswith("/m") and k.count("/") == 1)


def _reference_vit(dtype=torch.float32):
    data = _data()
    cfg = {k.split("/", 1)[1]: int(v) for k, v in data.items() if k.startswith("config/")}
    vit = mask_prompt_vit(image_size=cfg["input_resolution"], patch_size=cfg["patch_size"], width=cfg["width"],
                          layers=cfg["layers"], heads=cfg["heads"], output_dim=cfg["output_dim"],
                          prompt_depth=cfg["mask_prompt_depth"], quick_gelu=True)
    sd = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("sd/")}
    load_visual_state_dict(vit, sd)
    return vit.to(dtype).eval(), cfg


@pytest.fixture(scope="module")
def ref_vit():
    return _reference_vit()[0]


@pytest.fixture(scope="module")
def ref_vit64():
    return _reference_vit(torch.float64)[0]


def test_cases_present():
    assert _mask_cases(_data()), "no case with a mask in mask_vit.npz"


@pytest.mark.parametrize("case", _mask_cases(load_reference(REF)))
def test_reference_float32(ref_vit, case):
    data = _data()
    x, m = torch.from_numpy(data["x"]), torch.from_numpy(data[f"{case}/m"]).float()
    with torch.no_grad():
        out = ref_vit(x, m)
    np.testing.assert_allclose(out.numpy(), data[f"{case}/out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", _mask_cases(load_reference(REF)))
def test_reference_float64(ref_vit64, case):
    data = _data()
    if f"{case}/out_f64_lnpatched" not in data:
        pytest.skip(f"{case} has no float64 output")
    x, m = torch.from_numpy(data["x"]).double(), torch.from_numpy(data[f"{case}/m"]).double()
    with torch.no_grad():
        out = ref_vit64(x, m)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), data[f"{case}/out_f64_lnpatched"], atol=1e-9, rtol=0)


@pytest.mark.parametrize("case", _mask_cases(load_reference(REF)))
def test_reference_patch_mask(ref_vit, case):
    data = _data()
    m = torch.from_numpy(data[f"{case}/m"])
    got = patch_mask(m, ref_vit.patch_size)
    np.testing.assert_array_equal(got.numpy().astype(np.uint8), data[f"{case}/patch_mask"])
    # the tower's own view of the mask, and the float mask as passed to the reference
    assert torch.equal(ref_vit._kept_patches(m.float(), torch.zeros(m.shape[0], 3, *m.shape[2:]))[..., 0], got)


def test_reference_no_mask(ref_vit):
    data = _data()
    if "no_mask/out" not in data:
        pytest.skip("no no_mask case")
    with torch.no_grad():
        out = ref_vit(torch.from_numpy(data["x"]))
    np.testing.assert_allclose(out.numpy(), data["no_mask/out"], atol=1e-5, rtol=0)


def test_reference_zero_mask_property(ref_vit):
    data = _data()
    for case in _mask_cases(data):
        if data[f"{case}/m"].any():
            continue
        with torch.no_grad():
            out = ref_vit(torch.from_numpy(data["x"]), torch.from_numpy(data[f"{case}/m"]).float())
        assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
        ref = data[f"{case}/out"]
        np.testing.assert_allclose(ref, np.broadcast_to(ref[:1], ref.shape), atol=1e-6)


def test_zero_mask_images_all_equal(ref_vit):
    x = torch.randn(4, 3, *ref_vit.image_size)
    with torch.no_grad():
        out = ref_vit(x, torch.zeros(4, 1, *ref_vit.image_size))
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)


def test_all_ones_mask_is_no_mask_bitwise(ref_vit):
    x = torch.randn(3, 3, *ref_vit.image_size)
    with torch.no_grad():
        plain = ref_vit(x)
        assert torch.equal(ref_vit(x, torch.ones(3, 1, *ref_vit.image_size)), plain)
        assert torch.equal(ref_vit(x, torch.ones(3, 1, *ref_vit.image_size, dtype=torch.bool)), plain)
        # the open_clip forward of the same module and a plain open_clip tower with the same weights
        assert torch.equal(VisionTransformer.forward(ref_vit, x), plain)
        cfg = _reference_vit()[1]
        plain_tower = VisionTransformer(cfg["input_resolution"], cfg["patch_size"], cfg["width"], cfg["layers"],
                                        cfg["heads"], 4.0, output_dim=cfg["output_dim"],
                                        act_layer=open_clip.transformer.QuickGELU).eval()
        load_visual_state_dict(plain_tower, {k: v for k, v in ref_vit.state_dict().items() if k != "mask_embedding"})
        assert torch.equal(plain_tower(x), plain)


def test_gradient_reaches_mask_embedding():
    torch.manual_seed(1)
    vit = mask_prompt_vit(32, 8, 32, 3, 2, 16, prompt_depth=3).eval()
    masks = torch.ones(2, 1, 32, 32)
    masks[:, :, :8, :16] = 0           # patches 0 and 1 dropped in both images
    masks[1, :, 24:, 24:] = 0          # patch 15 dropped in the second image only
    vit(torch.randn(2, 3, 32, 32), masks).square().sum().backward()
    grad = vit.mask_embedding.grad     # [3, 16, D]
    dropped = torch.zeros(16, dtype=torch.bool)
    dropped[[0, 1, 15]] = True
    assert torch.all(grad[:, dropped].abs().sum(-1) > 0)      # every depth, every dropped patch
    assert torch.all(grad[:, ~dropped] == 0)                 # kept patches never use it
    assert vit.conv1.weight.grad is not None


def test_gradient_zero_for_last_depth_after_last_block():
    vit = mask_prompt_vit(32, 8, 32, 2, 2, 16, prompt_depth=3).eval()   # depth = layers + 1
    vit(torch.randn(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)).sum().backward()
    grad = vit.mask_embedding.grad
    assert grad[:2].abs().sum() > 0 and torch.all(grad[2] == 0)      # replaced after the last block: unused


def test_grad_checkpointing_same_result():
    torch.manual_seed(4)
    vit = mask_prompt_vit(32, 8, 32, 2, 2, 16)
    with torch.no_grad():
        vit.mask_embedding.normal_()
    x, m = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.98).float()
    plain = vit(x, m)
    plain.sum().backward()
    grad = vit.mask_embedding.grad.clone()
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    checked = vit(x, m)
    checked.sum().backward()
    torch.testing.assert_close(checked, plain)
    torch.testing.assert_close(vit.mask_embedding.grad, grad)


def test_batch_of_one_matches_batch(ref_vit):
    torch.manual_seed(2)
    x = torch.randn(5, 3, *ref_vit.image_size)
    m = (torch.rand(5, 1, *ref_vit.image_size) > 0.97).float()
    m[0] = 1
    m[1] = 0
    with torch.no_grad():
        batched = ref_vit(x, m)
        single = torch.cat([ref_vit(x[i:i + 1], m[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(single, batched, atol=1e-6, rtol=0)


def test_bf16_autocast_close(ref_vit):
    data = _data()
    case = _mask_cases(data)[0]
    x, m = torch.from_numpy(data["x"]), torch.from_numpy(data[f"{case}/m"]).float()
    with torch.no_grad():
        ref = ref_vit(x, m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ref_vit(x, m)
    diff = (low.float() - ref).abs().max().item()
    print(f"bf16 autocast max abs diff: {diff:.3g} (output max abs {ref.abs().max().item():.3g})")
    assert low.dtype == torch.bfloat16
    assert diff < 0.05 * ref.abs().max().item()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 4), (2, 8), (8, 4)]), st.integers(1, 3), st.integers(0, 2**31 - 1),
       st.floats(0.0, 1.0))
def test_patch_mask_is_ceil_avg_pool(batch, patch, grid, seed, density):
    gen = torch.Generator().manual_seed(seed)
    h, w = patch[0] * grid, patch[1] * (grid + 1)
    m = (torch.rand(batch, 1, h, w, generator=gen) < density * 0.3).float() * torch.rand(batch, 1, h, w, generator=gen)
    ref = torch.ceil(torch.nn.functional.avg_pool2d(m, patch, stride=patch)).reshape(batch, -1)
    assert torch.equal(patch_mask(m, patch), ref.bool())


def test_load_visual_state_dict_prefix_and_errors(ref_vit):
    sd = ref_vit.state_dict()
    full_clip = {f"visual.{k}": v for k, v in sd.items()} | {"transformer.resblocks.0.ln_1.weight": torch.ones(3)}
    fresh = mask_prompt_vit(*_sizes(ref_vit))
    load_visual_state_dict(fresh, full_clip)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    plain = {k: v.numpy() for k, v in sd.items() if k != "mask_embedding"}    # arrays are fine too
    with pytest.raises(ValueError, match="missing keys: mask_embedding.*allow_missing_mask_embedding"):
        load_visual_state_dict(mask_prompt_vit(*_sizes(ref_vit)), plain)
    loaded = load_visual_state_dict(mask_prompt_vit(*_sizes(ref_vit)), plain, allow_missing_mask_embedding=True)
    assert torch.all(loaded.mask_embedding == 0) and torch.equal(loaded.proj, ref_vit.proj)
    missing = {k: v for k, v in sd.items() if k != "ln_post.bias"} | {"visual_extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing keys: ln_post.bias; unexpected keys: visual_extra"):
        load_visual_state_dict(mask_prompt_vit(*_sizes(ref_vit)), missing, allow_missing_mask_embedding=True)
    with pytest.raises(ValueError, match="wrong shapes: mask_embedding"):
        load_visual_state_dict(mask_prompt_vit(*_sizes(ref_vit), prompt_depth=2), sd)
    with pytest.raises(TypeError, match="mapping"):
        load_visual_state_dict(fresh, [1, 2])


def _sizes(vit):
    width = vit.conv1.out_channels
    return (vit.image_size[0], vit.patch_size[0], width, len(vit.transformer.resblocks),
            vit.transformer.resblocks[0].attn.num_heads, vit.output_dim)


def test_validation_errors(ref_vit):
    size = ref_vit.image_size
    with pytest.raises(ValueError, match="not divisible"):
        mask_prompt_vit(30, 8, 32, 2, 2, 16)
    for depth in (0, -1, 5, 2.0):   # layers + 1 = 4 is the largest allowed
        with pytest.raises(ValueError, match="prompt_depth"):
            mask_prompt_vit(32, 8, 32, 3, 2, 16, prompt_depth=depth)
    x = torch.zeros(2, 3, *size)
    bad_masks = [torch.zeros(2, *size), torch.zeros(1, 1, *size), torch.zeros(2, 2, *size),
                 torch.zeros(2, 1, size[0] // 2, size[1])]
    for masks in bad_masks:
        with pytest.raises(ValueError, match=r"masks must be \[B, 1, H, W\]"):
            ref_vit(x, masks)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ref_vit(x, torch.full((2, 1, *size), 3.0))
    with pytest.raises(ValueError, match="images must be"):
        ref_vit(torch.zeros(2, 3, size[0] + 8, size[1]))
    with pytest.raises(ValueError, match="images must be"):
        ref_vit(torch.zeros(2, 1, *size))


@pytest.fixture(scope="module")
def clip_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def test_vit_b16_swap_matches_open_clip(clip_b16):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        original = clip_b16.visual(x)
        tower = mask_prompted_from(clip_b16.visual)
        assert isinstance(tower, MaskPromptViT) and isinstance(tower, VisionTransformer)
        assert tower.mask_embedding.shape == (3, 196, 768) and torch.all(tower.mask_embedding == 0)
        assert type(tower.transformer.resblocks[0].mlp.gelu) is type(clip_b16.visual.transformer.resblocks[0].mlp.gelu)
        assert torch.equal(tower(x, torch.ones(1, 1, 224, 224)), original)
        # as the `.visual` of the CLIP model: encode_image is the unmasked tower, unchanged
        clip_b16.visual = tower
        assert torch.equal(clip_b16.encode_image(x), original)


def test_mask_prompted_from_keeps_flags():
    visual = VisionTransformer(32, 8, 32, 2, 2, 4.0, output_dim=16)
    visual.lock()
    tower = mask_prompted_from(visual, prompt_depth=2)
    assert tower.training and not tower.conv1.weight.requires_grad and tower.mask_embedding.requires_grad
    assert tower.mask_embedding.shape == (2, 16, 32)
    tower64 = mask_prompted_from(visual.double().eval())
    assert tower64.conv1.weight.dtype == torch.float64 and not tower64.training
    with pytest.raises(ValueError, match="prompt_depth"):
        mask_prompted_from(visual, prompt_depth=4)


@pytest.mark.slow
def test_vit_l14_swap_matches_open_clip():
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-L-14", pretrained=None).visual.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tower = mask_prompted_from(visual)
        assert tower.mask_embedding.shape == (3, 256, 1024)
        assert torch.equal(tower(x, torch.ones(1, 1, 224, 224)), visual(x))
