"""Training augmentation and CAM inference views (qaclims.transforms)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from qaclims.data import VOCDataset
from qaclims.fixtures import make_voc_tree
from qaclims.transforms import (CAM_SCALES, IMAGENET_MEAN, IMAGENET_STD, InferenceViews, TrainAugment,
                                TransformedDataset, collate_samples, crop_with_padding, denormalize_image,
                                inference_views, long_side_size, normalize_image, random_crop_box, resize_image,
                                sample_rng, scaled_size, train_augment)


def blocks_sample(height=60, width=90, seed=0):
    "An image of flat colour blocks whose mask is a function of the colour (class k has grey level 40 k)."
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, size=(3, 3)).astype(np.uint8)
    mask = np.kron(coarse, np.ones((height // 3, width // 3), np.uint8))
    image = np.repeat((mask * 60 + 20)[..., None], 3, axis=2).astype(np.uint8)
    labels = np.unique(mask[mask > 0]) - 1
    vector = np.zeros(3, np.float32)
    vector[labels] = 1
    return {"id": f"blocks{seed}", "image": image, "mask": mask, "labels": labels.astype(np.int64), "label_vector": vector}


def test_normalisation_is_the_reference_arithmetic():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.empty(image.shape, np.float32)
    for c in range(3):
        expected[..., c] = (image[..., c] / 255. - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    assert np.array_equal(normalize_image(image), expected)
    assert np.array_equal(denormalize_image(torch.from_numpy(expected.transpose(2, 0, 1))), image)


def test_resize_follows_pil_bicubic_with_rounded_sizes():
    image = np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    assert long_side_size(37, 50, 320) == (int(np.round(37 * 6.4)), 320)
    assert long_side_size(500, 375, 640) == (640, 480)
    assert scaled_size(7, 9, 0.5) == (4, 4)              # numpy rounds half to even
    expected = np.asarray(Image.fromarray(image).resize((25, 18), Image.BICUBIC))
    assert np.array_equal(resize_image(image, (18, 25)), expected)
    assert resize_image(image, (37, 50)) is image


def test_train_views_shapes_and_determinism():
    sample = blocks_sample()
    a = train_augment(sample, sample_rng(4, 0, 2))
    b = train_augment(sample, sample_rng(4, 0, 2))
    c = train_augment(sample, sample_rng(4, 1, 2))
    assert a["image"].shape == (3, 512, 512) and a["image"].dtype == torch.float32
    assert a["mask"].shape == (512, 512) and a["mask"].dtype == torch.int64
    assert a["label_vector"].dtype == torch.float32 and a["labels"].dtype == torch.int64
    assert a["id"] == sample["id"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    assert sample["image"].dtype == np.uint8 and sample["mask"].dtype == np.uint8   # input untouched


def test_mask_follows_the_image():
    for seed in range(6):
        sample = blocks_sample(seed=seed)
        view = train_augment(sample, sample_rng(0, 0, seed), long_side=(80, 140), crop_size=96)
        mask, grey = view["mask"], denormalize_image(view["image"])[..., 0].astype(int)
        inside = mask != 255
        predicted = torch.from_numpy(np.clip(np.round((grey - 20) / 60), 0, 3).astype(np.int64))
        agree = (predicted[inside] == mask[inside]).float().mean().item()
        assert agree > 0.97, (seed, agree)
        assert torch.all(view["image"][:, ~inside] == 0)


def test_other_pixel_maps_follow_the_mask():
    sample = blocks_sample()
    sample["object_map"] = sample["mask"].astype(np.int32) * 7
    sample["flag"] = sample["mask"] > 0
    sample["graph"] = {"objects": []}
    for seed in range(5):
        view = train_augment(sample, sample_rng(0, 0, seed), long_side=(50, 120), crop_size=100)
        inside = view["mask"] != 255
        assert view["object_map"].dtype == torch.int32 and view["flag"].dtype == torch.bool
        assert torch.equal(view["object_map"][inside].long(), view["mask"][inside] * 7)
        assert torch.equal(view["flag"][inside], view["mask"][inside] > 0)
        assert torch.all(view["object_map"][~inside] == 255) and not view["flag"][~inside].any()
        assert view["graph"] is sample["graph"]
    batch = collate_samples([view, view])
    assert batch["object_map"].shape == (2, 100, 100) and batch["graph"] == [sample["graph"]] * 2
    assert isinstance(batch["labels"], list) and batch["label_vector"].shape == (2, 3)


def test_both_flips_and_long_sides_over_seeds():
    sample = {"image": np.zeros((10, 20, 3), np.uint8), "mask": np.zeros((10, 20), np.uint8)}
    sample["mask"][:, :5] = 1
    sides, flipped = set(), set()
    for seed in range(40):
        view = train_augment(sample, sample_rng(seed, 0, 0), long_side=(20, 24), crop_size=64)
        valid = view["mask"] != 255
        rows, cols = valid.any(1).nonzero().squeeze(1), valid.any(0).nonzero().squeeze(1)
        sides.add(int(cols.numel()))
        assert abs(cols.numel() - 2 * rows.numel()) <= 1
        left = view["mask"][rows[0], cols[0]].item()
        flipped.add(left != 1)
    assert sides == set(range(20, 25)) and flipped == {True, False}


@given(h=st.integers(1, 120), w=st.integers(1, 120), side=st.integers(1, 150), crop=st.integers(1, 96),
       seed=st.integers(0, 2 ** 32 - 1), flip=st.booleans())
@hsettings(max_examples=60, deadline=None)
def test_crop_properties(h, w, side, crop, seed, flip):
    image = np.full((h, w, 3), 200, np.uint8)
    sample = {"image": image, "mask": np.ones((h, w), np.uint8)}
    view = train_augment(sample, np.random.default_rng(seed), long_side=(side, side), crop_size=crop, flip=flip)
    rh, rw = long_side_size(h, w, side)
    assert view["image"].shape == (3, crop, crop) and view["mask"].shape == (crop, crop)
    kept = view["mask"] == 1
    assert int(kept.sum()) == min(rh, crop) * min(rw, crop)
    assert set(view["mask"].unique().tolist()) <= {1, 255}
    assert torch.all(view["image"][:, ~kept] == 0) and torch.all(view["image"][:, kept] > 0)
    rows, cols = kept.any(1).nonzero().squeeze(1), kept.any(0).nonzero().squeeze(1)
    assert rows.numel() == min(rh, crop) and rows.max() - rows.min() + 1 == rows.numel()   # one block
    assert cols.numel() == min(rw, crop) and cols.max() - cols.min() + 1 == cols.numel()


@given(h=st.integers(1, 40), w=st.integers(1, 40), crop=st.integers(1, 40), seed=st.integers(0, 1000))
@hsettings(max_examples=60, deadline=None)
def test_crop_box_keeps_a_window(h, w, crop, seed):
    array = np.arange(h * w).reshape(h, w)
    box = random_crop_box(h, w, crop, np.random.default_rng(seed))
    out = crop_with_padding(array, box, crop, -1)
    values = out[out >= 0]
    assert values.size == min(h, crop) * min(w, crop)
    top, left = divmod(int(values.min()), w)
    assert np.array_equal(out[out >= 0].reshape(min(h, crop), min(w, crop)),
                          array[top:top + min(h, crop), left:left + min(w, crop)])


def test_inference_views():
    sample = blocks_sample(45, 63)
    out = inference_views(sample)
    assert out["scales"] == CAM_SCALES == (1.0, 0.5, 1.5, 2.0) and out["size"] == (45, 63)
    for scale, view in zip(CAM_SCALES, out["views"]):
        h, w = scaled_size(45, 63, scale)
        assert view.shape == (2, 3, h, w) and view.dtype == torch.float32
        assert torch.equal(view[1], view[0].flip(-1))
    exact = torch.from_numpy(normalize_image(sample["image"]).transpose(2, 0, 1))
    assert torch.equal(out["views"][0][0], exact)
    assert out["mask"] is sample["mask"]
    again = InferenceViews(scales=(1.0, 0.5))(sample)
    assert len(again["views"]) == 2 and torch.equal(again["views"][1], out["views"][1])


def test_bad_input_is_a_clear_error():
    sample = blocks_sample()
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        train_augment(sample, 0)
    with pytest.raises(ValueError, match="long_side"):
        train_augment(sample, np.random.default_rng(0), long_side=(640, 320))
    with pytest.raises(ValueError, match="differs"):
        train_augment({"image": sample["image"], "mask": sample["mask"][:-1]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        normalize_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="scales"):
        inference_views(sample, scales=())
    with pytest.raises(ValueError, match="scale"):
        scaled_size(4, 4, 0)
    with pytest.raises(ValueError, match="epoch"):
        sample_rng(0, -1, 0)
    with pytest.raises(ValueError, match="empty batch"):
        collate_samples([])


def test_loader_on_the_voc_fixture(tmp_path):
    tree = make_voc_tree(tmp_path, n_generated=7)
    dataset = VOCDataset(tree["voc_root"], "train_aug", sbd_root=tree["sbd_root"])
    views = TransformedDataset(dataset, TrainAugment(crop_size=128, long_side=(100, 160)), seed=1)
    loader = DataLoader(views, batch_size=3, shuffle=False, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 128, 128) and batch["mask"].shape == (3, 128, 128)
    assert batch["label_vector"].shape == (3, 20) and batch["id"] == dataset.ids[:3]
    for labels, vector in zip(batch["labels"], batch["label_vector"]):
        assert vector.nonzero().squeeze(1).tolist() == labels.tolist()
    again = next(iter(DataLoader(views, batch_size=3, collate_fn=collate_samples)))
    assert torch.equal(batch["image"], again["image"])
    no_masks = [dict(views[0], mask=None), views[1]]
    with pytest.raises(ValueError, match="mask"):
        collate_samples(no_masks)
    plain = TransformedDataset(dataset, InferenceViews())
    assert len(plain[0]["views"]) == 4
