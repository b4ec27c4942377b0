"""Stage 4 (qaclims.eval_cams): the reference CAM mIoU from files, metrics.json / sweep.csv, bad input, and the
SynthWorld diagnostics on hand-made CAMs."""
import csv
import json

import numpy as np
import pytest
import torch
from refdata import case_names, load_reference

from qaclims.camnet import CamNet
from qaclims.eval_cams import cam_diagnostics, evaluate_cams, region_activation, score_cams
from qaclims.make_cams import load_cam_file, make_cams, save_cam_file
from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.synth import region_masks
from qaclims.profiles import profile_dataset
from qaclims.train_cam import save_cam_net


def test_reference_miou_through_cam_files(tmp_path):
    reference = load_reference("cam_eval.npz")
    images = case_names(reference, "img")
    thresholds = sorted({float(key.split("/")[0][len("thr_"):]) for key in reference if key.startswith("thr_")})
    assert images and thresholds
    samples = []
    for name in images:  # stored as float32 files, as make_cams(dtype=np.float32) writes them, and read back
        path = save_cam_file(tmp_path / f"{name}.npz", {"keys": reference[f"{name}/keys"], "cam": reference[f"{name}/high_res"],
                                                        "high_res": reference[f"{name}/high_res"]}, dtype=np.float32)
        record = load_cam_file(path, size=reference[f"{name}/gt_raw"].shape)
        samples.append((record["high_res"], record["keys"], reference[f"{name}/gt_raw"]))
    num_classes = reference[f"thr_{thresholds[0]}/iou21"].shape[0]
    result = score_cams(samples, [f"class{k}" for k in range(1, num_classes)], thresholds=thresholds)
    for threshold in thresholds:
        t = result["thresholds"].index(threshold)
        assert result["miou"][t] == pytest.approx(float(reference[f"thr_{threshold}/miou"]), abs=1e-12)
        np.testing.assert_allclose(result["per_class"][t], reference[f"thr_{threshold}/iou21"], rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    settings = load_settings(overrides={"data.run_dir": str(run_dir), "synth.image_size": 48, "synth.val_size": 6,
                                        "study.num_workers": 0})
    torch.manual_seed(0)
    checkpoint = save_cam_net(run_dir / "random.pt", CamNet(8, "resnet18", 32, bn="train"), seed=7)
    return settings, make_cams(settings, checkpoint, "val", progress=False)


def test_metrics_files(tiny):
    settings, cams_dir = tiny
    metrics = evaluate_cams(settings, cams_dir, "val")
    out = settings.data.run_dir / "metrics" / f"cams-{cams_dir.name}"
    stored = read_json(out / "metrics.json")
    assert stored["seed"] == 7 and stored["split"] == "val" and stored["commit"] and stored["settings"]["synth"]["image_size"] == 48
    assert stored["thresholds"][0] == 0.05 and stored["thresholds"][-1] == 0.95 and len(stored["miou"]) == 91
    assert stored["miou_at_reference"] == metrics["miou"][stored["thresholds"].index(0.15)]
    assert stored["best_miou"] == max(stored["miou"]) and set(stored["per_class_at_best"]) == set(stored["class_names"])
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 91 and rows[10]["threshold"] == "0.15" and rows[0]["split"] == "val" and rows[0]["seed"] == "7"
    assert json.loads(rows[0]["settings"])["synth"]["val_size"] == 6 and rows[0]["commit"] == stored["commit"]
    assert float(rows[10]["miou"]) == pytest.approx(stored["miou_at_reference"], abs=1e-6)


def test_bad_input(tiny, tmp_path):
    settings, cams_dir = tiny
    ids = profile_dataset(settings, "val").ids
    victim = cams_dir / f"{ids[2]}.npz"
    original = load_cam_file(victim)
    try:
        victim.unlink()
        with pytest.raises(FileNotFoundError, match=f"{victim.name}.*make-cams"):
            evaluate_cams(settings, cams_dir, "val")
        save_cam_file(victim, dict(original, high_res=np.full_like(original["high_res"], np.nan)))
        with pytest.raises(ValueError, match=f"{victim.name}.*NaN"):
            evaluate_cams(settings, cams_dir, "val")
        save_cam_file(victim, dict(original, high_res=np.zeros((len(original["keys"]), 40, 48), np.float32)))
        with pytest.raises(ValueError, match=f"{victim.name}.*size"):
            evaluate_cams(settings, cams_dir, "val")
    finally:
        save_cam_file(victim, original)
    with pytest.raises(FileNotFoundError, match="make-cams"):
        evaluate_cams(settings, tmp_path / "no-cams", "val")
    with pytest.raises(ValueError, match="split 'val'"):
        evaluate_cams(settings, cams_dir, "test")
    with pytest.raises(FileNotFoundError, match="train-cam"):
        make_cams(settings, tmp_path / "no-checkpoint.pt", "val", progress=False)


def test_region_activation_by_hand():
    cam = np.array([[1.0, 0.5, 0.0, 0.0], [0.2, 0.1, 0.0, 0.3]])
    regions = {"object": np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool), "context": np.array([[0, 0, 0, 0], [1, 1, 0, 0]], bool)}
    stats = region_activation(cam, regions, threshold=0.15)
    assert stats["total_mass"] == pytest.approx(2.1)
    assert stats["object"] == (1.5, 2, 2) and stats["context"][1:] == (2, 1) and stats["context"][0] == pytest.approx(0.3)
    assert region_activation(cam, regions, threshold=0.5)["object"][2] == 1  # strictly above, as cams_to_labels


def test_diagnostics_on_hand_made_cams(tiny, tmp_path):
    settings, _ = tiny
    world = profile_dataset(settings, "val").world

    def write(region, scale=1.0):
        folder = tmp_path / region
        for index in range(6):
            sample = world.sample("val", index)
            maps = scale * np.stack([region_masks(sample, int(k))[region] for k in sample.labels]).astype(np.float32)
            save_cam_file(folder / f"{sample.id}.npz", {"keys": sample.labels, "cam": maps[:, ::4, ::4], "high_res": maps})
        return folder

    on_object = cam_diagnostics(settings, write("object"), "val")
    assert on_object["mass_object"] == 1 and on_object["mass_context"] == 0 and on_object["mass_elsewhere"] == 0
    assert on_object["part_coverage"] == on_object["body_coverage"] == on_object["object_coverage"] == 1
    assert on_object["context_activated"] == 0 and on_object["background_activated"] == 0
    on_part = cam_diagnostics(settings, write("part"), "val")
    assert on_part["part_coverage"] == 1 and on_part["body_coverage"] == 0 and 0 < on_part["object_coverage"] < 0.5
    on_context = cam_diagnostics(settings, write("context"), "val")
    assert on_context["mass_context"] == 1 and on_context["context_activated"] == 1 and on_context["object_coverage"] == 0
    assert on_context["pairs"] == on_context["pairs_with_context"] > 0
    faint = cam_diagnostics(settings, write("object", scale=0.1), "val", threshold=0.15)
    assert faint["object_coverage"] == 0 and faint["mass_object"] == 1  # below the threshold: mass but no coverage


def test_voc_profile_runs_the_same_stages(tmp_path):
    "Stages 0, 3 and 4 on the fixture VOC tree (random init, a small ResNet): the real profile's code path."
    from qaclims.fixtures import make_voc_tree
    from qaclims.train_cam import train_cam
    tree = make_voc_tree(tmp_path / "data")
    settings = load_settings(overrides={"data.run_dir": str(tmp_path / "runs"), "study.profile": "voc",
                                        "data.voc_root": str(tree["voc_root"]), "data.sbd_root": str(tree["sbd_root"]),
                                        "models.backbone_weights": "none", "study.num_workers": 0})
    checkpoint = train_cam(settings, seed=0, progress=False, arch="resnet18", output_stride=32, epochs=1, batch_size=4,
                           long_side=(48, 80), crop_size=64)
    record = read_json(checkpoint.parent / "manifest.json")
    assert record["config"]["bn"] == "frozen" and record["config"]["crop_size"] == 64 and record["steps"] == 2
    cams_dir = make_cams(settings, checkpoint, "val", progress=False)
    metrics = evaluate_cams(settings, cams_dir, "val")
    assert metrics["class_names"][0] == "background" and len(metrics["class_names"]) == 21
    for sample in profile_dataset(settings, "val"):  # images of different sizes: each file has its own image's size
        assert load_cam_file(cams_dir / f"{sample['id']}.npz", size=sample["mask"].shape)["keys"].tolist() == sample["labels"].tolist()
    with pytest.raises(ValueError, match="synth"):
        cam_diagnostics(settings, cams_dir, "val")
