"""Stage 5c (qaclims.pseudo_masks): the chain on a tiny SynthWorld (train_cam -> make_cams -> IR labels -> train_irn ->
pseudo masks -> evaluation), the per-image recipe, resume after SIGKILL, and bad input."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qaclims.eval_cams import evaluate_cams
from qaclims.irn import boundary_map
from qaclims.make_cams import load_cam_file, make_cams
from qaclims.profiles import profile_dataset
from qaclims.pseudo_masks import (RANDOM_WALK_CONFIGS, evaluate_pseudo_masks, make_pseudo_masks, pseudo_mask, pseudo_masks_key,
                                  random_walk_config)
from qaclims.refine import random_walk, rw_labels
from qaclims.runs import read_json
from qaclims.settings import load_settings
from qaclims.train_cam import train_cam
from qaclims.train_irn import load_irn_net, load_label_map, make_ir_labels, train_irn
from qaclims.transforms import inference_views

TINY_SETTINGS = {"synth.image_size": 48, "synth.train_size": 16, "synth.val_size": 6, "study.num_workers": 0}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    "The whole chain on a tiny world: a few CAM steps, CAMs of both splits, IR labels of train, a few IRN steps."
    run_dir = tmp_path_factory.mktemp("runs")
    settings = load_settings(overrides={"data.run_dir": str(run_dir), **TINY_SETTINGS})
    cam_checkpoint = train_cam(settings, seed=0, progress=False, epochs=1, batch_size=4, output_stride=32)
    train_cams = make_cams(settings, cam_checkpoint, "train", scales=(1.0,), progress=False)
    val_cams = make_cams(settings, cam_checkpoint, "val", scales=(1.0,), progress=False)
    ir_dir = make_ir_labels(settings, train_cams, progress=False)
    irn_checkpoint = train_irn(settings, ir_dir, seed=2, progress=False, epochs=1, batch_size=4, crop_size=48, radius=3,
                               output_stride=32)
    return settings, val_cams, irn_checkpoint


# Makes the pseudo masks two images per batch; every saved mask prints its name and pauses, so that the test can kill it.
RUN = textwrap.dedent("""
    import sys, time
    from qaclims import pseudo_masks as stage
    from qaclims.settings import load_settings
    run_dir, irn, cams, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    save = stage.save_label_map
    def slow_save(path, labels):
        out = save(path, labels)
        print("saved", path.name, flush=True)
        time.sleep(pause)
        return out
    stage.save_label_map = slow_save
    settings = load_settings(overrides={"data.run_dir": run_dir, **%r})
    print(f"folder {stage.make_pseudo_masks(settings, irn, cams, batch_size=2, progress=False)}", flush=True)
""" % TINY_SETTINGS)


def test_chain_writes_masks_and_metrics(chain):
    settings, val_cams, irn_checkpoint = chain
    masks_dir = make_pseudo_masks(settings, irn_checkpoint, val_cams, progress=False)
    val = profile_dataset(settings, "val")
    assert {p.name for p in masks_dir.iterdir()} == {f"{i}.png" for i in val.ids} | {"manifest.json", "done.json"}
    record = read_json(masks_dir / "manifest.json")
    assert record["split"] == "val" and record["seed"] == 2 and record["bg_threshold"] == 0.2 and record["radius"] == 5
    assert record["exp_times"] == 4 and record["beta"] == 10  # the synth profile's walk (RANDOM_WALK_CONFIGS)
    metrics = evaluate_pseudo_masks(settings, masks_dir, "val")
    # independent count: confusion by bincount over the valid pixels of every image
    conf = np.zeros((9, 9), np.int64)
    for index, image_id in enumerate(val.ids):
        pred, gt = load_label_map(masks_dir / f"{image_id}.png", (48, 48)).astype(np.int64), val[index]["mask"].astype(np.int64)
        valid = gt != 255
        conf += np.bincount(gt[valid] * 9 + pred[valid], minlength=81).reshape(9, 9)
    assert np.array_equal(np.asarray(metrics["confusion"]), conf)
    with np.errstate(invalid="ignore"):
        per_class = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert metrics["miou"] == pytest.approx(np.nanmean(per_class))
    out = Path(settings.data.run_dir) / "metrics" / f"pseudo_masks-{masks_dir.name}"
    written = read_json(out / "metrics.json")
    assert written["seed"] == 2 and written["split"] == "val" and written["commit"] and written["settings"]["synth"]["val_size"] == 6
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows] == ["background"] + list(val.class_names)
    assert {r["split"] for r in rows} == {"val"} and {r["seed"] for r in rows} == {"2"} and "settings" in rows[0]
    assert 0 <= evaluate_cams(settings, val_cams)["miou_at_reference"] <= 1  # the CAMs it improves on, same split


def test_masks_are_the_recipe_image_by_image(chain):
    settings, val_cams, irn_checkpoint = chain
    masks_dir = make_pseudo_masks(settings, irn_checkpoint, val_cams, progress=False)
    net, val = load_irn_net(irn_checkpoint), profile_dataset(settings, "val")
    for index in range(len(val)):
        sample = val[index]
        cams = load_cam_file(val_cams / f"{sample['id']}.npz")
        views = inference_views({"image": sample["image"]}, (1.0,))["views"]
        logits = net.boundary_logits(views[0])  # the image and its flip
        edge = torch.sigmoid((logits[0, 0] + logits[1, 0].flip(-1)) / 2).detach()
        assert torch.allclose(edge, boundary_map(net, [views[0][None]], (48, 48))[0], atol=1e-6)
        expected = rw_labels(random_walk(torch.from_numpy(cams["cam"]), edge, 10, 4, 5), cams["keys"], (48, 48), 0.2)
        assert np.array_equal(load_label_map(masks_dir / f"{sample['id']}.png"), expected.numpy().astype(np.uint8))


def test_killed_run_resumes_to_the_same_masks(chain, tmp_path):
    settings, val_cams, irn_checkpoint = chain
    straight = make_pseudo_masks(settings.with_overrides({"data.run_dir": str(tmp_path / "straight")}), irn_checkpoint,
                                 val_cams, batch_size=2, progress=False)
    process = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / "killed"), str(irn_checkpoint), str(val_cams), "0.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saved = 0
    for line in process.stdout:
        saved += line.startswith("saved")
        if saved == 3:  # in the middle of the second batch
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    folder = tmp_path / "killed" / "pseudo_masks" / straight.name
    assert len(list(folder.glob("*.png"))) == 3 and not (folder / "done.json").exists()
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "killed"), str(irn_checkpoint), str(val_cams), "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum(line.startswith("saved") for line in done.stdout.splitlines()) == 3  # only the missing ones
    assert Path(done.stdout.strip().splitlines()[-1].split(" ", 1)[1]) == folder and (folder / "done.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in straight.iterdir())
    for path in straight.glob("*.png"):
        assert np.array_equal(load_label_map(path), load_label_map(folder / path.name))


def test_pseudo_mask_of_a_handmade_case():
    "An under-activated CAM inside a ringed disk spreads over the disk and stops at the ring."
    ys, xs = np.mgrid[:24, :24]
    distance = np.hypot(ys - 12, xs - 12)
    ring = torch.as_tensor(np.clip(1 - np.abs(distance - 8.5), 0, 1), dtype=torch.float32)
    cam = np.exp(-((ys - 7.0) ** 2 + (xs - 12.0) ** 2) / 6.0)[None].astype(np.float32)
    mask = pseudo_mask(ring, cam, np.array([4]), (96, 94))
    disk = np.kron(distance < 8, np.ones((4, 4), bool))[:, :94]
    assert mask.shape == (96, 94) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 5}
    assert ((mask == 5) & disk).sum() / ((mask == 5) | disk).sum() > 0.8
    assert not pseudo_mask(ring, np.zeros((0, 24, 24), np.float32), np.zeros(0, np.int64), (96, 96)).any()


def test_random_walk_settings_per_profile(chain):
    settings = chain[0]
    reference = {"beta": 10.0, "exp_times": 8, "radius": 5, "bg_threshold": 0.2}
    assert RANDOM_WALK_CONFIGS["voc"] == RANDOM_WALK_CONFIGS["coco"] == reference
    assert random_walk_config(settings) == dict(reference, exp_times=4)  # SynthWorld's maps are 5x smaller across
    assert random_walk_config(settings, exp_times=8, bg_threshold=None) == reference
    with pytest.raises(ValueError, match="unknown random-walk setting"):
        random_walk_config(settings, steps=8)


def test_bad_input(chain, tmp_path):
    settings, val_cams, irn_checkpoint = chain
    unfinished = tmp_path / "cams" / "half"
    unfinished.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="qaclims make-cams"):
        make_pseudo_masks(settings, irn_checkpoint, unfinished)
    with pytest.raises(FileNotFoundError, match="train it first"):
        make_pseudo_masks(settings, tmp_path / "irn.pt", val_cams)
    with pytest.raises(ValueError, match="not 'train'"):
        make_pseudo_masks(settings, irn_checkpoint, val_cams, split="train")
    with pytest.raises(FileNotFoundError, match="make_pseudo_masks"):
        evaluate_pseudo_masks(settings, tmp_path / "masks")
    broken = tmp_path / "cams" / "broken"
    shutil.copytree(val_cams, broken)
    first = sorted(broken.glob("*.npz"))[0]
    record = load_cam_file(first)
    record["cam"][0, 2, 2] = np.nan
    np.savez_compressed(first, **record)
    with pytest.raises(ValueError, match="NaN") as error:
        make_pseudo_masks(settings, irn_checkpoint, broken, progress=False)
    assert first.name in str(error.value)
    with pytest.raises(ValueError, match="grid"):
        pseudo_mask(torch.zeros(12, 12), np.zeros((1, 10, 12), np.float32), np.array([0]), (48, 48))
    assert pseudo_masks_key(irn_checkpoint, val_cams, bg_threshold=0.25) != pseudo_masks_key(irn_checkpoint, val_cams)
